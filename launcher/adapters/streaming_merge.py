"""Merge an adapter into its base model one safetensors shard at a time.

PEFT's merge_and_unload needs the whole model in memory; this reads each base shard, adds the
deltas of the weights in it (LoRA incl. rsLoRA and DoRA's magnitudes, AdaLoRA, IA3 scales),
writes the merged shard, and lets it go, so the peak stays near one shard plus the adapter. The output is a plain transformers
checkpoint (same shard names and index), with config, generation config and tokenizer copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from launcher.config import methods
from launcher.errors import UserError
from launcher.models.loading import TORCH_DTYPES, meta_model
from launcher.rundir.runs import peak_rss_mib

PREFIX = "base_model.model."


def base_files(base: str, revision: str | None = None) -> Path:
    """A local directory with the base model's files (a hub id is resolved through the cache)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            base, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]
        )
    )


def shard_names(base_dir: Path) -> list[str]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(
        f"{base_dir}: no model.safetensors or model.safetensors.index.json (streaming merge "
        f"reads safetensors only; re-save the base with save_pretrained)"
    )


def transposed_modules(base_dir: Path, trust_remote_code: bool = False) -> set[str]:
    """Names of the base's modules that store their weight as (in, out): transformers' Conv1D (GPT-2).

    The adapter's own fan_in_fan_out cannot say it: a quantized base (qlora, lora-8bit) has its
    Conv1D layers turned into Linear by bitsandbytes, so their adapters are saved as for (out, in),
    while the unquantized base they merge into keeps (in, out). The model is built on the meta
    device from its config, which allocates nothing."""
    from transformers.pytorch_utils import Conv1D

    model = meta_model(str(base_dir), trust_remote_code=trust_remote_code)
    return {name for name, module in model.named_modules() if isinstance(module, Conv1D)}


def adapter_updates(adapter_dir: Path, transposed: set[str] = frozenset()):
    """{base weight name: function(weight in fp32) -> merged weight in fp32} from an adapter;
    `transposed` names the modules whose base weight is stored (in, out).
    Each delta is computed when its weight's shard is merged, so only one lives at a time."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = {k.removeprefix(PREFIX): v.float() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    kind = config["peft_type"]
    spec = methods.of_peft_type(kind)
    if spec is None or not spec.merges:
        raise UserError(f"{adapter_dir}: {kind} adapters hold no weight deltas and cannot be merged")
    modules = {name.split(".lora_")[0].split(".ia3_l")[0] for name in tensors}
    part = lambda module, what: tensors.get(f"{module}.{what}.weight", tensors.get(f"{module}.{what}"))  # noqa: E731
    updates = {}
    for module in sorted(modules):
        flip = module in transposed
        if spec.delta == "scale":  # IA3
            scale = part(module, "ia3_l")  # (1, in) for feed-forward modules (scales the input), else (out, 1)
            if scale is not None:
                feedforward = scale.shape[0] == 1
                scale = scale.reshape(1, -1) if feedforward else scale.reshape(-1, 1)
                weight_scale, bias_scale = (scale.T if flip else scale), scale.reshape(-1)
                updates[f"{module}.weight"] = lambda w, s=weight_scale: w * s
                if not feedforward:  # an output scale scales the bias too (the base layer's whole output)
                    updates[f"{module}.bias"] = lambda bias, s=bias_scale: bias * s
            continue
        a, b = part(module, "lora_A"), part(module, "lora_B")
        if a is None or b is None or a.shape[0] == 0:  # AdaLoRA may prune a layer to rank 0: nothing to add
            continue
        if spec.delta == "low-rank":
            a = a * lora_scaling(config, module, a.shape[0])
            magnitude = part(module, "lora_magnitude_vector")  # DoRA
            if magnitude is not None:
                updates[f"{module}.weight"] = lambda w, a=a, b=b, m=magnitude, t=flip: dora_merged(w, a, b, m, t)
                continue
        else:  # "svd-low-rank", AdaLoRA: B (A * E) * alpha / init_r (pruning keeps the scale: peft's ranknum stays init_r)
            start_rank = config.get("init_r") or a.shape[0]
            a = a * part(module, "lora_E") * (config["lora_alpha"] or start_rank) / (start_rank + 1e-5)
        updates[f"{module}.weight"] = lambda w, a=a, b=b, t=flip: w.add_((b @ a).T if t else b @ a)
    if not updates:
        raise UserError(f"{adapter_dir}: no mergeable tensors found")
    return updates


def dora_merged(weight, a, b, magnitude, transposed: bool):
    """DoRA: W + BA rescaled so that each output row's norm is the learned magnitude, as PEFT merges it."""
    rows = (weight.T if transposed else weight) + b @ a
    rows = rows * (magnitude.reshape(-1) / rows.norm(dim=1)).reshape(-1, 1)
    return rows.T if transposed else rows


def lora_scaling(config: dict, module: str, rank: int) -> float:
    alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if module.endswith(k)), config["lora_alpha"])
    return alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank


def stream_merge(
    base: str,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str = "fp32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Write the merged model into out_dir (which must not exist); return what was done and the peak RSS."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, adapter_dir, out_dir = base_files(base, revision), Path(adapter_dir), Path(out_dir)
    updates = adapter_updates(adapter_dir, transposed_modules(base_dir, trust_remote_code))
    out_dir.mkdir(parents=True)
    target = getattr(torch, TORCH_DTYPES[dtype])
    merged = 0
    for shard in shard_names(base_dir):
        tensors = {}
        with safe_open(str(base_dir / shard), framework="pt") as reader:
            metadata = reader.metadata() or {"format": "pt"}
            for name in reader.keys():
                weight = reader.get_tensor(name)
                if name in updates:
                    weight, merged = updates.pop(name)(weight.float()).to(target), merged + 1
                elif weight.is_floating_point():
                    weight = weight.to(target)
                tensors[name] = weight.contiguous()
        save_file(tensors, str(out_dir / shard), metadata=metadata)
        del tensors
    missing = [name for name in updates if not name.endswith(".bias")]  # a scaled layer may have no bias
    if missing:
        raise UserError(
            f"{adapter_dir}: {len(missing)} adapted weights not found in {base_dir} "
            f"(first: {missing[0]}); is this the adapter's base model?"
        )
    copy_side_files(base_dir, out_dir, dtype)
    return {"merged_weights": merged, "shards": len(shard_names(base_dir)), "peak_rss_mib": peak_rss_mib()}


def copy_side_files(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """Config (with the merged dtype), index, generation config, tokenizer files."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and not path.name.endswith(".bin"):
            shutil.copy2(path, out_dir / path.name)
    config_path = out_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = TORCH_DTYPES[dtype]
        config_path.write_text(json.dumps(config, indent=2) + "\n")
