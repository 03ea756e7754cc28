"""The final adapter: validation (no silent empty ZeRO-3 adapters) and merging into the base model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from launcher.adapters.streaming_merge import stream_merge
from launcher.config import methods
from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.models.loading import load_tokenizer
from launcher.rundir.checkpoints import is_complete
from launcher.rundir.runs import RunDir, check_replaceable, publish, stage_record, staging_for

PROBE_FILE = "launcher-probe.safetensors"  # the trained model's logits on two examples (worker.trained_probe)


class AdapterError(UserError):
    """The adapter on disk is unusable; the message says what is wrong with which tensor."""


def validate_adapter(adapter_dir: Path, trained: bool = True) -> str:
    """Check every tensor is non-empty, LoRA shapes match the config, and (after training) the
    tensors that start at their identity value moved off it (lora_B / AdaLoRA's lora_E from 0,
    IA3's scales from 1): an adapter that did not change is refused."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    config_path = adapter_dir / "adapter_config.json"
    for path in (weights, config_path):
        if not path.is_file():
            raise AdapterError(f"{path}: missing; the adapter was not saved")
    config = json.loads(config_path.read_text())
    spec = methods.of_peft_type(config.get("peft_type"))
    rank = config.get("r") if spec and spec.fixed_rank else None  # AdaLoRA's ranks vary by layer
    identity = spec.identity if spec else None
    moved, count, params = False, 0, 0
    with safe_open(str(weights), framework="pt") as tensors:
        names = list(tensors.keys())
        if not names:
            raise AdapterError(f"{weights}: holds no tensors (the ZeRO-3 empty-adapter failure); nothing to save")
        for name in names:
            tensor = tensors.get_tensor(name)
            if tensor.numel() == 0 and not (spec and spec.prunes_ranks and pruned_away(config, name)):
                raise AdapterError(
                    f"{weights}: tensor {name} is empty {tuple(tensor.shape)} "
                    "(ZeRO-3 saved a shard placeholder; set stage3_gather_16bit_weights_on_model_save)"
                )
            check_lora_shape(weights, name, tensor, rank)
            if identity and identity[0] in name:
                moved = moved or bool((tensor.float() - identity[1]).abs().max() > 0)
            count, params = count + 1, params + tensor.numel()
    if trained and identity and not moved:
        raise AdapterError(f"{weights}: every {identity[0]} still holds its initial value: training did not change the adapter")
    return f"{count} tensors, {params} parameters, valid"


def pruned_away(config: dict, name: str) -> bool:
    """A layer pruned to rank 0 (AdaLoRA): its saved tensors are empty by design (rank_pattern says so)."""
    pattern = config.get("rank_pattern") or {}
    return any(not any(mask) and f"{key.removesuffix('lora_E')}lora_" in name for key, mask in pattern.items())


def check_lora_shape(weights: Path, name: str, tensor, rank: int | None) -> None:
    if rank and "lora_A" in name and tensor.shape[0] != rank:
        raise AdapterError(f"{weights}: {name} has shape {tuple(tensor.shape)}, expected rank {rank} rows")
    if rank and "lora_B" in name and tensor.shape[-1] != rank:
        raise AdapterError(f"{weights}: {name} has shape {tuple(tensor.shape)}, expected rank {rank} columns")


def merge_run(recipe: Recipe, run: RunDir, overwrite: bool = False, checkpoint: int | None = None) -> Path:
    """Merge adapter/ (or checkpoints/checkpoint-N's adapter) into the base model, shard by shard,
    and save merged/ (or merged-checkpoint-N/) in plain transformers format; the manifest records
    this process's wall time and peak memory.

    qlora and lora-8bit adapters merge into the unquantized base in model.dtype."""

    started = time.time()
    source, target = run.adapter, run.merged
    if not recipe.peft.spec.merges:
        raise UserError(
            f"{recipe.peft.method} learns virtual tokens, not weight deltas: there is nothing to merge; "
            f"load {run.adapter} with PeftModel instead"
        )
    if checkpoint is None and not run.adapter.exists():
        raise UserError(
            f"{run.adapter}: no final adapter yet; finish training first (launch {run.recipe}), "
            f"or merge a checkpoint with --checkpoint N"
        )
    if checkpoint is not None:
        source, target = run.checkpoint(checkpoint), run.merged_checkpoint(checkpoint)
        if not is_complete(source):
            raise UserError(
                f"--checkpoint {checkpoint}: {source} is not a complete checkpoint; pick N of a "
                f"checkpoints/checkpoint-N with a completion marker"
            )
        source = consolidated_adapter(source, run.rebuilt_adapter(checkpoint))
    done = merge_into_base(recipe, source, target, overwrite)
    record = stage_record(started, merged_weights=done["merged_weights"], shards=done["shards"])
    with run.editing_manifest() as manifest:
        if checkpoint is None:
            manifest.merge = record
        else:
            manifest.checkpoint_merges[str(checkpoint)] = record
    return target


def merge_into_base(recipe: Recipe, adapter: Path, target: Path, overwrite: bool = False) -> dict:
    """Stream-merge a validated adapter into the recipe's base model, published at `target` with a rename."""

    validate_adapter(adapter)
    check_replaceable(target, overwrite)
    staging = staging_for(target)
    staging.rmdir()  # stream_merge creates it
    try:
        m = recipe.model
        done = stream_merge(m.name_or_path, adapter, staging, m.dtype, m.revision, m.trust_remote_code)
        load_tokenizer(recipe).save_pretrained(str(staging))
    except UserError:
        shutil.rmtree(staging, ignore_errors=True)  # nothing of a refused merge stays behind
        raise
    publish(staging, target, replace=overwrite, kind="merged")
    return done


def consolidated_adapter(checkpoint: Path, rebuilt: Path) -> Path:
    """The checkpoint's adapter when it is valid; when it is empty (ZeRO-3 saved without
    stage3_gather_16bit_weights_on_model_save) rebuilt from the checkpoint's DeepSpeed shards
    into `rebuilt` (fp32, from the optimizer's master weights), validated, and returned."""
    from safetensors.torch import save_file

    try:
        validate_adapter(checkpoint)
        return checkpoint
    except AdapterError:
        if (rebuilt / "adapter_model.safetensors").exists():
            return rebuilt  # rebuilt by an earlier merge
        if not (checkpoint / "latest").is_file():  # no DeepSpeed shards to rebuild it from
            raise
    staging = staging_for(rebuilt)
    save_file(tensors_from_zero_shards(checkpoint), str(staging / "adapter_model.safetensors"))
    shutil.copy(checkpoint / "adapter_config.json", staging / "adapter_config.json")
    validate_adapter(staging)
    return publish(staging, rebuilt, kind="adapter rebuilt from ZeRO shards")


def tensors_from_zero_shards(checkpoint: Path) -> dict:
    """The adapter's tensors under PEFT's saved names, gathered from every rank's ZeRO shard."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    peft_type = json.loads((checkpoint / "adapter_config.json").read_text()).get("peft_type")
    spec = methods.of_peft_type(peft_type)
    markers = spec.shard_tensors if spec else ()
    if not markers:
        raise AdapterError(
            f"{checkpoint}: its adapter is empty and a {peft_type} adapter cannot be rebuilt from "
            "ZeRO shards here (LoRA family and IA3 only); resume from it with stage3_gather_16bit_"
            "weights_on_model_save = true and save again"
        )
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), exclude_frozen_parameters=True)
    # The model's names carry the adapter's name ("...lora_A.default.weight"); PEFT saves without it.
    return {
        name.replace(".default.", "."): tensor.contiguous()
        for name, tensor in state.items()
        if any(marker in name for marker in markers)
    }
