"""What each PEFT method needs, in one place, keyed by `peft.method` (as quirks.py is by model type).

Recipe validation asks which [peft] keys a method owns; model loading asks for its quantization
and its peft config; pre-flight asks for its ZeRO-3 rule, its targets and its bytes per base
parameter; adapter validation asks which tensor must have moved off its initial value; merge
asks whether it merges and whether an empty checkpoint adapter can be rebuilt from ZeRO shards.
Adding a method is one entry here plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.config.recipe import Recipe


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
    merges: bool = True
    """Its adapter is a weight delta that merges into the base."""
    prompt_learning: bool = False
    """It learns virtual tokens, fed as embeddings or past key/values (needs a model that takes them)."""
    identity: tuple[str, float] | None = None
    """(tensor name part, initial value): after training some such tensor must differ from it."""
    shard_tensors: tuple[str, ...] = ()
    """Tensor name parts to take from ZeRO shards when a checkpoint's adapter is empty (empty: not rebuildable)."""


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
LORA = dict(peft_type="LORA", build_config=_lora, identity=("lora_B", 0.0), shard_tensors=LORA_TENSORS)
PROMPT = dict(has_targets=False, merges=False, prompt_learning=True)

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
        ),
        Method(
            "ia3",
            ("target_modules", "feedforward_modules"),
            peft_type="IA3",
            build_config=_ia3,
            identity=("ia3_l", 1.0),
            shard_tensors=("ia3_l",),
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
