"""Data formats of the seeds, prompt templates, label masking, bad rows and truncation."""

from __future__ import annotations

import json

import pytest
from conftest import run_launch, tiny_recipe_text, write_recipe

from launcher.config.recipe import load_recipe
from launcher.data.examples import IGNORE_INDEX, render, split_examples, tokenize
from launcher.errors import UserError

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier


def recipe_for(tmp_path, tiny_assets, train_file, data_keys: str, extra: str = ""):
    text = tiny_recipe_text(tiny_assets).replace(
        f'train_file = "{tiny_assets["train_file"]}"', f'train_file = "{train_file}"\n{data_keys}'
    )
    if "eval_fraction" in data_keys:
        text = text.replace("eval_fraction = 0.1\n", "")
    return load_recipe(write_recipe(tmp_path, text + extra))


def test_templates_render_the_seeds_prompt_formats():
    history = [("你好", "你好！")]
    assert render("chatml", "现在你要扮演甄嬛", [], "你是谁？") == (
        "<|im_start|>system\n现在你要扮演甄嬛<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>",
    )
    assert render("chatglm", None, history, "今天天气怎么样")[0] == (
        "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：今天天气怎么样\n\n答："
    )
    assert render("transnormer", None, history, "Q")[0] == "Human:\n你好\nAssistant:\n你好！\nHuman:\nQ\nAssistant:\n"
    assert render("transnormer", None, [], "3", instruction="Even or odd?")[0] == "Even or odd?\nHuman:\n3\nAssistant:\n"
    assert render("chatml", None, [], "3", instruction="Even or odd?")[0].startswith(
        "<|im_start|>user\nEven or odd?\n3<|im_end|>"
    )
    assert (
        render("chatglm3", "系统", history, "Q")[0]
        == "<|system|>\n系统<|user|>\n你好<|assistant|>\n你好！<|user|>\nQ<|assistant|>\n"
    )
    assert render("plain", None, [], "Is 3 odd?") == ("Is 3 odd?\n", "")


def test_every_seed_format_from_every_file_type(tmp_path, tiny_assets):
    import pandas

    alpaca = [{"instruction": "扮演甄嬛", "input": "你是谁？", "output": "家父是大理寺少卿甄远道。"}] * 3
    (tmp_path / "huanhuan.json").write_text(json.dumps(alpaca, ensure_ascii=False))
    chat = [{"prompt": "第二问", "response": "第二答", "history": [["第一问", "第一答"]]}] * 3
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat))
    pandas.DataFrame([{"content": "类型#裙*颜色#蓝色", "summary": "这条蓝色裙子很好看。"}] * 3).to_csv(
        tmp_path / "adgen.csv", index=False
    )
    pandas.DataFrame([{"quote": "Be yourself; everyone else is already taken.", "author": "Oscar Wilde"}] * 3).to_parquet(
        tmp_path / "quotes.parquet"
    )
    messages = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"},
            ]
        }
    ] * 3
    (tmp_path / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in messages))
    cases = {
        "huanhuan.json": (
            'format = "alpaca"\ntemplate = "chatml"',
            "<|im_start|>user\n扮演甄嬛\n你是谁？<|im_end|>",
            "家父是大理寺少卿甄远道。",
        ),
        "chat.jsonl": (
            'format = "prompt-response"\nhistory_column = "history"\ntemplate = "chatglm"',
            "[Round 1]\n\n问：第一问\n\n答：第一答\n\n[Round 2]\n\n问：第二问\n\n答：",
            "第二答",
        ),
        "adgen.csv": (
            'format = "prompt-response"\nprompt_column = "content"\nresponse_column = "summary"\ntemplate = "chatglm"',
            "问：类型#裙*颜色#蓝色",
            "这条蓝色裙子很好看。",
        ),
        "quotes.parquet": ('format = "text"\ntext_column = "quote"', "", "Be yourself; everyone else is already taken."),
        "messages.jsonl": (
            'format = "messages"\ntemplate = "chatml"',
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
            "<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n",
            "a2",
        ),
    }
    for name, (keys, prompt_part, response) in cases.items():
        recipe = recipe_for(tmp_path, tiny_assets, tmp_path / name, keys + "\neval_fraction = 0.0")
        example = split_examples(recipe).train[0]
        assert prompt_part in example.prompt and example.response == response, name
        if name == "quotes.parquet":
            assert example.prompt == ""  # text is learned whole


def test_labels_mask_the_prompt_and_text_is_learned_whole(tiny_assets, tmp_path):
    from launcher.models.loading import load_tokenizer

    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)))
    tokenizer = load_tokenizer(recipe)
    example = split_examples(recipe).train[0]
    row = tokenize(example, tokenizer, 64)
    prompt_len = len(tokenizer(example.prompt)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert tokenizer.decode(row["input_ids"][prompt_len:], skip_special_tokens=True) == example.response
    short = tokenize(example, tokenizer, 5)
    assert short["truncated"] and len(short["input_ids"]) == 5


def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path, tiny_assets):
    lines = [
        '{"instruction": "a", "output": "b"}',
        '{"instruction": "a", "output": ',
        '{"instruction": "a"}',
        '{"instruction": "a", "output": "  "}',
        '{"instruction": "c", "output": "d"}',
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as caught:
        split_examples(recipe_for(tmp_path, tiny_assets, data, ""))
    assert caught.value.lines == [f'{data}:2: invalid JSON: Expecting value; fix the row, or set data.on_bad_rows = "skip"']
    split = split_examples(recipe_for(tmp_path, tiny_assets, data, 'on_bad_rows = "skip"\neval_fraction = 0.0'))
    assert split.skipped == 3 and [e.response for e in split.train] == ["b", "d"]
    data.write_text(lines[0] + "\n" + lines[2] + "\n")
    with pytest.raises(UserError) as caught:
        split_examples(recipe_for(tmp_path, tiny_assets, data, ""))
    assert caught.value.lines[0].startswith(f"{data}:2: column 'output' is missing or empty (set data.output_column")


def test_check_shows_tokenized_samples_with_the_masked_part_and_counts_truncation(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    result = run_launch("check", recipe, "--show-samples", "2", "--set", "data.max_length=15")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('masked  (not trained): "Is this number even or odd?\\n') == 2
    assert 'trained (labels):      "' in result.stdout
    truncated = int(result.stdout.split(" truncated to data.max_length=15")[0].rsplit(" ", 1)[-1])
    assert truncated > 0 and f"{truncated} of 1080 examples are longer than 15 tokens" in " ".join(result.stdout.split())


def test_an_unreachable_hub_dataset_is_one_line(tmp_path, tiny_assets):
    recipe = recipe_for(tmp_path, tiny_assets, "Abirate/english_quotes", 'format = "text"\ntext_column = "quote"')
    with pytest.raises(UserError) as caught:
        split_examples(recipe)
    assert len(caught.value.lines) == 1
    assert caught.value.lines[0].startswith("data: Abirate/english_quotes is neither a local file nor a reachable hub dataset")


def test_examples_cut_before_their_response_are_an_error_before_the_queue(tmp_path, tiny_assets):
    from launcher.data.examples import read_training_set

    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), ["data.max_length=6"])
    report = read_training_set(recipe)
    assert report.errors == [
        "data.max_length: 1080 of 1080 examples keep no response token after truncation "
        "to 6 (nothing to learn from them); raise it"
    ]
