"""Every PEFT method trains end to end (2 ranks, DeepSpeed on CPU, real bitsandbytes for the
quantized ones), and its saved adapter, loaded back with PeftModel.from_pretrained, gives the
logits the trained model gave; LoRA-family merges equal base + adapter."""
from __future__ import annotations

import json

import pytest
from conftest import run_launch, tiny_recipe_text, write_recipe

from launcher.recipe import PROMPT_FAMILY, load_recipe
from launcher.runs import RunDir

METHODS = {
    "lora": 'method = "lora"\nr = 4',
    "qlora": 'method = "qlora"\nr = 4',
    "lora-8bit": 'method = "lora-8bit"\nr = 4',
    "adalora": 'method = "adalora"\ninit_r = 6\ntarget_r = 2\ntinit = 2\ntfinal = 3',
    "ia3": 'method = "ia3"',
    "prefix-tuning": 'method = "prefix-tuning"\nnum_virtual_tokens = 4',
    "prompt-tuning": 'method = "prompt-tuning"\nnum_virtual_tokens = 4\nprompt_init = "text"\nprompt_init_text = "even or odd"',
    "p-tuning": 'method = "p-tuning"\nnum_virtual_tokens = 4\nencoder_type = "lstm"',
}


def reload_logits(recipe, adapter_dir, probe, quantized: bool):
    """Logits of base (+ the recipe's quantization) + adapter loaded from disk, on the probe batch."""
    import torch
    from peft import PeftModel

    from launcher.models import load_base_model, quantization_config

    base = load_base_model(recipe, quantization=quantization_config(recipe) if quantized else None)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    return logits[:, -probe["input_ids"].shape[1]:].float(), model


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_its_adapter_reloads_to_the_trained_logits(method, tmp_path, tiny_assets):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launcher.merge import PROBE_FILE

    recipe_path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets, extra=f"[peft]\n{METHODS[method]}\n"))
    result = run_launch(recipe_path, "--run-dir", tmp_path / "run", "--set", "train.max_steps=8")
    assert result.returncode == 0, result.stdout + result.stderr
    run = RunDir(tmp_path / "run")
    recipe = load_recipe(run.recipe)
    probe = load_file(str(run.adapter / PROBE_FILE))
    logits, model = reload_logits(recipe, run.adapter, probe, quantized=method in ("qlora", "lora-8bit"))
    assert (logits - probe["logits"]).abs().max().item() <= 1e-5

    metrics = json.loads((run.eval / "metrics.json").read_text())
    assert metrics["adapter"]["loss"] != metrics["base"]["loss"]  # the adapter changed the model
    if method in PROMPT_FAMILY:
        assert not run.merged.exists() and "not merged" in result.stdout
        return
    # The merge is into the unquantized base: it equals PeftModel on that same base.
    expected, _ = reload_logits(recipe, run.adapter, probe, quantized=False)
    merged = AutoModelForCausalLM.from_pretrained(str(run.merged), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert (got - expected).abs().max().item() <= 1e-5
    if method == "adalora":  # the allocator ran: ranks were pruned from init_r towards target_r
        pattern = json.loads((run.adapter / "adapter_config.json").read_text())["rank_pattern"]
        kept = [sum(mask) for mask in pattern.values()]
        assert pattern and sum(kept) < 6 * len(kept)
