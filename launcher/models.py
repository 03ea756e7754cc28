"""Base model and tokenizer loading, and the PEFT config built from [peft]."""
from __future__ import annotations

import os
import warnings

from launcher.recipe import Recipe

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def quiet_libraries(device: str) -> None:
    """Keep library chatter (progress bars, deprecation notices) out of the user's terminal."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said, not guessed: no detection warning
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def torch_dtype(recipe: Recipe):
    import torch

    return getattr(torch, TORCH_DTYPES[recipe.model.dtype])


def load_tokenizer(recipe: Recipe, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        recipe.model.name_or_path, revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_base_model(recipe: Recipe, name_or_path: str | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        name_or_path or recipe.model.name_or_path, revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code, dtype=torch_dtype(recipe),
    )


def peft_config(recipe: Recipe):
    from peft import LoraConfig, TaskType

    p = recipe.peft
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
        target_modules=p.target_modules,
    )
