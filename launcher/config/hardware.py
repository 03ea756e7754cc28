"""What this machine computes with, asked without importing torch: the device "auto" means and
the dtype model.dtype = "auto" means (nvidia-smi, /proc/cpuinfo; each asked once per process)."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path


@functools.cache
def resolve_device(device: str) -> str:
    """cpu or cuda, without importing torch: auto means cuda when nvidia-smi lists a GPU (asked once per process)."""
    if device != "auto":
        return device
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "cpu"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if "GPU" in listed else "cpu"


def resolve_dtype(device: str) -> tuple[str, str]:
    """(dtype, why) for model.dtype = "auto" on `device` (cpu or cuda), without importing torch:
    bf16 where the hardware computes in it, fp32 elsewhere."""
    if device == "cuda":
        capabilities = _gpu_capabilities()
        if not capabilities:
            return "bf16", "no GPU is visible here to ask; GPUs from Ampere (A100) on compute in bf16"
        if min(capabilities) >= 8.0:
            return "bf16", f"the GPUs here (compute capability {min(capabilities)}) compute in bf16"
        return "fp32", f"the GPUs here (compute capability {min(capabilities)}, before Ampere) lack bf16"
    flags = _cpu_flags()
    found = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    if found:
        return "bf16", f"this CPU has {found[0].upper().replace('_', '-')} bf16 instructions"
    return "fp32", "this CPU has no bf16 instructions (AVX512-BF16 or AMX)"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@functools.cache
def _gpu_capabilities() -> tuple[float, ...]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(float(line) for line in out.split() if line.replace(".", "", 1).isdigit())


# Dense bf16 (fp16 for V100) tensor-core peaks from the vendors' datasheets, TFLOP/s per GPU: the
# denominator of MFU. Matched against torch.cuda.get_device_name(), first match wins; a GPU not listed
# gets no MFU (tokens/s only). CPUs: measured on the machine (launcher.train.throughput).
GPU_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def gpu_peak_flops(device_name: str) -> float | None:
    """The listed dense peak of this GPU in FLOP/s, or None when it is not in the table."""
    return next((tflops * 1e12 for name, tflops in GPU_PEAK_TFLOPS if name in device_name), None)
