"""Every PEFT method trains end to end from the seed recipes (2 ranks, DeepSpeed on CPU, real
bitsandbytes for the quantized ones), with the model swapped for a tiny local Llama. Each saved
adapter, loaded back with PeftModel.from_pretrained, gives the logits the trained model gave;
LoRA-family merges equal PeftModel on the unquantized base; so do the LoRA variants' (DoRA, rsLoRA,
LoRA+, PiSSA, OLoRA). The TransNormer and ChatGLM seed
recipes run with tiny models of their own upstream code in test_seed_recipes.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_launch, tiny_recipe_text, write_recipe

from launcher.config.methods import names_where
from launcher.config.recipe import load_recipe
from launcher.models.loading import load_pretrained
from launcher.rundir.runs import RunDir

PROMPT_FAMILY = names_where(lambda m: m.prompt_learning)

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier

TINY_TARGETS = 'peft.target_modules=["q_proj", "v_proj"]'
SEEDS = {  # recipe -> overrides its tiny stand-in needs (Llama module names; no chat template)
    "opt-6.7b-lora-8bit.toml": [TINY_TARGETS],
    "bloomz-prompt-tuning.toml": [],
    "bloomz-p-tuning.toml": [],
    "bloomz-prefix-tuning.toml": [],
    "ia3": [],  # no seed uses IA3: the tiny parity recipe
    # LoRA variants on the tiny parity recipe: DoRA (its magnitudes merged too), rsLoRA and LoRA+
    # together; PiSSA and OLoRA, whose final adapter is converted to one for the original base
    "dora+rslora+lora-plus": ["peft.use_dora=true", "peft.use_rslora=true", "peft.lora_plus_ratio=16.0"],
    "pissa": ['peft.lora_init="pissa"'],
    "olora": ['peft.lora_init="olora"'],
}
TINY_RUN = [
    "model.dtype=fp32",
    "distributed.procs_per_node=2",
    "train.max_steps=8",
    "train.micro_batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.save_steps=4",
    "data.max_length=256",
    "eval.max_new_tokens=4",
]


def reload_logits(recipe, adapter_dir, probe, quantized: bool):
    """Logits of base (+ the recipe's quantization) + adapter loaded from disk, on the probe batch."""
    import torch
    from peft import PeftModel

    from launcher.models.loading import load_base_model, quantization_config

    base = load_base_model(recipe, quantization=quantization_config(recipe) if quantized else None)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    return logits[:, -probe["input_ids"].shape[1] :].float()


def launch_seed(seed: str, tmp_path, tiny_assets):
    if not seed.endswith(".toml"):
        method = "ia3" if seed == "ia3" else "lora"
        recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets, extra=f'[peft]\nmethod = "{method}"\n'))
    else:
        recipe = REPO / "recipes" / seed
    overrides = [f"model.name_or_path={tiny_assets['model']}", *TINY_RUN, *SEEDS[seed]]
    return run_launch(recipe, "--run-dir", tmp_path / "run", *(a for o in overrides for a in ("--set", o)))


@pytest.mark.parametrize("seed", list(SEEDS))
def test_each_method_trains_from_its_seed_recipe_and_its_adapter_reloads_to_the_trained_logits(seed, tmp_path, tiny_assets):
    import torch
    from safetensors.torch import load_file

    from launcher.adapters.merge import PROBE_FILE

    result = launch_seed(seed, tmp_path, tiny_assets)
    assert result.returncode == 0, result.stdout + result.stderr
    run = RunDir(tmp_path / "run")
    recipe = load_recipe(run.recipe)
    method = recipe.peft.method
    probe = load_file(str(run.adapter / PROBE_FILE))
    logits = reload_logits(recipe, run.adapter, probe, quantized=method in ("qlora", "lora-8bit"))
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5

    metrics = json.loads((run.eval / "metrics.json").read_text())
    assert metrics["systems"]["adapter"]["loss"] != metrics["systems"]["base"]["loss"]  # the adapter changed the model
    if method in PROMPT_FAMILY:
        assert not run.merged.exists() and "not merged" in result.stdout
        return
    expected = reload_logits(recipe, run.adapter, probe, quantized=False)
    merged = load_pretrained(str(run.merged), torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert (got - expected).abs().max().item() <= 1e-5
    if seed == "opt-6.7b-lora-8bit.toml":  # any complete checkpoint's adapter merges too
        again = run_launch("merge", run.root, "--checkpoint", "4")
        assert again.returncode == 0, again.stdout + again.stderr
        expected = reload_logits(recipe, run.checkpoints / "checkpoint-4", probe, quantized=False)
        early = load_pretrained(str(run.root / "merged-checkpoint-4"), torch.float32).eval()
        with torch.no_grad():
            got = early(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        assert (got - expected).abs().max().item() <= 1e-5 and (expected - probe["logits"]).abs().max().item() > 1e-4
        refused = run_launch("merge", run.root, "--checkpoint", "4")
        assert refused.returncode != 0 and "merged-checkpoint-4: exists; pass --overwrite" in refused.stdout + refused.stderr


TEMPLATE_STAGES = {"zero2": 2, "zero3": 3, "zero3-offload": 3}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.toml")))
def test_every_recipe_renders_and_checks(recipe, tmp_path):
    path = REPO / "recipes" / recipe
    dry = run_launch(path, "--dry-run", "--run-dir", tmp_path / "run", "--executor", "local")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    from launcher.config.recipe import load_recipe

    template = load_recipe(path).distributed.deepspeed  # the stage the recipe asks for, by its template's name
    rendered = json.loads((tmp_path / "run" / "deepspeed.json").read_text())["zero_optimization"]["stage"]
    assert rendered == TEMPLATE_STAGES[template], (recipe, template, rendered)
    check = run_launch("check", path)
    text = " ".join(check.stdout.split())
    assert f"{path}: valid" in check.stdout and "  data: " in check.stdout and "  batch: " in check.stdout
    if Path(load_recipe(path).model.name_or_path).exists():
        assert check.returncode == 0, check.stdout + check.stderr
    else:  # a hub model with no hub here: refused before anything is queued, in one line, the rest checked
        assert check.returncode == 2 and text.count("error ") == 1 and "cannot be loaded here" in text, text
