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
    """transformers 5 builds models on the meta device: a plain `slopes` tensor made in __init__ stays
    there; it is rebuilt in the model's dtype (transformers 4 made it under the model's default dtype)."""
    remote_code: bool = False
    """The model's code comes with the checkpoint (trust_remote_code): the repairs below apply to it."""
    generation_mixin: bool = False
    """Its causal-LM class does not inherit GenerationMixin, which transformers 5 requires for generate()
    and generation_config: the loaded class is a subclass that adds it."""
    call_post_init: bool = False
    """Its __init__ never calls post_init(), which transformers 5 needs (all_tied_weights_keys): the
    loaded class calls it."""
    config_kept: dict = field(default_factory=dict)
    """Config keys transformers 5's PretrainedConfig drops and the code reads: set from config.json
    (or this default when the file has none)."""
    config_aliases: dict = field(default_factory=dict)
    """Config attributes transformers 5 no longer has that the model's __init__ reads: set from another
    key of the same config while it runs (and removed after: a saved config must not hold them)."""
    tokenizer_prebuilds: tuple = ()
    """(attribute, builder in the tokenizer's module): its __init__ sets the attribute after
    super().__init__(), which transformers 5's constructor already reads; the adapter sets it first."""
    role_tokens: tuple = ()
    """Markers its tokenizer has as single special tokens (ChatGLM3's roles, and the [gMASK] sop prefix
    a chat template writes): in text, each becomes that token ("sop" only right after "[gMASK]") and the
    metadata line after a role is encoded on its own, as the model's build_chat_input does (a tokenizer
    without them, ChatGLM2's, encodes the text unchanged)."""
    pad_drops_padding_side: bool = False
    """Its tokenizer's _pad() lacks the padding_side argument transformers 5 passes on every call."""
    init_takes_device: bool = False
    """Its __init__ places the weights itself (ChatGLM: skip_init, then to_empty on the CPU), ignoring
    `with torch.device("meta")`: a model built on meta (pre-flight, merge) passes device="meta"."""
    own_generation_loop: bool = False
    """Its generate() cannot run on transformers 5 (tuple-cache code handed a DynamicCache): evaluation
    decodes with the launcher's own loop over the model's forward, feeding back the cache its forward
    returns (its own tuples) when generate_with_cache says the cache works."""
    packing_note: str | None = None
    """Why its attention crossed packed examples where it was seen to (said next to the probe's verdict;
    the probe, launcher.train.packing, decides on the installed code, not this note)."""
    random_init: dict = field(default_factory=dict)
    """Keywords its __init__ needs to initialise random weights (ChatGLM skips init by default,
    expecting a checkpoint): used where a model is built without one (the packing probe, test models)."""
    empty_norms: bool = False
    """Its norm weights start as torch.empty and its _init_weights does nothing (ChatGLM's RMSNorm): a
    model built without a checkpoint sets them to 1, else it computes with whatever the memory held
    (the packing probe once proved ChatGLM3 packs, on norm weights that happened to be zeros)."""
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
        remote_code=True,
        generation_mixin=True,
        packing_note="its linear attention carries one decaying state along the row and takes no position ids",
        notes="TransNormerLLM (OpenNLPLab, remote code): linear modules qkvu_proj, out_proj, l1, l2, l3; "
        "use_triton=False selects its PyTorch path on machines without triton kernels",
    ),
    "chatglm": Quirks(
        hidden_size_key="hidden_size",
        layers_key="num_layers",
        padding_side="left",
        remote_code=True,
        generation_mixin=True,
        call_post_init=True,
        config_kept={"use_cache": True},
        config_aliases={"max_length": "seq_length"},
        tokenizer_prebuilds=("tokenizer", "SPTokenizer"),
        pad_drops_padding_side=True,
        role_tokens=("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        own_generation_loop=True,
        init_takes_device=True,
        random_init={"empty_init": False},
        empty_norms=True,
        packing_note="its code builds one causal mask over the whole row from attention_mask (position ids only rotate)",
        notes="ChatGLM2/3 (THUDM, remote code): its tokenizer pads on the left only; linear modules "
        "query_key_value, dense, dense_h_to_4h, dense_4h_to_h",
    ),
}

REGISTRY |= {
    "opt": Quirks(packing_note="its learned positions are counted from attention_mask, not position ids"),
    "bloom": Quirks(packing_note="its ALiBi biases come from attention_mask, not position ids"),
    "falcon": Quirks(
        packing_note="on transformers 5.23 and before, its attention took no packed position ids (5.24 keeps examples apart)"
    ),
}

DEFAULT = Quirks()

KNOWN_REVISIONS: dict[str, dict[str, str]] = {
    # model_type -> {first 16 hex digits of the sha256 of a remote code file: where it comes from};
    # the repairs above were tested on exactly these files (../shared/seed-models/upstream/).
    "transnormer": {
        "db0458c20feeb638": "modeling_transnormer.py of OpenNLPLab TransNormerLLM (TNL-MoE 0b5d4e3)",
        "33e04e775e99f56e": "tokenization_baichuan.py of OpenNLPLab TransNormerLLM",
    },
    "chatglm": {
        "fe04c69d36dd1dba": "modeling_chatglm.py of THUDM/chatglm2-6b (2023-07-30)",
        "b7441a9f557de429": "tokenization_chatglm.py of THUDM/chatglm2-6b (2023-07-30)",
        "440d89faea5c3ea4": "modeling_chatglm.py of THUDM/chatglm3-6b (2023-12-07)",
        "f3e7e26af20b222d": "tokenization_chatglm.py of THUDM/chatglm3-6b (2023-12-07)",
    },
}


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
    if all(p.is_meta for p in model.parameters()):  # a model built on meta (pre-flight) stays there
        return rebuilt
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embeddings.weight.dtype if embeddings is not None else torch.get_default_dtype()
    for module in model.modules():
        slopes = getattr(module, "slopes", None)
        builder = getattr(module, "_build_slope_tensor", None)
        if isinstance(slopes, torch.Tensor) and slopes.is_meta and callable(builder):
            fresh = builder(slopes.shape[0]).to(dtype)
            device = next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))
            if isinstance(module._buffers.get("slopes"), torch.Tensor):
                module._buffers["slopes"] = fresh.to(device)
            else:
                module.slopes = fresh.to(device)
            rebuilt += 1
    return rebuilt
