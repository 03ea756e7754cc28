"""What a model's own (remote) code needs, in one place, keyed by config.model_type.

The launcher asks this registry instead of special-casing model names elsewhere: pre-flight
refuses what a model cannot do, rendering aliases config keys DeepSpeed's "auto" values need,
loading repairs what transformers 5 leaves broken, and generation / tokenization follow the
model's rules. Each quirk says why; FACTS.md records how it was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Quirks:
    hidden_size_key: str = "hidden_size"
    """Config key holding the hidden size (DeepSpeed's "auto" bucket sizes and the memory estimate)."""
    layers_key: str = "num_hidden_layers"
    """Config key holding the number of layers (memory estimate)."""
    generate_with_cache: bool = True
    """False: generate() must be called with use_cache=False (the model's cache code is broken)."""
    gradient_checkpointing_works: bool = True
    """False: the model's code ignores gradient checkpointing; turning it on saves nothing."""
    prompt_learning: bool = True
    """False: prompt / p-tuning / prefix tuning cannot work (the forward needs input_ids, not embeddings)."""
    padding_side: str | None = None
    """The side the tokenizer must pad on for batched generation and training, when the model insists."""
    pad_token_id: int | None = None
    """Pad id to use when the tokenizer has no pad token and the EOS token is not a good stand-in."""
    environment: dict[str, str] = field(default_factory=dict)
    """Environment the model's code reads at import (set before loading)."""
    rebuild_meta_slopes: bool = False
    """transformers 5 builds models on the meta device: a plain `slopes` tensor made in __init__ stays there."""
    notes: str = ""


REGISTRY: dict[str, Quirks] = {
    "transnormer": Quirks(
        hidden_size_key="decoder_embed_dim",
        layers_key="decoder_layers",
        generate_with_cache=False,
        gradient_checkpointing_works=False,
        prompt_learning=False,
        pad_token_id=0,
        environment={"use_triton": "False"},
        rebuild_meta_slopes=True,
        notes="TransNormerLLM (OpenNLPLab, remote code): linear modules qkvu_proj, out_proj, l1, l2, l3; "
        "use_triton=False selects its PyTorch path on machines without triton kernels",
    ),
    "chatglm": Quirks(
        hidden_size_key="hidden_size",
        layers_key="num_layers",
        padding_side="left",
        notes="ChatGLM2/3 (THUDM, remote code): its tokenizer pads on the left only; linear modules "
        "query_key_value, dense, dense_h_to_4h, dense_4h_to_h",
    ),
}

DEFAULT = Quirks()


def quirks_for(model_type: str | None) -> Quirks:
    return REGISTRY.get(model_type or "", DEFAULT)


def config_value(config, key: str, fallback=None):
    """A config value whether the config is a dict (config.json) or a PretrainedConfig."""
    return config.get(key, fallback) if isinstance(config, dict) else getattr(config, key, fallback)


def hidden_size(config) -> int | None:
    quirks = quirks_for(config_value(config, "model_type"))
    return config_value(config, quirks.hidden_size_key) or config_value(config, "hidden_size")


def set_environment(model_type: str | None) -> None:
    import os

    for name, value in quirks_for(model_type).environment.items():
        os.environ.setdefault(name, value)


def apply_quirks(model) -> None:
    """Repairs after loading: `hidden_size` aliased for DeepSpeed's "auto" values when the config
    names it otherwise, and slopes tensors left on the meta device rebuilt."""
    quirks = quirks_for(getattr(model.config, "model_type", None))
    if getattr(model.config, "hidden_size", None) is None and quirks.hidden_size_key != "hidden_size":
        model.config.hidden_size = hidden_size(model.config)
    if quirks.rebuild_meta_slopes:
        rebuild_meta_slopes(model)


def rebuild_meta_slopes(model) -> int:
    """Recompute every `slopes` tensor still on the meta device with its module's own builder."""
    import torch

    rebuilt = 0
    for module in model.modules():
        slopes = getattr(module, "slopes", None)
        builder = getattr(module, "_build_slope_tensor", None)
        if isinstance(slopes, torch.Tensor) and slopes.is_meta and callable(builder):
            fresh = builder(slopes.shape[0])
            device = next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))
            if isinstance(module._buffers.get("slopes"), torch.Tensor):
                module._buffers["slopes"] = fresh.to(device)
            else:
                module.slopes = fresh.to(device)
            rebuilt += 1
    return rebuilt
