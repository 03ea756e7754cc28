"""Pre-flight: what can be known before the queue, without loading a weight.

`launch check` prints this report and every submission runs it first. It builds the model on
the meta device from its config, checks the adapter's target modules against the real module
names, the method against the compatibility matrix (COMPATIBILITY, also README's table), the
batch arithmetic against the data, and estimates per-device memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config.hardware import resolve_device
from launcher.config.knobs import knob_problems, resolve_knobs
from launcher.config.methods import MOVES_THE_BASE, variant_zero3_refusal
from launcher.config.quirks import config_value, hidden_size, quirks_for
from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.evaluate.benchmarks import benchmark_spec
from launcher.launch.render import render_deepspeed, zero_stage
from launcher.models.loading import meta_model as build_on_meta
from launcher.models.loading import model_type, planned_steps
from launcher.models.remote_code import load_config, tokenizer_class, unknown_revision
from launcher.tracking.trackers import tracking_problems
from launcher.train.packing import batching_problems, choose_batching

# (what, rule) rows of README's compatibility table; `compatibility_problems` enforces them.
COMPATIBILITY = [
    ("prefix-tuning × gradient checkpointing", "refused: peft feeds the prefix as past key/values, which recomputation breaks"),
    (
        "prompt-tuning / p-tuning / prefix-tuning × merge",
        "not merged: virtual tokens are no weight delta; exported as an adapter",
    ),
    ("prompt family × models whose forward needs input_ids (TransNormer)", "refused (quirks registry)"),
    (
        "qlora, lora-8bit × ZeRO-3",
        "allowed (4-bit storage dtype = model dtype); the quantized base is not "
        "partitioned (no ZeRO-3 ids on its weights): each rank holds all of it",
    ),
    (
        "adalora × ZeRO-3",
        "refused: peft's rank allocator multiplies whole parameters by their gradients; "
        "ZeRO-3 holds shards (it fails: shape [6, 1] vs [6, 0])",
    ),
    ("adalora × ZeRO-2", "allowed: allocation runs before DeepSpeed's step on the full gradients"),
    ("gradient checkpointing × models that ignore it (TransNormer)", "warned: it saves nothing"),
    ("LoRA family, ia3 × merge", "merged (qlora and lora-8bit into the unquantized base in model.dtype)"),
]


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    memory_bytes: float | None = None  # the per-device estimate, when the model could be built


def compatibility_problems(recipe: Recipe, stage: int, model_type: str | None) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the method × ZeRO stage × quantization × checkpointing × model."""
    method, errors, warnings = recipe.peft.method, [], []
    quirks = quirks_for(model_type)
    checkpointing = recipe.train.gradient_checkpointing
    spec = recipe.peft.spec
    if spec.checkpointing_refusal and checkpointing:
        errors.append(f"train.gradient_checkpointing: {method} cannot recompute activations ({spec.checkpointing_refusal})")
    if spec.prompt_learning and not quirks.prompt_learning:
        errors.append(
            f"peft.method: {method} does not work with {model_type} models (their forward needs input_ids, "
            f"not embeddings); use lora or ia3"
        )
    if spec.zero3_refusal and stage == 3:
        errors.append(f"distributed.deepspeed: {method} cannot run under ZeRO-3 ({spec.zero3_refusal}); use zero2")
    variant = variant_zero3_refusal(recipe)
    if variant and stage == 3:
        errors.append(f"distributed.deepspeed: this LoRA variant cannot run under ZeRO-3 ({variant}); use zero2")
    if recipe.peft.lora_init in MOVES_THE_BASE and recipe.eval.checkpoints == "all":
        errors.append(
            f"eval.checkpoints: {recipe.peft.lora_init} checkpoints hold adapters of the moved base (only the final "
            f'adapter is converted back to the original base); set it to "final"'
        )
    if checkpointing and not quirks.gradient_checkpointing_works:
        warnings.append(f"train.gradient_checkpointing: {model_type}'s code ignores it, so it saves no memory")
    return errors, warnings


def meta_model(recipe: Recipe, report: Report):
    """The model built on the meta device from its config (no weights), or None with a one-line
    error: its config cannot be had (not local, not cached, hub unreachable: the ranks would fail
    the same way, minutes later), or its code cannot be imported or constructed."""

    m = recipe.model
    try:
        load_config(m.name_or_path, m.revision, m.trust_remote_code)
    except Exception as err:  # offline hub, unknown id, remote code refused: the ranks could not load it either
        report.errors.append(unreachable_model(m.name_or_path, m.revision, err))
        return None
    try:
        return build_on_meta(m.name_or_path, m.revision, m.trust_remote_code)
    except ImportError as err:
        missing = f"imports {err.name}, which is not installed here: pip install {err.name}" if err.name else first_line(err)
        report.errors.append(f"model: the code of {m.name_or_path} {missing}")
    except Exception as err:
        why = f"{type(err).__name__}: {first_line(err)}"
        if "meta" in why:  # its code cannot run on the meta device, which says nothing of a real load
            report.warnings.append(
                f"model: {m.name_or_path} cannot be built on the meta device ({why}); module and memory checks skipped"
            )
        else:
            report.errors.append(f"model: {m.name_or_path} cannot be built from its config ({why}); the run could not start")
    return None


def unreachable_model(name: str, revision: str | None, err: BaseException) -> str:
    """One line for a model that cannot be had here, and how to make it reachable."""
    import os

    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    pin = f" --revision {revision}" if revision else ""
    return (
        f"model: {name} cannot be loaded here ({type(err).__name__}: {first_line(err)}); download it where every "
        f"node can read it (HF_HOME={cache} on a shared filesystem, then `hf download {name}{pin}`) or set "
        f"model.name_or_path to a local folder"
    )


def revision_warnings(recipe: Recipe, model, model_type: str | None) -> list[str]:
    """A warning when the model's remote code is not a revision the quirks registry was tested with."""

    m = recipe.model
    classes = [type(model)]
    try:
        classes.append(tokenizer_class(m.name_or_path, m.revision, m.trust_remote_code, model_type))
    except Exception:  # the tokenizer's own check reports it
        pass
    warning = unknown_revision(model_type, [c for c in classes if c is not None])
    return [warning] if warning else []


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:160]


def known_model_type(recipe: Recipe) -> str | None:
    """The model type when its config cannot be loaded as a model (e.g. remote code not available)."""

    try:
        return model_type(recipe)
    except Exception:  # an unreachable hub id: no quirks to apply
        return None


def adaptable_types() -> tuple:
    """Layer types peft's LoRA / IA3 adapt by name: torch linear and convolution layers, and
    transformers' Conv1D (GPT-2's fused projections; quantized layers subclass nn.Linear)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, torch.nn.Conv1d, torch.nn.Conv2d)


def adaptable_modules(model) -> list[tuple[str, object]]:
    """(name, module) of every adaptable layer but the output head."""
    head, kinds = model.get_output_embeddings(), adaptable_types()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds) and module is not head]


def linear_module_names(model) -> list[str]:
    """Distinct last name parts of the model's adaptable layers (what target_modules can name),
    each with its type where it is not nn.Linear."""
    import torch

    found = {}
    for name, module in adaptable_modules(model):
        kind = type(module).__name__
        found[name.rsplit(".", 1)[-1]] = "" if isinstance(module, torch.nn.Linear) else f" ({kind})"
    return [f"{name}{kind}" for name, kind in sorted(found.items())]


def target_problems(recipe: Recipe, model) -> list[str]:
    """One line per target_modules (and ia3 feedforward_modules) entry that matches no module."""
    p = recipe.peft
    if not p.spec.has_targets:
        return []
    wanted = p.target_modules if isinstance(p.target_modules, list) else []
    names = [name for name, _ in model.named_modules()]
    problems = []
    for key in wanted:
        if not any(name == key or name.endswith("." + key) for name in names):
            problems.append(
                f"peft.target_modules: {key!r} matches no module of {recipe.model.name_or_path}; "
                f"its adaptable modules are: {', '.join(linear_module_names(model))}"
            )
    for key in p.feedforward_modules or []:
        if wanted and key not in wanted:
            problems.append(f"peft.feedforward_modules: {key!r} must also be in peft.target_modules")
    return problems


def adapter_parameters(recipe: Recipe, model) -> int | None:
    """Trainable parameters of the recipe's adapter, counted by attaching it to the meta model
    (None when it cannot be attached there; ValueError when peft has no targets for the model)."""
    import copy

    from peft import get_peft_model

    config = recipe.peft.spec.build_config(recipe, max(recipe.train.max_steps, 100))
    try:
        tuned = get_peft_model(copy.deepcopy(model), config)
    except ValueError as err:
        if "target_modules" in str(err):  # peft knows no default targets for this model type
            raise
        return None
    except Exception:  # an adapter peft cannot attach on the meta device: estimate without it
        return None
    return tuned.get_nb_trainable_parameters()[0]


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def memory_estimate(recipe: Recipe, model, adapter: int, stage: int, offload: bool) -> dict[str, float]:
    """Per-device bytes by part (weights, adapter, gradients, optimizer, activations).

    Weights: linear layers at 0.52 byte/parameter for NF4 with double quantization, 1 byte for
    int8, the dtype's size otherwise (embeddings and norms stay in the dtype). ZeRO-3 shards
    weights (and everything else) over the ranks; ZeRO-2 shards gradients and optimizer states;
    offload moves optimizer states (and ZeRO-3 weights) to CPU. Adam keeps an fp32 master copy and
    two moments: 12 bytes per trainable parameter (8 in fp32 training, where the master is the
    weight). Activations per layer follow Korthikanti et al. (sequence × batch × hidden × 34
    bytes in 16-bit, plus attention scores where eager attention keeps them: over the whole packed
    row when packed), two 16-bit tensors per layer with gradient checkpointing, doubled in fp32;
    plus the fp32 logits. A preference pair is two sequences; the reference forward (no gradients)
    adds its fp32 logits.
    """

    size = BYTES[recipe.model.dtype]
    world = recipe.world_size()
    linear = sum(m.weight.numel() for _, m in adaptable_modules(model))
    total = sum(p.numel() for p in model.parameters())
    per_linear = recipe.peft.spec.bytes_per_linear_weight or size
    weights = linear * per_linear + (total - linear) * size
    if stage == 3 and not recipe.peft.spec.quantization:  # quantized bases are not partitioned
        weights = 0.0 if offload else weights / world
    optimizer = adapter * (8 if recipe.model.dtype == "fp32" else 12)
    gradients = adapter * size
    if stage >= 1:
        optimizer = 0.0 if offload else optimizer / world
    if stage >= 2:
        gradients /= world
    config = model.config
    hidden = hidden_size(config) or 0
    layers = config_value(config, quirks_for(config_value(config, "model_type")).layers_key) or 0
    heads = config_value(config, "num_attention_heads") or config_value(config, "decoder_attention_heads") or 1
    goal = recipe.train.objective_spec
    tokens = recipe.train.micro_batch_size * recipe.data.max_length * goal.sequences
    kind = config_value(config, "model_type")
    span = tokens if choose_batching(recipe)[0] == "packed" else recipe.data.max_length  # what one token attends over
    scale = 2 if recipe.model.dtype == "fp32" else 1
    if recipe.train.gradient_checkpointing and quirks_for(kind).gradient_checkpointing_works:
        per_layer = 2 * tokens * hidden * 2
        activations = layers * per_layer + tokens * hidden * 34
    else:
        materialised = recipe.train.attention == "eager" or quirks_for(kind).remote_code  # sdpa / flash keep no scores
        per_layer = tokens * hidden * 34 + (5 * heads * tokens * span if materialised else 0)
        activations = layers * per_layer
    vocab = config_value(config, "vocab_size") or 0
    activations = activations * scale + tokens * vocab * 4 * (3 if goal.reference_forward else 2)
    return {
        "weights": weights,
        "adapter": adapter * size,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
    }


def batch_lines(recipe: Recipe, examples: int, report: Report) -> None:

    t = recipe.train
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * recipe.world_size()
    steps = planned_steps(recipe, examples)
    report.lines.append(
        f"batch: {t.micro_batch_size} per rank x {t.gradient_accumulation_steps} accumulation x "
        f"{recipe.world_size()} ranks = {per_step} examples per step; {examples} training examples; "
        f"{steps} optimizer steps planned"
    )
    if examples < per_step:
        report.warnings.append(
            f"train: one step takes {per_step} examples but the data has {examples}; "
            f"lower train.micro_batch_size or gradient_accumulation_steps"
        )
    if t.save_steps > steps:
        report.warnings.append(
            f"train.save_steps: {t.save_steps} is beyond the {steps} planned steps: no checkpoint "
            f"before the end, so a preemption loses the whole run; lower it"
        )
    report.errors += recipe.peft.spec.plan_problems(recipe.peft, steps)


def speed_lines(recipe: Recipe, report: Report) -> None:
    """What precision, batching and kernels the run will use, and why; what cannot be honoured."""

    device = resolve_device(recipe.distributed.device)
    layout, why = choose_batching(recipe)
    precision = recipe._chosen.get("model.dtype", f"{recipe.model.dtype} (model.dtype)")
    report.lines.append(f"precision: {precision}")
    report.lines.append(f"batching: {layout} ({why}); {resolve_knobs(recipe, device).line()}")
    errors, warnings = batching_problems(recipe)
    report.errors += errors + knob_problems(recipe, device)
    report.warnings += warnings
    if layout == "packed" and recipe.train.micro_batch_size == 1:
        report.warnings.append(
            "data.batching: packed with train.micro_batch_size = 1 has nothing to pack; raise it "
            "(and lower gradient_accumulation_steps) to train faster on the same examples per step"
        )


def benchmark_problems(recipe: Recipe) -> list[str]:
    """A benchmark task that does not exist, found before training rather than after it."""

    e = recipe.eval
    if not (e.enabled and e.benchmarks):
        return []
    try:
        benchmark_spec(e.benchmarks, e.benchmark_tasks_dir, e.benchmark_limit)
    except UserError as err:
        return err.lines
    return []


def gpu_request_warning(recipe: Recipe, queued: bool) -> str | None:
    """A GPU recipe bound for SLURM (`queued`, a profile or several nodes) whose job asks for no GPU:
    its ranks would get none."""
    d = recipe.distributed
    cluster_bound = queued or recipe.slurm.profile or d.nodes > 1
    if not cluster_bound or recipe.slurm.gpus_per_node or not (d.device == "cuda" or d.gpu_memory_gb):
        return None
    return (
        f"slurm.gpus_per_node: this recipe trains on GPUs ({'distributed.device = cuda' if d.device == 'cuda' else 'distributed.gpu_memory_gb'}) "
        f"but its SLURM job asks for none, so its ranks would get no GPU; set slurm.gpus_per_node = {d.procs_per_node} "
        f"(one rank per GPU), with slurm.partition, slurm.cpus_per_task and slurm.mem, best in a site profile "
        f"slurm/profiles/SITE.toml used with --profile SITE"
    )


def run_preflight(recipe: Recipe, examples: int | None = None) -> Report:
    """Every check that needs no weights; `examples` is the training set size when known."""

    report = Report()
    ds_config = render_deepspeed(recipe)
    stage = zero_stage(ds_config)
    offload = bool(ds_config.get("zero_optimization", {}).get("offload_optimizer"))
    model = meta_model(recipe, report)
    model_type = config_value(model.config, "model_type") if model is not None else known_model_type(recipe)
    errors, warnings = compatibility_problems(recipe, stage, model_type)
    m = recipe.model
    if m.trust_remote_code and m.revision and not re.fullmatch(r"[0-9a-f]{40}", m.revision) and not Path(m.name_or_path).exists():
        warnings.append(
            f"model.revision: {m.revision!r} is a branch or tag, so the remote code it runs can change; "
            f"pin the commit you reviewed"
        )
    report.errors += errors
    report.warnings += warnings
    speed_lines(recipe, report)
    tracking_errors, tracking_line = tracking_problems(recipe)
    report.errors += tracking_errors
    report.lines.append(tracking_line)
    report.errors += benchmark_problems(recipe)
    if examples is not None:
        batch_lines(recipe, examples, report)
    if model is None:
        return report
    report.warnings += revision_warnings(recipe, model, model_type)
    report.errors += target_problems(recipe, model)
    if report.errors:
        return report
    try:
        adapter = adapter_parameters(recipe, model)
    except ValueError as err:  # peft knows no default target modules for this model type
        report.errors.append(
            f"peft: {recipe.peft.method} cannot attach to {model_type} models as configured ({first_line(err)}); "
            f"set peft.target_modules to some of: {', '.join(linear_module_names(model))}"
        )
        return report
    if adapter == 0 and recipe.peft.spec.has_targets:
        report.errors.append(
            f"peft: {recipe.peft.method} adapts nothing in {model_type} models (0 trainable parameters); "
            f"set peft.target_modules to some of: {', '.join(linear_module_names(model))}"
        )
        return report
    adapter = adapter or 0
    parts = memory_estimate(recipe, model, adapter, stage, offload)
    total = report.memory_bytes = sum(parts.values())
    report.lines.append(
        f"model: {model_type}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"adapter ({recipe.peft.method}): {adapter:,} trainable"
    )
    report.lines.append(
        f"memory per device (estimate, ZeRO-{stage}{' offload' if offload else ''}): {gib(total)} = "
        + ", ".join(f"{name} {gib(value)}" for name, value in parts.items())
    )
    budget = recipe.distributed.gpu_memory_gb
    if budget and total > budget * 2**30:
        report.warnings.append(
            f"memory: the estimate {gib(total)} exceeds distributed.gpu_memory_gb = {budget}; "
            f"lower train.micro_batch_size or data.max_length, turn on gradient checkpointing, "
            f"or use ZeRO-3 / offload / qlora"
        )
    return report


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**28 else f"{value / 2**20:.1f} MiB"
