"""Every command answers a user's mistake with one line and exit code 2, never a traceback, and
leaves nothing half-written behind. The run dir is rendered (no training) and adapters are
written by hand: the cases need no trained model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe_text, write_recipe
from safetensors.torch import save_file

from launcher.cli import main

LAYER = "base_model.model.model.layers.0"


def write_adapter(folder, modules: list[str], lora_b: float, base: str = "tiny-base"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": base})
    )
    tensors = {}
    for module in modules:
        tensors[f"{LAYER}.{module}.lora_A.weight"] = torch.ones(2, 64)
        tensors[f"{LAYER}.{module}.lora_B.weight"] = torch.full((64, 2), lora_b)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def rendered_run(tmp_path_factory, tiny_assets):
    folder = tmp_path_factory.mktemp("errors")
    recipe = write_recipe(folder, tiny_recipe_text(tiny_assets))
    assert main([str(recipe), "--dry-run", "--run-dir", str(folder / "run")]) == 0
    (folder / "not-a-run").mkdir()
    return folder


def run_dir_with(folder, name: str, adapter_kind: str | None):
    """A copy of the rendered run whose adapter/ is untrained, for another base, or absent."""
    import shutil

    run = folder / name
    if not run.exists():
        shutil.copytree(folder / "run", run)
        if adapter_kind == "untrained":
            write_adapter(run / "adapter", ["self_attn.q_proj"], lora_b=0.0)
        elif adapter_kind == "other-base":
            write_adapter(run / "adapter", ["mlp.fc_in"], lora_b=0.5)
    return run


CASES = {
    "merge, untrained adapter": (["merge", "{untrained}"], "every lora_B still holds its initial value"),
    "merge, adapter of another base": (["merge", "{other_base}"], "is this the adapter's base model?"),
    "merge, no adapter yet": (["merge", "{no_adapter}"], "no final adapter yet"),
    "merge, missing checkpoint": (["merge", "{no_adapter}", "--checkpoint", "7"], "is not a complete checkpoint"),
    "merge, not a run": (["merge", "{not_a_run}"], "not a run dir (no recipe.toml)"),
    "combine, different bases": (
        ["merge", "--adapters", "{adapter_a}", "{adapter_b}", "--weights", "0.5", "0.5", "--out", "{out}"],
        "trained on different base models",
    ),
    "eval, no adapter yet": (["eval", "{no_adapter}"], "no final adapter yet"),
    "eval, not a run": (["eval", "{not_a_run}"], "neither a run dir (recipe.toml) nor an adapter folder"),
    "status, not a run": (["status", "{not_a_run}"], "not a run dir (no manifest.json)"),
    "logs, not a run": (["logs", "{not_a_run}"], "not a run dir (no manifest.json)"),
    "cancel, not a run": (["cancel", "{not_a_run}"], "not a run dir (no manifest.json)"),
    "cancel, nothing running": (["cancel", "{no_adapter}"], "no running job to cancel"),
    "run, unknown key": (["{recipe}", "--dry-run", "--set", "train.learning_rat=1"], "did you mean train.learning_rate?"),
    "check, missing recipe": (["check", "{not_a_run}/nope.toml"], "recipe file not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_one_line_and_exit_code_2(case, rendered_run, capsys):
    args, message = CASES[case]
    folder = rendered_run
    places = {
        "untrained": run_dir_with(folder, "untrained", "untrained"),
        "other_base": run_dir_with(folder, "other-base", "other-base"),
        "no_adapter": run_dir_with(folder, "no-adapter", None),
        "not_a_run": folder / "not-a-run",
        "adapter_a": write_adapter(folder / "a", ["self_attn.q_proj"], 0.5, base="one"),
        "adapter_b": write_adapter(folder / "b", ["self_attn.q_proj"], 0.5, base="two"),
        "out": folder / "combined",
        "recipe": folder / "recipe.toml",
    }
    capsys.readouterr()
    code = main([arg.format(**{k: str(v) for k, v in places.items()}) for arg in args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.out + captured.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in captured.out + captured.err
    for run in ("untrained", "other-base", "no-adapter"):  # a refused merge leaves nothing behind
        assert not (folder / run / "merged").exists() and not (folder / run / "merged.partial").exists()
    assert not (folder / "combined").exists()


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    """Not a user's mistake: the CLI does not turn it into a tidy line."""
    import launcher.cli

    def broken(args, console):
        raise RuntimeError("a bug")

    monkeypatch.setattr(launcher.cli, "command_status", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["status", str(tmp_path)])
