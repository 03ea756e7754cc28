"""What each PEFT method needs, in one place, keyed by `peft.method` (as quirks.py is by model type).

Recipe validation asks which [peft] keys a method owns and what its own keys must satisfy;
model loading asks for its quantization and its peft config; pre-flight asks for its ZeRO-3 rule,
its targets, its bytes per base parameter and what its plan of steps must allow; the worker asks
for the callback it trains with; adapter validation asks which tensor must have moved off its
initial value and whether its ranks are fixed or pruned; merge asks whether and how its delta
merges and whether an empty checkpoint adapter can be rebuilt from ZeRO shards; evaluation asks
whether vLLM serves it; `launch merge --adapters` asks whether it combines. Nothing outside this
module tests a method's name: adding a method is one entry here plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.config.recipe import PeftSection, Recipe


def no_problems(*_) -> list[str]:
    return []


@dataclass(frozen=True)
class Method:
    name: str
    keys: tuple[str, ...]
    """Its own [peft] keys (besides `method`); a key of another method is refused."""
    peft_type: str
    """PEFT's peft_type, as written in adapter_config.json."""
    build_config: Callable[[Recipe, int], Any]
    """(recipe, planned optimizer steps) -> the peft config."""
    quantization: str | None = None
    """"4bit" or "8bit": the frozen base is loaded quantized with bitsandbytes."""
    bytes_per_linear_weight: float | None = None
    """Memory of one base linear weight when quantized (None: the model dtype's size)."""
    zero3_refusal: str | None = None
    """Why it cannot run under ZeRO-3 (None: it can)."""
    checkpointing_refusal: str | None = None
    """Why it cannot recompute activations (gradient checkpointing); None: it can."""
    has_targets: bool = True
    """It adapts named modules (peft.target_modules is checked against the model)."""
    prompt_learning: bool = False
    """It learns virtual tokens, fed as embeddings or past key/values (needs a model that takes them)."""
    identity: tuple[str, float] | None = None
    """(tensor name part, initial value): after training some such tensor must differ from it."""
    shard_tensors: tuple[str, ...] = ()
    """Tensor name parts to take from ZeRO shards when a checkpoint's adapter is empty (empty: not rebuildable)."""
    delta: str | None = None
    """How its saved tensors merge into a base weight: "low-rank" (B·A·scale, with DoRA's magnitudes),
    "svd-low-rank" (AdaLoRA's B·(A∘E)·alpha/init_r) or "scale" (IA3's scale of the input or output of a
    layer); None for the prompt family, whose virtual tokens are no weight delta."""
    fixed_rank: bool = False
    """Every lora_A / lora_B has the config's rank r (validation checks the shapes); AdaLoRA's vary by layer."""
    prunes_ranks: bool = False
    """It may prune a layer to rank 0, whose saved tensors are then empty by design (rank_pattern says so)."""
    vllm_serves: bool = False
    """vLLM's LoRA support can serve its adapters (eval.backend = "vllm")."""
    combines: bool = False
    """PEFT's weighted-adapter support can combine its adapters (launch merge --adapters)."""
    recipe_problems: Callable[[PeftSection], list[str]] = no_problems
    """The rules its own [peft] keys must satisfy together: one line each."""
    plan_problems: Callable[[PeftSection, int], list[str]] = no_problems
    """(its [peft] section, planned optimizer steps) -> what that plan cannot do: one line each."""
    training_callback: Callable[[Any], Any] | None = None
    """trainer -> a TrainerCallback it needs while training (AdaLoRA's rank allocator); None: none."""

    @property
    def merges(self) -> bool:
        """Its adapter is a weight delta that merges into the base."""
        return self.delta is not None


def _lora(recipe: Recipe, total_steps: int):
    import peft

    p = recipe.peft
    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules or "all-linear",
        use_dora=p.use_dora,
        use_rslora=p.use_rslora,
        init_lora_weights=LORA_INITS[p.lora_init],
    )


# peft's init_lora_weights per peft.lora_init; PiSSA by fast randomised SVD (4 subspace iterations:
# seconds for a 7B model, where a full SVD takes many minutes), drawn from the seeded RNG.
LORA_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_4", "olora": "olora"}
MOVES_THE_BASE = ("pissa", "olora")  # these subtract the adapter's start from the base weights


def variant_zero3_refusal(recipe: Recipe) -> str | None:
    """Why this LoRA variant cannot run under ZeRO-3 (None: it can)."""
    p = recipe.peft
    if p.use_dora:
        return "DoRA's weight norm reads the whole base weight, ZeRO-3 holds shards of it"
    if p.lora_init in MOVES_THE_BASE:
        return f"{p.lora_init} starts from a decomposition of whole base weights, ZeRO-3 holds shards of them"
    return None


def _adalora_recipe_problems(p: PeftSection) -> list[str]:
    return [f"peft.target_r ({p.target_r}) must not exceed peft.init_r ({p.init_r})"] if p.target_r > p.init_r else []


def _adalora_plan_problems(p: PeftSection, steps: int) -> list[str]:
    tinit, tfinal = p.adalora_steps(steps)
    if tinit + tfinal < steps:
        return []
    return [
        f"peft.tinit + peft.tfinal ({tinit} + {tfinal} steps) must be below the {steps} planned "
        f"steps, or AdaLoRA never allocates ranks; lower them (or give fractions below 1)"
    ]


def _adalora_allocator(trainer):
    """AdaLoRA's rank allocation after every optimizer step, which Trainer never calls.

    Under DeepSpeed the optimizer step happens inside engine.step() (accelerate calls it from
    backward), which also clears the gradients the importance scores need; so the allocation
    runs just before engine.step() (peft reads the full gradients with safe_get_full_grad),
    the masked ranks are written into DeepSpeed's fp32 master copy so the step starts from
    them, and re-applied to the module after the step so the next forward sees them pruned.
    """
    from transformers import TrainerCallback

    class AdaLoraAllocator(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            engine = trainer.model_wrapped
            step = engine.step
            tuner = trainer.model.base_model

            def allocate_then_step(*a, **kw):
                if engine.is_gradient_accumulation_boundary():
                    before = [(p, p.data.clone()) for p in singular_values(trainer.model)]
                    tuner.update_and_allocate(state.global_step)
                    if tuner.peft_config[tuner.trainable_adapter_name].rank_pattern:  # pruning began: the zeros
                        masks = [(p, p.data == 0) for p, _ in before]
                    else:
                        masks = [(p, p.data != old) for p, old in before]  # the entries it just pruned
                    write_master(masks)
                    result = step(*a, **kw)
                    for param, mask in masks:
                        param.data.masked_fill_(mask, 0.0)
                    return result
                return step(*a, **kw)

            engine.step = allocate_then_step

    return AdaLoraAllocator()


def singular_values(model) -> list:
    """AdaLoRA's lora_E parameters: the entries its allocator prunes."""
    return [p for n, p in model.named_parameters() if "lora_E" in n and p.requires_grad]


def write_master(masks: list) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for param, mask in masks:
        master = safe_get_full_fp32_param(param)
        if master is not None and mask.any():
            safe_set_full_fp32_param(param, master.masked_fill(mask.to(master.device), 0.0))


def _prompt_tuning_recipe_problems(p: PeftSection) -> list[str]:
    if (p.prompt_init == "text") != bool(p.prompt_init_text):
        return ['peft.prompt_init_text is needed with prompt_init = "text" and only then']
    return []


def _adalora(recipe: Recipe, total_steps: int):
    import peft

    p = recipe.peft
    tinit, tfinal = p.adalora_steps(total_steps)
    return peft.AdaLoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        init_r=p.init_r,
        target_r=p.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=p.delta_t,
        total_step=total_steps,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules or "all-linear",
    )


def _ia3(recipe: Recipe, total_steps: int):
    import peft

    p = recipe.peft
    return peft.IA3Config(
        task_type=peft.TaskType.CAUSAL_LM, target_modules=p.target_modules, feedforward_modules=p.feedforward_modules
    )


def _prefix(recipe: Recipe, total_steps: int):
    import peft

    p = recipe.peft
    return peft.PrefixTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        num_virtual_tokens=p.num_virtual_tokens,
        prefix_projection=p.prefix_projection,
        encoder_hidden_size=p.encoder_hidden_size,
    )


def _prompt(recipe: Recipe, total_steps: int):
    import peft

    p = recipe.peft
    init = peft.PromptTuningInit.TEXT if p.prompt_init == "text" else peft.PromptTuningInit.RANDOM
    return peft.PromptTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        num_virtual_tokens=p.num_virtual_tokens,
        prompt_tuning_init=init,
        prompt_tuning_init_text=p.prompt_init_text,
        tokenizer_name_or_path=recipe.model.name_or_path,
    )


def _p_tuning(recipe: Recipe, total_steps: int):
    import peft

    p = recipe.peft
    kinds = peft.PromptEncoderReparameterizationType
    return peft.PromptEncoderConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        num_virtual_tokens=p.num_virtual_tokens,
        encoder_reparameterization_type=kinds.LSTM if p.encoder_type == "lstm" else kinds.MLP,
        encoder_hidden_size=p.encoder_hidden_size,
    )


LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora", "lora_init", "lora_plus_ratio")
LORA_TENSORS = ("lora_A", "lora_B", "lora_embedding")
LORA = dict(
    peft_type="LORA",
    build_config=_lora,
    identity=("lora_B", 0.0),
    shard_tensors=LORA_TENSORS,
    delta="low-rank",
    fixed_rank=True,
    vllm_serves=True,
    combines=True,
)
PROMPT = dict(has_targets=False, prompt_learning=True)

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", LORA_KEYS, **LORA),
        # The 4-bit storage dtype equals the model dtype (models.quantization_config), so ZeRO-3 accepts
        # the quantized base; it does not partition it (no ZeRO-3 ids on its weights).
        Method("qlora", (*LORA_KEYS, "quant_type", "double_quant"), quantization="4bit", bytes_per_linear_weight=0.52, **LORA),
        Method("lora-8bit", LORA_KEYS, quantization="8bit", bytes_per_linear_weight=1.0, **LORA),
        Method(
            "adalora",
            ("alpha", "dropout", "target_modules", "init_r", "target_r", "tinit", "tfinal", "delta_t"),
            peft_type="ADALORA",
            build_config=_adalora,
            identity=("lora_E", 0.0),
            zero3_refusal="peft's rank allocator reads and masks whole parameters, ZeRO-3 holds shards of them",
            delta="svd-low-rank",
            prunes_ranks=True,
            recipe_problems=_adalora_recipe_problems,
            plan_problems=_adalora_plan_problems,
            training_callback=_adalora_allocator,
        ),
        Method(
            "ia3",
            ("target_modules", "feedforward_modules"),
            peft_type="IA3",
            build_config=_ia3,
            identity=("ia3_l", 1.0),
            shard_tensors=("ia3_l",),
            delta="scale",
        ),
        Method(
            "prefix-tuning",
            ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
            peft_type="PREFIX_TUNING",
            build_config=_prefix,
            checkpointing_refusal="its prefix is fed as past key/values; set it to false or pick p-tuning / prompt-tuning",
            **PROMPT,
        ),
        Method(
            "prompt-tuning",
            ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
            peft_type="PROMPT_TUNING",
            build_config=_prompt,
            recipe_problems=_prompt_tuning_recipe_problems,
            **PROMPT,
        ),
        Method(
            "p-tuning",
            ("num_virtual_tokens", "encoder_type", "encoder_hidden_size"),
            peft_type="P_TUNING",
            build_config=_p_tuning,
            **PROMPT,
        ),
    )
}

NAMES = tuple(REGISTRY)


def method(name: str) -> Method:
    return REGISTRY[name]


def owners_of(key: str) -> tuple[str, ...]:
    """The methods a [peft] key belongs to."""
    return tuple(m.name for m in REGISTRY.values() if key in m.keys)


def of_peft_type(peft_type: str | None) -> Method | None:
    """The first method saving adapters of this peft_type (validation and merge read it from
    adapter_config.json; lora, qlora and lora-8bit all save LORA adapters)."""
    return next((m for m in REGISTRY.values() if m.peft_type == peft_type), None)


def names_where(test: Callable[[Method], bool]) -> tuple[str, ...]:
    return tuple(m.name for m in REGISTRY.values() if test(m))
