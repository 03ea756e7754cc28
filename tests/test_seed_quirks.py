"""The seeds' real upstream remote code (TransNormerLLM, ChatGLM2-6B, ChatGLM3-6B) on the installed
transformers, through the quirks registry: it loads, trains a step and generates in fp32 and bf16
without a file edited; the templates tokenize as the models' own code and fine-tune script do;
pre-flight refuses what could not start. Tiny random models built from that code (seed_models.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from seed_models import SEEDS, build_seed_model, require_upstream, seed_recipe

from launcher.models.loading import load_pretrained


@pytest.fixture(scope="module")
def seed_dirs(tmp_path_factory):
    require_upstream()
    return {seed: build_seed_model(seed, tmp_path_factory.mktemp(seed)) for seed in SEEDS}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("seed", SEEDS)
def test_seed_model_loads_trains_a_step_and_generates(seed, dtype, seed_dirs):
    import torch

    from launcher.data.examples import Example
    from launcher.evaluate.generation import evaluate_examples
    from launcher.models.loading import load_base_model, load_tokenizer

    recipe = seed_recipe(seed, seed_dirs[seed], dtype=dtype)
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"max_new_tokens": 5, "batch_size": 2})})
    model = load_base_model(recipe)
    assert model.get_input_embeddings().weight.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    tokenizer = load_tokenizer(recipe)
    batch = tokenizer(["你今日去了哪里？", "臣妾甄嬛"], return_tensors="pt", padding=True)
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["input_ids"]).loss
    loss.backward()  # bf16: TransNormer's rebuilt slopes are in the model's dtype
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None

    examples = [Example("Human:\n你好\nAssistant:\n", "臣妾在。"), Example("Human:\n你是谁？\nAssistant:\n", "甄嬛。")]
    with torch.no_grad():
        rows, failure = evaluate_examples(model.eval(), load_tokenizer(recipe, padding_side="left"), examples, recipe)
    assert failure is None and all(r["loss_tokens"] > 0 and r["new_tokens"] > 0 for r in rows)
    assert all(isinstance(r["prediction"], str) and r["prediction"].strip() for r in rows), rows  # new tokens decode to text


def test_transnormer_template_is_its_fine_tune_script_token_for_token(seed_dirs):
    """OpenNLPLab/TransnormerLLM fine-tune/train.py: source = "{instruction}\\nHuman:\\n{input}\\nAssistant:\\n"
    (or "Human:\\n{the one that is set}\\nAssistant:\\n"), target = output + eos text; source + target tokenized
    as one text, the first len(tokenize(source)) labels masked; pad id 0, right padding."""
    from launcher.config.recipe import DataSection
    from launcher.data.examples import IGNORE_INDEX, to_example, tokenize
    from launcher.models.loading import load_tokenizer

    recipe = seed_recipe("transnormer", seed_dirs["transnormer"])
    tokenizer = load_tokenizer(recipe)
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "right"
    data = DataSection(train_file="x.json", format="alpaca", template="transnormer")
    rows = [
        {"instruction": "把这句话翻译成英文", "input": "你今日去了哪里？", "output": "Where did you go today?"},
        {"instruction": "你是谁？", "input": "", "output": "臣妾甄嬛。"},
    ]
    for row in rows:
        if row["input"]:
            source = row["instruction"] + "\n" + "Human:\n" + row["input"] + "\n" + "Assistant:\n"
        else:
            source = "Human:\n" + row["instruction"] + "\n" + "Assistant:\n"
        whole = tokenizer(source + row["output"] + tokenizer.eos_token)["input_ids"]
        source_len = len(tokenizer(source)["input_ids"])
        labels = [IGNORE_INDEX] * source_len + whole[source_len:]
        ours = tokenize(to_example(row, data, tokenizer), tokenizer, 2048)
        assert ours["input_ids"] == whole and ours["labels"] == labels
        assert whole[-1] == tokenizer.eos_token_id


def test_chatglm_template_is_chatglm2s_build_prompt(seed_dirs):
    from launcher.config.recipe import DataSection
    from launcher.data.examples import to_example, tokenize
    from launcher.models.loading import load_tokenizer

    tokenizer = load_tokenizer(seed_recipe("chatglm2", seed_dirs["chatglm2"]))
    data = DataSection(train_file="x.jsonl", format="prompt-response", template="chatglm", history_column="history")
    row = {"prompt": "那我应该先学什么？", "response": "先学 Python。", "history": [["我想入门深度学习", "很好的选择！"]]}
    example = to_example(row, data, tokenizer)
    assert example.prompt == tokenizer.build_prompt(row["prompt"], history=[tuple(t) for t in row["history"]])
    ids = tokenize(example, tokenizer, 512)["input_ids"]
    prompt_ids = tokenizer(example.prompt)["input_ids"]
    assert ids[:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")] and ids[: len(prompt_ids)] == prompt_ids


def test_chatglm3_roles_are_single_special_tokens_as_build_chat_input_makes_them(seed_dirs):
    from launcher.data.examples import Example, render, tokenize
    from launcher.models.loading import load_tokenizer

    tokenizer = load_tokenizer(seed_recipe("chatglm3", seed_dirs["chatglm3"]))
    history = [("我想入门深度学习", "很好的选择！")]
    prompt, suffix = render("chatglm3", "你是一个助手", history, "那我应该先学什么？")
    ids = tokenize(Example(prompt, "先把 Python 基础打牢。", suffix), tokenizer, 512)["input_ids"]
    # build_chat_input (its batch_encode_plus is gone in transformers 5: its parts, as it combines them)
    upstream = (
        tokenizer.build_single_message("system", "", "你是一个助手")
        + tokenizer.build_single_message("user", "", history[0][0])
        + tokenizer.build_single_message("assistant", "", history[0][1])
        + tokenizer.build_single_message("user", "", "那我应该先学什么？")
        + [tokenizer.get_command("<|assistant|>")]
    )
    answer = tokenizer.tokenizer.encode("\n") + tokenizer.tokenizer.encode("先把 Python 基础打牢。") + [tokenizer.eos_token_id]
    assert ids == tokenizer.build_inputs_with_special_tokens(upstream) + answer
    assert ids.count(tokenizer.get_command("[gMASK]")) == 1 and ids.count(tokenizer.get_command("<|user|>")) == 2

    # HF's later ChatGLM3 chat template writes "[gMASK]sop" and the roles as text: still single tokens, once
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.first %}[gMASK]sop{% endif %}<|{{ m['role'] }}|>\n {{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompt, suffix = render("tokenizer", None, [], "你好", tokenizer)
    example = Example(prompt, "在。", suffix, special_tokens=False)
    ids = tokenize(example, tokenizer, 512)["input_ids"]
    assert ids[:3] == [tokenizer.get_command(t) for t in ("[gMASK]", "sop", "<|user|>")]
    assert ids.count(tokenizer.get_command("[gMASK]")) == 1 and tokenizer.get_command("<|assistant|>") in ids
    plain = tokenizer("isopropyl sop", add_special_tokens=False)["input_ids"]  # "sop" only after [gMASK]
    assert tokenizer.get_command("sop") not in plain


def test_check_shows_the_role_tokens_as_single_tokens(seed_dirs):
    """`launch check --show-samples` prints the first token pieces: a role marker split into text pieces shows."""
    from conftest import run_launch

    recipe = REPO / "recipes" / "chatglm3-6b-qlora.toml"
    result = run_launch("check", recipe, "--set", f"model.name_or_path={seed_dirs['chatglm3']}", "--show-samples", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "first tokens:          [gMASK] | sop | <|user|> | ▁ | <0x0A> | " in result.stdout
    assert 'masked  (not trained): "[gMASK]sop<|user|>' in result.stdout  # printed as text, never as console markup


def test_own_decoding_loop_equals_generate_where_both_run(tiny_assets):
    import torch
    from transformers import AutoTokenizer

    from launcher.evaluate.decoding import decode

    model = load_pretrained(tiny_assets["model"], torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"], padding_side="left")
    batch = tokenizer(["Is this number even or odd?\n7\n", "Is 12 even?\n", "odd"], return_tensors="pt", padding=True)
    ends = {"max_new_tokens": 12, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        want = model.generate(**batch, do_sample=False, **ends)[:, batch["input_ids"].shape[1] :]
        got = decode(model, batch["input_ids"], batch["attention_mask"], **ends)
        cached = decode(model, batch["input_ids"], batch["attention_mask"], **ends, cache=True)
    assert batch["attention_mask"].min() == 0  # left padding is exercised
    assert got.tolist() == want.tolist() == cached.tolist()


@pytest.mark.parametrize("seed", ["chatglm2", "chatglm3"])
def test_own_loop_with_chatglms_own_cache_equals_the_loop_without(seed, seed_dirs):
    """ChatGLM's forward returns its own tuple cache: fed back, each step runs one token (O(n), not O(n^2))."""
    import torch

    from launcher.evaluate.decoding import decode
    from launcher.models.loading import load_base_model, load_tokenizer

    recipe = seed_recipe(seed, seed_dirs[seed])
    model, tokenizer = load_base_model(recipe).eval(), load_tokenizer(recipe, padding_side="left")
    batch = tokenizer(["[Round 1]\n\n问：你好\n\n答：", "类型#裙*版型#宽松*颜色#蓝色", "你"], return_tensors="pt", padding=True)
    ends = {"max_new_tokens": 24, "eos_token_id": -1, "pad_token_id": tokenizer.pad_token_id}  # no early end: 24 steps
    with torch.no_grad():
        plain = decode(model, batch["input_ids"], batch["attention_mask"], **ends)
        cached = decode(model, batch["input_ids"], batch["attention_mask"], **ends, cache=True)
    assert batch["attention_mask"].min() == 0 and plain.shape == (3, 24)
    assert cached.tolist() == plain.tolist()


def test_generation_that_cannot_run_keeps_the_losses_and_says_why(seed_dirs, monkeypatch):
    """ChatGLM's own generate() on transformers 5 (what the registry's own loop replaces) fails for
    real: the evaluation keeps the losses and records one line instead of failing the run."""
    import dataclasses

    import torch

    from launcher.config import quirks
    from launcher.data.examples import Example
    from launcher.evaluate.generation import evaluate_examples
    from launcher.models.loading import load_base_model, load_tokenizer

    recipe = seed_recipe("chatglm2", seed_dirs["chatglm2"])
    model, tokenizer = load_base_model(recipe).eval(), load_tokenizer(recipe, padding_side="left")
    monkeypatch.setitem(quirks.REGISTRY, "chatglm", dataclasses.replace(quirks.REGISTRY["chatglm"], own_generation_loop=False))
    with torch.no_grad():
        rows, failure = evaluate_examples(model, tokenizer, [Example("[Round 1]\n\n问：你好\n\n答：", "你好")], recipe)
    assert failure.startswith("generation failed (") and rows[0]["loss_tokens"] > 0 and rows[0]["prediction"] == ""


def test_preflight_refuses_what_could_not_start(seed_dirs, tmp_path):
    from launcher.data.examples import read_training_set
    from launcher.launch.preflight import run_preflight

    broken = shutil.copytree(seed_dirs["chatglm2"], tmp_path / "no-package")
    (broken / "modeling_chatglm.py").write_text("import not_a_real_package_xyz\n" + (broken / "modeling_chatglm.py").read_text())
    report = run_preflight(seed_recipe("chatglm2", broken), examples=40)
    assert [e for e in report.errors if e.startswith("model: the code of") and "not_a_real_package_xyz" in e], report.errors

    unbuildable = shutil.copytree(seed_dirs["transnormer"], tmp_path / "zero-heads")
    config = json.loads((unbuildable / "config.json").read_text()) | {"decoder_attention_heads": 0}
    (unbuildable / "config.json").write_text(json.dumps(config))
    report = run_preflight(seed_recipe("transnormer", unbuildable), examples=40)
    assert (
        f"model: {unbuildable} cannot be built from its config (ValueError: math domain error); the run could not start"
        in report.errors
    )

    no_tokenizer = shutil.copytree(seed_dirs["chatglm3"], tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.model").unlink()
    report = read_training_set(seed_recipe("chatglm3", no_tokenizer))
    assert [e for e in report.errors if e.startswith(f"model: the tokenizer of {no_tokenizer} cannot be loaded")]

    edited = shutil.copytree(seed_dirs["chatglm3"], tmp_path / "edited")
    (edited / "modeling_chatglm.py").write_text((edited / "modeling_chatglm.py").read_text() + "\n# a local change\n")
    report = run_preflight(seed_recipe("chatglm3", edited), examples=40)
    assert [w for w in report.warnings if "modeling_chatglm.py of this chatglm model is a revision the quirks registry" in w]
    clean = run_preflight(seed_recipe("chatglm3", seed_dirs["chatglm3"]), examples=40)
    assert not [w for w in clean.warnings if "quirks registry" in w]


def test_preflight_names_triton_when_transnormers_code_cannot_import_it(seed_dirs):
    """Its code imports triton at module level, even on its PyTorch path: a machine without it (hidden
    here the way Python itself reports a missing module) is told before anything starts."""
    hide = "import sys; sys.modules['triton'] = None; from launcher.cli import main; sys.exit(main(sys.argv[1:]))"
    recipe, model = REPO / "recipes" / "transnormer-lora.toml", seed_dirs["transnormer"]
    result = subprocess.run(
        [sys.executable, "-c", hide, "check", recipe, "--set", f"model.name_or_path={model}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"model: the code of {model} imports triton, which is not installed here: pip install triton" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_preflight_names_the_adaptable_modules_when_a_method_has_no_targets(family, tmp_path):
    import transformers

    from launcher.config.recipe import validate_recipe
    from launcher.launch.preflight import run_preflight

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)
    config = (
        transformers.Phi3Config(**sizes, pad_token_id=0)
        if family == "phi3"
        else transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4)
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / family)
    peft = {"method": "ia3"} if family == "phi3" else {"method": "lora", "target_modules": ["q_proj"]}
    recipe = validate_recipe(
        {
            "name": family,
            "model": {"name_or_path": str(tmp_path / family)},
            "data": {"train_file": str(REPO / "recipes/data/huanhuan-sample.json")},
            "peft": peft,
        },
        source="test",
    )
    errors = run_preflight(recipe, examples=40).errors
    if family == "phi3":  # peft has no IA3 defaults for Phi-3: it would train nothing
        assert [
            e for e in errors if e.startswith("peft: ia3 cannot attach to phi3 models") and "qkv_proj" in e and "down_proj" in e
        ], errors
    else:  # GPT-2's projections are transformers' Conv1D, not nn.Linear
        assert [e for e in errors if "its adaptable modules are: c_attn (Conv1D), c_fc (Conv1D), c_proj (Conv1D)" in e], errors


def test_each_seed_recipe_says_how_to_run_the_real_thing():
    for name in ("transnormer-lora.toml", "chatglm3-6b-qlora.toml", "chatglm2-6b-adalora.toml"):
        text = (REPO / "recipes" / name).read_text()
        assert "revision" in text and "quirks registry" in text and "memory" in text.lower(), name


@pytest.mark.parametrize("seed", ["chatglm2", "chatglm3"])
def test_the_real_6b_model_is_built_on_meta_without_its_memory(seed, tmp_path):
    """Pre-flight and the merge build the real model (its real config.json) on the meta device: ChatGLM's
    own skip_init would place all 6.2B weights in the login node's memory (it was killed for it)."""
    from launcher.models.loading import meta_model

    real = shutil.copytree(require_upstream() / seed, tmp_path / seed)
    model = meta_model(str(real))
    assert sum(p.numel() for p in model.parameters()) == 6_243_584_000 and all(p.is_meta for p in model.parameters())


def test_own_loop_samples_from_the_top_p_nucleus_at_the_temperature():
    import torch

    from launcher.evaluate.decoding import next_token

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.40, 0.35, 0.25]])).repeat(4000, 1)
    drawn = next_token(logits, do_sample=True, temperature=1.0, top_p=0.7)  # keeps 0.40 and 0.35: 0.75 >= 0.7
    counts = torch.bincount(drawn, minlength=3).tolist()
    assert counts[2] == 0 and abs(counts[0] / 4000 - 0.40 / 0.75) < 0.03
    cold = next_token(logits, do_sample=True, temperature=1e-3, top_p=1.0)  # near-zero temperature: the argmax
    assert cold.tolist() == logits.argmax(-1).tolist()
