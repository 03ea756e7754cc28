"""data.format = "preference": prompt + chosen + rejected, each side text or messages, from every file
type; the seeds' templates; bad rows by file and line; truncation of either side counted; tokenized
once and cached beside the SFT cache; a recipe whose objective does not take its data is refused."""

from __future__ import annotations

import json

import pandas
import pytest
from conftest import run_launch, tiny_recipe_text, write_recipe
from transformers import AutoTokenizer

from launcher.config.recipe import load_recipe
from launcher.config.templates import NAMES
from launcher.data.examples import (
    Example,
    build_train_dataset,
    load_examples,
    read_training_set,
    tokenize,
    tokenize_pair,
)
from launcher.errors import UserError

PAIR = {"prompt": "Is this number even or odd?\n12", "chosen": "even", "rejected": "odd"}
AS_MESSAGES = {
    "prompt": [{"role": "user", "content": PAIR["prompt"]}],
    "chosen": [{"role": "assistant", "content": "even"}],
    "rejected": [{"role": "assistant", "content": "odd"}],
}
WHOLE_CONVERSATIONS = {  # no prompt column: the turns before the last answer are the prompt (HH style)
    side: [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR[side]}]
    for side in ("chosen", "rejected")
}


def preference_recipe(tmp_path, assets, train_file, data_keys: str = "", objective: str = "dpo"):
    """A recipe file (named after its objective) of the tests' tiny recipe on preference data."""
    text = tiny_recipe_text(assets)
    for line in data_keys.splitlines():  # a key given here replaces the tiny recipe's own
        text = "\n".join(kept for kept in text.splitlines() if not kept.startswith(line.split("=")[0])) + "\n"
    text = text.replace(
        f'train_file = "{assets["train_file"]}"', f'train_file = "{train_file}"\nformat = "preference"\n{data_keys}'
    )
    return write_recipe(tmp_path, text.replace("[train]\n", f'[train]\nobjective = "{objective}"\n'), f"{objective}.toml")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def test_every_shape_of_a_pair_from_every_file_type_gives_the_same_example(tmp_path, tiny_assets):
    files = {
        "text.jsonl": write_jsonl(tmp_path / "text.jsonl", [PAIR] * 2),
        "messages.jsonl": write_jsonl(tmp_path / "messages.jsonl", [AS_MESSAGES] * 2),
        "conversations.jsonl": write_jsonl(tmp_path / "conversations.jsonl", [WHOLE_CONVERSATIONS] * 2),
        "list.json": tmp_path / "list.json",
        "table.csv": tmp_path / "table.csv",
        "arrays.parquet": tmp_path / "arrays.parquet",
    }
    files["list.json"].write_text(json.dumps([AS_MESSAGES, PAIR]))
    pandas.DataFrame([PAIR] * 2).to_csv(files["table.csv"], index=False)
    pandas.DataFrame([AS_MESSAGES] * 2).to_parquet(files["arrays.parquet"])  # lists come back as numpy arrays
    for name, path in files.items():
        recipe = load_recipe(preference_recipe(tmp_path, tiny_assets, path, 'template = "chatml"'))
        examples, skipped = load_examples(str(path), recipe.data)
        prompt = "<|im_start|>user\nIs this number even or odd?\n12<|im_end|>\n<|im_start|>assistant\n"
        assert skipped == 0 and {(e.prompt, e.response, e.rejected, e.suffix) for e in examples} == {
            (prompt, "even", "odd", "<|im_end|>")
        }, name


def test_a_pair_is_the_prompt_once_then_each_answer_as_sft_would_tokenize_it_in_every_template(tiny_assets):
    """For every template, prompt + chosen (and prompt + rejected) are exactly the tokens an SFT example
    of that answer trains on, the prompt is shared, and the answers end with EOS; the joint template
    (TransNormer's, one text) splits them where the two sides' tokens part."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    for template in [name for name in NAMES if name != "tokenizer"]:  # the tiny tokenizer has no chat template
        from launcher.config.templates import REGISTRY, render

        prompt, suffix = render(template, "sys", [("1", "odd")], "Is this number even or odd?\n12")
        entry = REGISTRY[template]
        pair = Example(prompt, "even", suffix, joint=entry.joint, special_tokens=entry.special_tokens, rejected="odd")
        row = tokenize_pair(pair, tokenizer, max_length=512)
        for side, answer in (("chosen_ids", "even"), ("rejected_ids", "odd")):
            sft = tokenize(
                Example(prompt, answer, suffix, joint=entry.joint, special_tokens=entry.special_tokens), tokenizer, 512
            )
            assert row["prompt_ids"] + row[side] == sft["input_ids"], template
            assert row[side][-1] == tokenizer.eos_token_id and row[side]
        assert row["chosen_ids"] != row["rejected_ids"] and not row["truncated"]


def test_truncation_cuts_each_side_to_max_length_and_is_counted(tmp_path, tiny_assets):
    long = {"prompt": "Is this number even or odd?\n12", "chosen": "even " * 40, "rejected": "odd"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [PAIR] * 9 + [long])
    recipe = load_recipe(preference_recipe(tmp_path, tiny_assets, path, "max_length = 24"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    examples, _ = load_examples(str(path), recipe.data)
    rows = [tokenize_pair(e, tokenizer, 24) for e in examples]
    assert [r["truncated"] for r in rows] == [False] * 9 + [True]
    assert all(len(r["prompt_ids"]) + len(r[side]) <= 24 for r in rows for side in ("chosen_ids", "rejected_ids"))
    report = read_training_set(recipe)
    assert "1 truncated to data.max_length=24" in report.lines[0] and not report.errors
    cut_off = load_recipe(preference_recipe(tmp_path, tiny_assets, path, "max_length = 4"))  # the prompt fills it
    assert "keep no token of an answer after truncation to 4" in read_training_set(cut_off).errors[0]


def test_bad_pairs_stop_at_their_line_or_are_skipped_and_counted(tmp_path, tiny_assets):
    bad = {
        2: {"prompt": "Is 3 even or odd?", "chosen": "odd"},
        3: {"prompt": "Is 3 even or odd?", "chosen": "odd", "rejected": "odd"},
        4: {"prompt": " ", "chosen": "odd", "rejected": "even"},
        5: {
            "chosen": WHOLE_CONVERSATIONS["chosen"],
            "rejected": [{"role": "user", "content": "another"}, {"role": "assistant", "content": "odd"}],
        },
        6: {"prompt": "Is 3 even or odd?", "chosen": [{"role": "user", "content": "odd"}], "rejected": "even"},
    }
    said = {
        2: "column 'rejected' is missing or empty (set data.rejected_column if it has another name)",
        3: "chosen and rejected are the same answer: nothing to prefer",
        4: "column 'prompt' is missing or empty (set data.prompt_column if it has another name)",
        5: "the chosen and rejected conversations differ before their last answer, so they answer different prompts",
        6: "column 'chosen': the messages must end with the assistant's answer",
    }
    for line, row in bad.items():
        path = write_jsonl(tmp_path / f"bad{line}.jsonl", [PAIR] * (line - 1) + [row] + [PAIR])
        recipe = load_recipe(preference_recipe(tmp_path, tiny_assets, path))
        with pytest.raises(UserError) as caught:
            load_examples(str(path), recipe.data)
        assert caught.value.lines == [f'{path}:{line}: {said[line]}; fix the row, or set data.on_bad_rows = "skip"']
    path = write_jsonl(tmp_path / "mixed.jsonl", [PAIR, *bad.values(), PAIR])
    recipe = load_recipe(preference_recipe(tmp_path, tiny_assets, path, 'on_bad_rows = "skip"'))
    examples, skipped = load_examples(str(path), recipe.data)
    assert (len(examples), skipped) == (2, 5)


def test_pairs_are_tokenized_once_and_cached_beside_the_sft_cache(tmp_path, tiny_assets):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {
                **PAIR,
                "prompt": f"Is this number even or odd?\n{n}",
                "chosen": ["even", "odd"][n % 2],
                "rejected": ["odd", "even"][n % 2],
            }
            for n in range(40)
        ],
    )
    recipe = load_recipe(preference_recipe(tmp_path, tiny_assets, path))
    sft = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets), "sft.toml"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    cache = tmp_path / "cache"
    dataset, stats = build_train_dataset(recipe, tokenizer, cache)
    build_train_dataset(sft, tokenizer, cache)
    assert len(list(cache.iterdir())) == 2  # the pairs' and the SFT examples', side by side
    assert stats == {"examples": 36, "truncated": 0, "tokens": sum(dataset["length"]), "skipped_rows": 0}
    assert set(dataset.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids", "index", "length"}
    again, _ = build_train_dataset(recipe, tokenizer, cache)  # read back, not tokenized again
    assert again["chosen_ids"] == dataset["chosen_ids"] and len(list(cache.iterdir())) == 2


def test_what_an_objective_cannot_do_is_one_line_before_the_queue(tmp_path, tiny_assets):
    path = write_jsonl(tmp_path / "prefs.jsonl", [PAIR] * 20)
    dpo = preference_recipe(tmp_path, tiny_assets, path)
    refused = {
        (preference_recipe(tmp_path, tiny_assets, path, objective="sft"),): 'data.format: "preference" rows do not fit '
        'train.objective = "sft" (next-token loss on the response: it takes alpaca / prompt-response / text / messages); '
        'set train.objective = "dpo"',
        (dpo, "--set", "peft.method=adalora"): 'peft.method: train.objective = "dpo" is not supported with adalora yet; '
        "use lora / qlora / lora-8bit",
        (dpo, "--set", "peft.lora_init=pissa"): "peft.lora_init: pissa moves part of the base weights into the adapter, "
        'so the adapter disabled (train.objective = "dpo"\'s reference) is no longer the base; use "default" or "gaussian"',
        (dpo, "--set", "preference.loss_weights=[0.5]", "--set", "preference.loss_type=['sigmoid','sft']"): (
            "preference.loss_weights: 1 weights for 2 loss types ['sigmoid', 'sft']; give one weight per loss type"
        ),
        (dpo, "--set", "data.batching=packed"): 'data.batching: "packed" cannot work here (train.objective = "dpo" pads '
        'its pairs (TRL has no packed preference batches)); use "grouped" (or "auto")',
    }
    sft = write_recipe(tmp_path, tiny_recipe_text(tiny_assets) + "[preference]\nbeta = 0.2\n", "plain-sft.toml")
    refused[(sft,)] = 'preference.beta belongs to train.objective = "dpo", not "sft"; remove it or change train.objective'
    for args, line in refused.items():
        result = run_launch("check", *args)
        said = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2 and line in said and "Traceback" not in said, said
    checked = run_launch("check", dpo, "--show-samples", "1")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "data: 18 training, 2 held-out examples (preference, template plain)" in checked.stdout
    assert 'rejected (dispreferred): "odd' in checked.stdout
