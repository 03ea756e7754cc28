"""Combining LoRA adapters: the combination merged into the base equals the base plus the
weighted sum of each adapter's delta (cat is exact), checked on logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_launch, tiny_recipe_text, write_recipe
from safetensors.torch import load_file

from launcher.models.loading import load_pretrained

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier


def random_adapter(model_dir, out, seed: int, rank: int):
    import peft

    torch.manual_seed(seed)
    model = load_pretrained(model_dir, torch.float32)
    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def with_deltas(model_dir, adapters_and_weights):
    """The base model with sum(w * B @ A * alpha / r) added to each adapted weight, by hand."""

    model = load_pretrained(model_dir, torch.float32)
    weights = dict(model.named_parameters())
    for adapter, weight in adapters_and_weights:
        config = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(adapter / "adapter_model.safetensors")
        for name, lora_a in tensors.items():
            if ".lora_A." in name:
                lora_b = tensors[name.replace(".lora_A.", ".lora_B.")]
                target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                with torch.no_grad():
                    weights[target] += weight * (lora_b @ lora_a) * config["lora_alpha"] / config["r"]
    return model.eval()


def test_cat_combination_equals_the_weighted_sum_of_deltas(tmp_path, tiny_assets):
    from transformers import AutoTokenizer

    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    first = random_adapter(tiny_assets["model"], tmp_path / "a", seed=1, rank=4)
    second = random_adapter(tiny_assets["model"], tmp_path / "b", seed=2, rank=8)
    result = run_launch(
        "merge",
        "--adapters",
        first,
        second,
        "--weights",
        "0.6",
        "0.4",
        "--method",
        "cat",
        "--out",
        tmp_path / "combined",
        "--recipe",
        recipe,
        "--into-base",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "combined" / "adapter_config.json").read_text())["r"] == 12  # cat: 4 + 8

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    inputs = tokenizer(["Is this number even or odd?\n1234\n"], return_tensors="pt")
    merged = load_pretrained(tmp_path / "combined-merged", torch.float32).eval()
    expected = with_deltas(tiny_assets["model"], [(first, 0.6), (second, 0.4)])
    base = load_pretrained(tiny_assets["model"], torch.float32).eval()
    with torch.no_grad():
        got, want, untouched = merged(**inputs).logits, expected(**inputs).logits, base(**inputs).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - untouched).abs().max().item() > 1e-3

    again = run_launch(
        "merge", "--adapters", first, second, "--weights", "0.6", "0.4", "--out", tmp_path / "combined", "--recipe", recipe
    )
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "0.5"], "1 weights for 2 adapters"),
        (["--weights", "0.5", "0.5", "--method", "ties"], "--density"),
    ],
)
def test_bad_combinations_are_one_line_errors(tmp_path, tiny_assets, args, message):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    adapters = [random_adapter(tiny_assets["model"], tmp_path / n, seed=s, rank=4) for n, s in (("a", 1), ("b", 2))]
    result = run_launch("merge", "--adapters", *adapters, "--out", tmp_path / "c", "--recipe", recipe, *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
