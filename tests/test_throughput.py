"""MFU's two halves: FLOPs per token of PEFT training (frozen base 4 per weight, adapter 6, the
embedding lookup left out) and the device's peak (datasheet table for GPUs, measured on a CPU)."""

from __future__ import annotations

from launcher.config.hardware import gpu_peak_flops
from launcher.models.loading import load_pretrained
from launcher.train.throughput import flops_per_token, mfu, peak_flops


def test_flops_per_token_count_the_frozen_base_twice_forward_and_back_and_the_adapter_three_times(tiny_assets):
    import peft
    import torch

    model = load_pretrained(str(tiny_assets["model"]), torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "embed_tokens" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable > 0 and frozen > 0
    assert flops_per_token(model) == 4 * frozen + 6 * trainable
    assert mfu(1000.0, 2, flops_per_token(model), 1e12) == 500.0 * flops_per_token(model) / 1e12
    assert mfu(1000.0, 2, flops_per_token(model), None) is None  # a device without a known peak: no MFU, not 0


def test_the_peaks_are_the_datasheets_for_gpus_and_measured_once_for_this_cpu(tmp_path, monkeypatch):
    import torch

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989.4e12 and gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Some Future GPU") is None
    monkeypatch.setenv("LAUNCHER_CACHE_DIR", str(tmp_path))
    measured, source = peak_flops("cpu", torch.float32)
    assert 1e8 < measured < 1e14 and source.startswith("measured: 1024x1024 float32 matmul")
    assert peak_flops("cpu", torch.float32) == (measured, source) and len(list((tmp_path / "peak").iterdir())) == 1


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """Rank 0 measures a CPU's peak once per machine: drawing from the global RNG there shifted rank 0's
    seeded data order against the other ranks' (and against a run on a machine that had measured)."""
    import torch

    from launcher.train.throughput import measured_matmul_flops

    torch.manual_seed(1)
    want = torch.rand(3)
    torch.manual_seed(1)
    measured_matmul_flops(torch.float32, tries=1)
    assert torch.equal(torch.rand(3), want)
