"""The speed settings of [train] resolved for the device a rank runs on: attention implementation,
AdamW kernel, Liger kernels, torch.compile. "auto" picks what is right for the device; a GPU-only
choice on a CPU is refused by pre-flight with one line (knob_problems), never silently dropped."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from launcher.config.recipe import Recipe


@dataclass(frozen=True)
class Knobs:
    attention: str | None  # None: the model's own default (sdpa where its code has it)
    optimizer: str  # TrainingArguments.optim
    liger: bool
    compile: bool

    def line(self) -> str:
        return (
            f"kernels: attention {self.attention or 'model default'}, optimizer {self.optimizer}, "
            f"liger {'on' if self.liger else 'off'}, torch.compile {'on' if self.compile else 'off'}"
        )


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_knobs(recipe: Recipe, device: str) -> Knobs:
    t, cuda = recipe.train, device == "cuda"
    attention = t.attention if t.attention != "auto" else ("flash_attention_2" if cuda and installed("flash_attn") else None)
    fused = t.optimizer in ("adamw_fused", "auto")  # torch fuses AdamW on CUDA and CPU alike
    liger = t.liger_kernels if t.liger_kernels is not None else cuda and installed("liger_kernel")
    return Knobs(attention, "adamw_torch_fused" if fused else "adamw_torch", bool(liger), t.compile)


def knob_problems(recipe: Recipe, device: str) -> list[str]:
    """One line per [train] speed setting this device (or this environment) cannot honour."""
    t, problems = recipe.train, []
    if t.attention == "flash_attention_2":
        if device != "cuda":
            problems.append('train.attention: flash_attention_2 runs on CUDA GPUs only; use "sdpa" (or "auto") on CPU')
        elif not installed("flash_attn"):
            problems.append('train.attention: flash_attention_2 needs flash-attn: pip install flash-attn (or use "auto")')
    if t.liger_kernels:
        if device != "cuda":
            problems.append("train.liger_kernels: Liger's kernels are Triton GPU kernels; set it to false (or remove it) on CPU")
        elif not installed("liger_kernel"):
            problems.append("train.liger_kernels: needs liger-kernel: pip install liger-kernel (or remove the key)")
    return problems
