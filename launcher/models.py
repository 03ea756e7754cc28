"""Base model and tokenizer loading, and the PEFT config built from [peft]."""
from __future__ import annotations

from launcher.recipe import Recipe

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
