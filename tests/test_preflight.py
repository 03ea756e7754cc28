"""Pre-flight catches mistakes before anything is queued: wrong target modules (with the real
names), the compatibility matrix, keys of another method, memory over budget, unreachable hubs."""

from __future__ import annotations

import json

import pytest
from conftest import run_launch, tiny_recipe_text, write_recipe

from launcher.config.quirks import apply_quirks, hidden_size, quirks_for, rebuild_meta_slopes
from launcher.config.recipe import load_recipe
from launcher.errors import UserError
from launcher.launch.preflight import run_preflight

pytestmark = pytest.mark.e2e  # real processes end to end: the full tier


def test_a_wrong_target_module_fails_before_anything_starts_and_lists_the_real_names(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets, extra='[peft]\ntarget_modules = ["q_proj", "qkvu_proj"]\n'))
    result = run_launch(recipe, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    text = " ".join(result.stdout.split())
    assert (
        f"peft.target_modules: 'qkvu_proj' matches no module of {tiny_assets['model']}; its adaptable modules are: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    ) in text
    assert "nothing was started" in text and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[peft]\nmethod = "prefix-tuning"\n', "train.gradient_checkpointing: prefix-tuning cannot recompute activations"),
        ('[peft]\nmethod = "adalora"\ntinit = 2\ntfinal = 2\n', "distributed.deepspeed: adalora cannot run under ZeRO-3"),
    ],
)
def test_the_compatibility_matrix_is_enforced(tmp_path, tiny_assets, extra, message):
    text = tiny_recipe_text(tiny_assets, extra=extra)
    if "prefix" in extra:
        text = text.replace("save_steps = 5", "save_steps = 5\ngradient_checkpointing = true")
    else:
        text = text.replace('deepspeed = "zero2"', 'deepspeed = "zero3"')
    result = run_launch("check", write_recipe(tmp_path, text))
    assert result.returncode == 2 and message in " ".join(result.stdout.split())


def test_a_key_of_another_method_says_which_method_it_belongs_to(tmp_path, tiny_assets):
    path = write_recipe(tmp_path, tiny_recipe_text(tiny_assets, extra='[peft]\nmethod = "lora"\nnum_virtual_tokens = 8\n'))
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    assert caught.value.lines == [
        "peft.num_virtual_tokens belongs to prefix-tuning / prompt-tuning / p-tuning, not lora; remove it or change peft.method"
    ]


def test_memory_estimate_scales_with_zero_and_warns_over_budget(tmp_path, tiny_assets):
    base = tiny_recipe_text(tiny_assets, extra="[peft]\nr = 8\n")
    estimates = {}
    for stage in ("zero2", "zero3"):
        recipe = load_recipe(write_recipe(tmp_path, base.replace('deepspeed = "zero2"', f'deepspeed = "{stage}"')))
        estimates[stage] = run_preflight(recipe, examples=1080).memory_bytes
    assert 0 < estimates["zero3"] < estimates["zero2"]  # ZeRO-3 shards the weights too
    recipe = load_recipe(write_recipe(tmp_path, base), ["distributed.gpu_memory_gb=0.001"])
    report = run_preflight(recipe, examples=1080)
    assert any(w.startswith("memory: the estimate") and "exceeds distributed.gpu_memory_gb = 0.001" in w for w in report.warnings)


def test_an_unreachable_hub_model_is_refused_in_one_line_and_the_rest_is_checked(tmp_path, tiny_assets):
    text = tiny_recipe_text(tiny_assets).replace(
        f'name_or_path = "{tiny_assets["model"]}"',
        'name_or_path = "OpenNLPLab/TransNormerLLM-7B"\nrevision = "main"\ntrust_remote_code = true',
    )
    recipe = load_recipe(write_recipe(tmp_path, text))
    report = run_preflight(recipe, examples=1080)
    assert [e for e in report.errors if e.startswith("model: OpenNLPLab/TransNormerLLM-7B cannot be loaded here (")]
    assert "then `hf download OpenNLPLab/TransNormerLLM-7B --revision main`" in report.errors[-1]
    assert any(line.startswith("batch: 8 per rank x 1 accumulation x 2 ranks") for line in report.lines)


def test_transnormer_quirks_from_its_config(tmp_path, tiny_assets):
    """The real TransNormer code needs the hub; its config.json is enough for what pre-flight decides."""
    model = tmp_path / "transnormer"
    model.mkdir()
    config = {
        "model_type": "transnormer",
        "decoder_embed_dim": 2048,
        "decoder_layers": 16,
        "decoder_attention_heads": 16,
        "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig"},
    }
    (model / "config.json").write_text(json.dumps(config))
    assert hidden_size(config) == 2048  # what DeepSpeed's "auto" bucket sizes need
    assert quirks_for("transnormer").generate_with_cache is False and quirks_for("chatglm").padding_side == "left"
    text = tiny_recipe_text(tiny_assets, extra='[peft]\nmethod = "prompt-tuning"\n').replace(
        f'name_or_path = "{tiny_assets["model"]}"', f'name_or_path = "{model}"'
    )
    report = run_preflight(load_recipe(write_recipe(tmp_path, text)), examples=1080)
    assert any("prompt-tuning does not work with transnormer models" in e for e in report.errors)


def test_slopes_left_on_the_meta_device_are_rebuilt():
    import torch

    class Layer(torch.nn.Module):  # the shape of TransNormer's code: a plain tensor made in __init__
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.slopes = torch.empty(8, 1, 1, device="meta")

        @staticmethod
        def _build_slope_tensor(heads):
            return torch.arange(1, heads + 1, dtype=torch.float32).reshape(heads, 1, 1)

    model = torch.nn.Sequential(Layer(), Layer())
    assert rebuild_meta_slopes(model) == 2
    assert not model[0].slopes.is_meta and model[1].slopes[3, 0, 0].item() == 4.0

    from transformers import PretrainedConfig

    model = torch.nn.Sequential(Layer())
    model.config = PretrainedConfig(decoder_embed_dim=2048)
    model.config.model_type = "transnormer"
    apply_quirks(model)  # after loading: slopes rebuilt and hidden_size aliased for DeepSpeed's "auto"
    assert not model[0].slopes.is_meta and model.config.hidden_size == 2048
