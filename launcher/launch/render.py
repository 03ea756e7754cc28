"""Recipe -> the files a run really uses: recipe.toml, deepspeed.json, accelerate.yaml, manifest.json.

No torch here: rendering and --dry-run answer in about a second.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from launcher.config.hardware import resolve_device
from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.rundir.files import write_atomic
from launcher.rundir.runs import RunDir, archive, new_manifest

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def deepspeed_template(name: str) -> dict[str, Any]:
    path = Path(name) if name.endswith(".json") else DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise UserError([f"distributed.deepspeed: no template {name!r}; use one of {known} or a path to a .json file"])
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError([f"{path}:{err.lineno}: invalid JSON in DeepSpeed template: {err.msg}"]) from None


def render_deepspeed(recipe: Recipe) -> dict[str, Any]:
    """Template + recipe overrides, with every "auto" replaced by the recipe's value.

    Concrete values (not "auto") keep the file usable on its own and parseable by DeepSpeed.
    """
    config = deep_merge(deepspeed_template(recipe.distributed.deepspeed), recipe.distributed.deepspeed_overrides)
    train = recipe.train
    owned = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * recipe.world_size(),
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in owned.items():
        if config.get(key, "auto") not in ("auto", value):
            raise UserError(
                [
                    f"distributed.deepspeed_overrides.{key}: {config[key]} disagrees with the recipe's {value}; set it in [train] instead"
                ]
            )
        config[key] = value
    for precision in ("bf16", "fp16"):
        config.setdefault(precision, {})["enabled"] = recipe.model.dtype == precision
    return config


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def render_accelerate(recipe: Recipe, run: RunDir, ds_config: dict[str, Any]) -> dict[str, Any]:
    """An accelerate config that `accelerate launch --config_file` takes as it is.

    mixed_precision is left out on purpose: accelerate refuses it next to a DeepSpeed file,
    which owns precision.
    """
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "deepspeed_config_file": str(run.deepspeed_config.resolve()),
            "zero3_init_flag": zero_stage(ds_config) == 3,
        },
        "machine_rank": 0,
        "num_machines": recipe.distributed.nodes,
        "num_processes": recipe.world_size(),
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": resolve_device(recipe.distributed.device) == "cpu",
        "main_training_function": "main",
        "debug": False,
    }


def worker_command(run: RunDir) -> list[str]:
    """How the workers are started: also the command a user can run by hand from the run dir's files."""
    return [
        "accelerate",
        "launch",
        "--config_file",
        str(run.accelerate_config.resolve()),
        "-m",
        "launcher.train.worker",
        str(run.root.resolve()),
    ]


def rendered_files(recipe: Recipe, run: RunDir) -> dict[Path, str]:
    ds_config = render_deepspeed(recipe)
    return {
        run.recipe: tomli_w.dumps(recipe.to_dict()),
        run.deepspeed_config: json.dumps(ds_config, indent=2) + "\n",
        run.accelerate_config: yaml.safe_dump(render_accelerate(recipe, run, ds_config), sort_keys=True),
    }


def render_run(recipe: Recipe, run: RunDir) -> list[Path]:
    """Write the rendered files; an existing file with other content is refused, never replaced
    (one that differs only by where the run dir was before it was moved is re-rendered, the old kept)."""
    files = rendered_files(recipe, run)
    for path, text in files.items():
        keep_or_refuse(run, path, text)
    for path, text in files.items():
        if not path.exists():
            write_atomic(path, text)
    run.create_manifest(new_manifest(recipe, worker_command(run)))
    return [*files, run.manifest_path]


def keep_or_refuse(run: RunDir, path: Path, text: str) -> None:
    """An existing rendered file stays when it holds `text`; when it differs only by the run dir's
    old location (the run dir was moved or copied) it is moved to history/ to be rendered again;
    any other difference is refused."""
    if not path.exists():
        return
    old = path.read_text()
    if old == text:
        return
    root = str(run.root.resolve())
    before = run.manifest().worker_command[-1:] if run.manifest_path.is_file() else []
    if before and before[0] != root and old.replace(before[0], root) == text:
        archive(run, [path])
        print(f"{path}: the run dir was moved from {before[0]}; rendered again (the old file is in history/)")
        return
    raise UserError(
        [
            f"{path}: differs from what this recipe renders now (edited by hand, or a ds_configs/ template changed?); "
            f"restore it or start a new run with --run-dir"
        ]
    )
