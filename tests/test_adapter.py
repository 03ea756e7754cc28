"""The final adapter is validated before anyone uses it: the ZeRO-3 empty-adapter failure is loud."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_launch, tiny_recipe_text, write_recipe
from safetensors.torch import save_file

from launcher.adapters.merge import AdapterError, validate_adapter

KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def write_adapter(folder, tensors: dict, rank: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_trained_adapter_passes(tmp_path):
    adapter = write_adapter(tmp_path, {f"{KEY}.lora_A.weight": torch.randn(4, 64), f"{KEY}.lora_B.weight": torch.randn(64, 4)})
    assert validate_adapter(adapter) == "2 tensors, 512 parameters, valid"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({f"{KEY}.lora_A.weight": torch.empty(0), f"{KEY}.lora_B.weight": torch.empty(0)}, "is empty (0,)"),
        (
            {f"{KEY}.lora_A.weight": torch.randn(4, 64), f"{KEY}.lora_B.weight": torch.zeros(64, 4)},
            "every lora_B still holds its initial value",
        ),
        ({f"{KEY}.lora_A.weight": torch.randn(8, 64), f"{KEY}.lora_B.weight": torch.randn(64, 8)}, "expected rank 4 rows"),
        ({}, "holds no tensors"),
    ],
)
def test_broken_adapters_are_refused_with_the_reason(tmp_path, tensors, message):
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_adapter(write_adapter(tmp_path, tensors))


def test_missing_adapter_file_is_named(tmp_path):
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        validate_adapter(tmp_path)


@pytest.mark.e2e
def test_failing_ranks_are_reported_with_their_log_lines(tmp_path, tiny_assets):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_assets["model"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    recipe = write_recipe(tmp_path, tiny_recipe_text({**tiny_assets, "model": broken}))
    result = run_launch(recipe, "--run-dir", tmp_path / "run")
    assert result.returncode == 1
    assert "training failed" in result.stdout
    for rank in (0, 1):
        assert (
            f"rank{rank} failed: safetensors._safetensors_rust.SafetensorError: Error while deserializing header" in result.stdout
        )
        assert f"last lines of {tmp_path / 'run' / 'logs' / f'rank{rank}.log'}" in result.stdout
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["state"] == "failed"
    assert not (tmp_path / "run" / "adapter").exists()
