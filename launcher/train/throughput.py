"""Model FLOPs utilisation: the FLOPs a step's tokens need over what the devices could do.

FLOPs per token of PEFT training, as the PaLM paper counts (matmuls only, attention's score products
and recomputation by gradient checkpointing not counted): the frozen base costs its forward (2 per
weight) and the backward to its inputs (2 more), its weight gradients are never computed; the trainable
adapter costs all three (6). The input embedding is a lookup, not a matmul, and is left out.

The peak is the GPU's dense bf16 datasheet figure (config/hardware.GPU_PEAK_TFLOPS); on a CPU it is
measured here: the best of a few square matmuls in the training dtype on the rank's threads, cached
per (CPU model, dtype, threads) in the launcher's cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from launcher.config.hardware import gpu_peak_flops
from launcher.train.packing import cache_dir, store

MATMUL_SIZE = 1024


def flops_per_token(model) -> float:
    """4 x frozen weights + 6 x trainable ones, the input embedding left out (ZeRO-3 partitions counted whole)."""
    trainable, total = model.get_nb_trainable_parameters()
    embedding = model.get_input_embeddings().weight
    lookups = getattr(embedding, "ds_numel", None) or embedding.numel()
    return 4.0 * (total - trainable - lookups) + 6.0 * trainable


def peak_flops(device: str, dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from); (None, why) when unknown."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name)
        return peak, f"{name} datasheet" if peak else f"{name} is not in the table of peaks"
    threads = torch.get_num_threads()
    key = f"{cpu_model()}|{dtype}|{threads}".replace("/", "_")
    path = cache_dir() / "peak" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    try:
        recorded = json.loads(path.read_text())
        if recorded.get("key") == key:
            return recorded["flops"], recorded["source"]
    except (OSError, ValueError):
        pass
    flops = measured_matmul_flops(dtype)
    source = f"measured: {MATMUL_SIZE}x{MATMUL_SIZE} {str(dtype).removeprefix('torch.')} matmul on {threads} threads"
    store(path, {"key": key, "flops": flops, "source": source})
    return flops, source


def measured_matmul_flops(dtype, tries: int = 5) -> float:
    import torch

    own = torch.Generator().manual_seed(0)  # not the global RNG, which the seeded training draws from
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=own).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=own).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * MATMUL_SIZE**3 / best


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "cpu")


def mfu(tokens_per_second: float, world: int, per_token: float, peak: float | None) -> float | None:
    """The fraction of the devices' peak that the step's tokens used."""
    if not peak or not world:
        return None
    return tokens_per_second / world * per_token / peak
