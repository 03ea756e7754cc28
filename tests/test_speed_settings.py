"""Speed settings are chosen for the device and said, and what a device cannot do is refused in one
line before anything starts: precision (model.dtype = "auto"), batching, attention, Liger, the
LoRA variants' limits."""

from __future__ import annotations

import re

import pytest
from conftest import run_launch, tiny_recipe_text, write_recipe

from launcher.config import hardware
from launcher.config.recipe import load_recipe
from launcher.errors import UserError
from launcher.launch.preflight import run_preflight


@pytest.fixture
def machine(monkeypatch):
    """Pretend CPU flags and GPU compute capabilities (this machine's own are whatever CI has)."""

    def pretend(cpu_flags=(), gpus=()):
        monkeypatch.setattr(hardware, "_cpu_flags", lambda: set(cpu_flags))
        monkeypatch.setattr(hardware, "_gpu_capabilities", lambda: tuple(gpus))

    return pretend


@pytest.mark.parametrize(
    "device, flags, gpus, dtype, why",
    [
        ("cpu", {"avx2", "amx_bf16", "avx512_bf16"}, (), "bf16", "AMX-BF16"),
        ("cpu", {"avx2", "avx512_bf16"}, (), "bf16", "AVX512-BF16"),
        ("cpu", {"avx2", "avx512f"}, (), "fp32", "no bf16 instructions"),
        ("cuda", (), (9.0, 9.0), "bf16", "compute capability 9.0"),
        ("cuda", (), (7.0,), "fp32", "before Ampere"),
        ("cuda", (), (), "bf16", "no GPU is visible here"),
    ],
)
def test_auto_precision_is_bf16_where_the_hardware_has_it(machine, device, flags, gpus, dtype, why):
    machine(flags, gpus)
    chosen, reason = hardware.resolve_dtype(device)
    assert chosen == dtype and why in reason


def test_the_run_records_the_chosen_precision_and_pre_flight_says_why(machine, tmp_path, tiny_assets):
    machine({"avx512_bf16"})
    text = tiny_recipe_text(tiny_assets).replace('dtype = "fp32"\n', "")
    recipe = load_recipe(write_recipe(tmp_path, text))
    assert recipe.model.dtype == "bf16" and recipe.to_dict()["model"]["dtype"] == "bf16"  # what the run dir records
    lines = run_preflight(recipe).lines
    assert "precision: bf16 (this CPU has AVX512-BF16 bf16 instructions; set model.dtype to force one)" in lines
    assert any(
        re.match(
            r"batching: packed \(auto: proven on transformers \S+ for llama \(max diff \S+\)\); kernels: attention model default",
            line,
        )
        for line in lines
    ), lines
    machine({"avx2"})
    assert load_recipe(write_recipe(tmp_path, text)).model.dtype == "fp32"
    assert load_recipe(write_recipe(tmp_path, text), ['model.dtype="bf16"']).model.dtype == "bf16"  # forced


def check(tmp_path, tiny_assets, *overrides, extra: str = ""):
    return run_preflight(load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets, extra=extra)), list(overrides)))


@pytest.mark.parametrize(
    "overrides, extra, message",
    [
        (
            ['train.attention="flash_attention_2"', 'distributed.device="cpu"'],
            "",
            'train.attention: flash_attention_2 runs on CUDA GPUs only; use "sdpa" (or "auto") on CPU',
        ),
        (
            ["train.liger_kernels=true", 'distributed.device="cpu"'],
            "",
            "train.liger_kernels: Liger's kernels are Triton GPU kernels; set it to false (or remove it) on CPU",
        ),
        (
            ['data.batching="packed"'],
            '[peft]\nmethod = "prompt-tuning"\n',
            'data.batching: "packed" cannot work here (prompt-tuning puts its virtual tokens before each row, not each example)',
        ),
        (
            ["peft.use_dora=true", 'distributed.deepspeed="zero3"'],
            "",
            "distributed.deepspeed: this LoRA variant cannot run under ZeRO-3 (DoRA's weight norm reads the whole base weight",
        ),
        (
            ['peft.lora_init="olora"', 'eval.checkpoints="all"'],
            "",
            "eval.checkpoints: olora checkpoints hold adapters of the moved base (only the final adapter is converted back",
        ),
    ],
)
def test_what_cannot_work_here_is_refused_in_one_line(tmp_path, tiny_assets, overrides, extra, message):
    report = check(tmp_path, tiny_assets, *overrides, extra=extra)
    assert any(error.startswith(message) for error in report.errors), report.errors


def test_packing_one_example_per_micro_batch_is_pointed_out(tmp_path, tiny_assets):
    report = check(tmp_path, tiny_assets, "train.micro_batch_size=1")
    assert any("packed with train.micro_batch_size = 1 has nothing to pack" in w for w in report.warnings)
    assert not check(tmp_path, tiny_assets).warnings


def test_pissa_on_a_quantized_base_is_refused_by_the_recipe(tmp_path, tiny_assets):
    with pytest.raises(UserError) as caught:
        load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), ['peft.method="qlora"', 'peft.lora_init="pissa"'])
    assert caught.value.lines == [
        'peft.lora_init: pissa starts from the base\'s full-precision weights, which qlora quantizes; use method = "lora" or another lora_init'
    ]


def test_the_cli_refuses_a_gpu_only_kernel_on_cpu_with_exit_2(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    result = run_launch("check", recipe, "--set", 'train.attention="flash_attention_2"', "--set", 'distributed.device="cpu"')
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "train.attention: flash_attention_2 runs on CUDA GPUs only" in " ".join(result.stdout.split())


def test_lora_plus_gives_b_its_ratio_of_the_learning_rate(tmp_path, tiny_assets):
    from transformers import Trainer, TrainingArguments

    from launcher.models.loading import load_training_model
    from launcher.train.trainers import with_lora_plus

    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), ["peft.lora_plus_ratio=16.0"])
    model = load_training_model(recipe, 12, "cpu")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=3e-3, use_cpu=True, report_to="none")
    optimizer = with_lora_plus(Trainer, recipe)(model=model, args=args).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {("lora_B" in names[id(p)]): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates == {False: 3e-3, True: pytest.approx(16 * 3e-3)}
