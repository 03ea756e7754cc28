"""Base model and tokenizer loading, and the PEFT config built from [peft]."""

from __future__ import annotations

import math
import os
import warnings

from launcher.config.hardware import resolve_device
from launcher.config.quirks import apply_quirks, quirks_for, set_environment
from launcher.config.recipe import Recipe
from launcher.models.remote_code import config_json, load_config, model_class, require_config, tokenizer_class

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def quiet_libraries(device: str) -> None:
    """Keep library chatter (progress bars, deprecation notices) out of the user's terminal."""
    # Said, not guessed (no detection warning), and always the device in use: a value inherited
    # from a CPU-only login node or from the CLI's pre-flight must not make DeepSpeed use the CPU
    # next to NCCL on a GPU node.
    os.environ["DS_ACCELERATOR"] = "cpu" if device == "cpu" else "cuda"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def quiet_libraries_for(recipe: Recipe) -> None:
    """quiet_libraries for the device this recipe runs on here (this node's, on a cluster)."""

    quiet_libraries(resolve_device(recipe.distributed.device))


def torch_dtype(recipe: Recipe):
    import torch

    return getattr(torch, TORCH_DTYPES[recipe.model.dtype])


def model_type(recipe: Recipe) -> str | None:
    """config.json's model_type of the base model, read from the file (local or in the hub cache)
    without running any model code; OSError when it cannot be had."""
    require_config(recipe.model.name_or_path, recipe.model.revision)
    return model_type_of(recipe.model.name_or_path, recipe.model.revision)


def model_type_of(name_or_path: str, revision: str | None = None) -> str | None:
    return config_json(name_or_path, revision).get("model_type")


def load_tokenizer(recipe: Recipe, padding_side: str = "right"):
    from transformers import AutoTokenizer

    m, kind = recipe.model, model_type(recipe)
    cls = tokenizer_class(m.name_or_path, m.revision, m.trust_remote_code, kind) or AutoTokenizer
    tokenizer = cls.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    quirks = quirks_for(kind)
    if tokenizer.pad_token_id is None:
        if quirks.pad_token_id is not None:
            tokenizer.pad_token_id = quirks.pad_token_id
        else:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = quirks.padding_side or padding_side
    return tokenizer


def load_base_model(recipe: Recipe, name_or_path: str | None = None, quantization=None, device: str | None = None, **extra):
    """The base model in the recipe's dtype; quantized (bitsandbytes) and placed on `device` when asked."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    extra |= {"quantization_config": quantization} if quantization else {}
    if quantization and not is_deepspeed_zero3_enabled():  # ZeRO-3 places (and shards) the weights itself
        extra["device_map"] = {"": device or "cpu"}
    m = recipe.model
    return load_pretrained(name_or_path or m.name_or_path, torch_dtype(recipe), m.revision, m.trust_remote_code, **extra)


def load_pretrained(name_or_path: str, dtype, revision: str | None = None, trust_remote_code: bool = False, **extra):
    """from_pretrained through the quirks registry: its remote code repaired, then the model."""
    from transformers import AutoModelForCausalLM

    set_environment(model_type_of(name_or_path, revision))  # before the model's code is imported
    config = load_config(name_or_path, revision, trust_remote_code)
    cls = model_class(config, name_or_path, revision, trust_remote_code) or AutoModelForCausalLM
    # use_kernels=False: transformers 5.25 swaps layers for Hub kernels by default (a download at load
    # time, and an error without the `kernels` package); which kernels run is train.* knobs' call.
    model = cls.from_pretrained(
        name_or_path,
        config=config,
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        use_kernels=False,
        **extra,
    )
    apply_quirks(model)
    return model


def construct_model(name_or_path: str, dtype=None, revision=None, trust_remote_code: bool = True, config=None, **init_kwargs):
    """A model built from its config (or `config`, a changed copy), its remote code repaired as for
    loading; its weights are whatever its __init__ leaves (random_model: random ones, for any code)."""
    from transformers import AutoModelForCausalLM

    config = config or load_config(name_or_path, revision, trust_remote_code)
    set_environment(config.model_type)
    cls = model_class(config, name_or_path, revision, trust_remote_code)
    if cls is None:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    else:
        model = cls._from_config(config, dtype=dtype, **init_kwargs)
    apply_quirks(model)
    return model


def random_model(name_or_path: str, dtype=None, revision=None, trust_remote_code: bool = True, config=None):
    """A model with random weights and no memory left uninitialised (seed torch first for the same ones)."""
    import torch

    config = config or load_config(name_or_path, revision, trust_remote_code)
    quirks = quirks_for(config.model_type)
    model = construct_model(name_or_path, dtype, revision, trust_remote_code, config, **quirks.random_init)
    if quirks.empty_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name.lower() and param.dim() == 1:
                    param.fill_(1.0)
    return model


def meta_model(name_or_path: str, revision=None, trust_remote_code: bool = True):
    """The model built on the meta device: every module and shape, no memory (pre-flight, merge layout)."""
    import torch

    extra = {"device": "meta"} if quirks_for(model_type_of(name_or_path, revision)).init_takes_device else {}
    with torch.device("meta"):
        model = construct_model(name_or_path, revision=revision, trust_remote_code=trust_remote_code, **extra)
    if not all(p.is_meta for p in model.parameters()):  # a 6B model here would take the login node's memory
        raise RuntimeError(f"{name_or_path}: its code placed weights off the meta device")
    return model


def quantization_config(recipe: Recipe):
    """bitsandbytes settings of the method's quantized base (qlora: 4-bit, lora-8bit: 8-bit); None otherwise."""
    from transformers import BitsAndBytesConfig

    kind = recipe.peft.spec.quantization
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind != "4bit":
        return None
    dtype = torch_dtype(recipe)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.peft.quant_type,
        bnb_4bit_use_double_quant=recipe.peft.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # ZeRO-3 needs it equal to the model dtype (it still leaves the 4-bit weights unsharded)
    )


def load_training_model(recipe: Recipe, total_steps: int, device, attention: str | None = None):
    """The base model with a fresh adapter from [peft] (the SFT trainer's; TRL's trainers attach it)."""
    from peft import get_peft_model

    return get_peft_model(load_training_base(recipe, device, attention), recipe.peft.spec.build_config(recipe, total_steps))


def load_training_base(recipe: Recipe, device, attention: str | None = None):
    """The base model to train an adapter on: quantized when the method says so (and prepared for it),
    with `attention` as its attention implementation when given."""
    from peft import prepare_model_for_kbit_training

    quantized = quantization_config(recipe)
    extra = {"attn_implementation": attention} if attention else {}
    model = load_base_model(recipe, quantization=quantized, device=device, **extra)
    if quantized is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


def planned_steps(recipe: Recipe, examples: int) -> int:
    """Optimizer steps the run will make (Trainer's arithmetic): AdaLoRA's budget schedule needs it."""
    t = recipe.train
    if t.max_steps > 0:
        return t.max_steps
    per_rank = math.ceil(examples / recipe.world_size())
    batches = math.ceil(per_rank / t.micro_batch_size)
    return max(math.ceil(t.epochs * max(batches // t.gradient_accumulation_steps, 1)), 1)
