"""Tiny random models built from the seeds' real upstream remote code (TransNormerLLM, ChatGLM2-6B,
ChatGLM3-6B), read from ../shared/seed-models/upstream/ (test data; the project ships none of it).

Each model dir holds the unmodified upstream .py files, a config.json shrunk to 2 layers whose
auto_map points at them, a sentencepiece tokenizer trained here on the recipes' sample data, and
random weights. The weights are written by the launcher's own loader (the remote code does not
construct on transformers 5 without the quirks registry); the tests then load them as a user would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO

UPSTREAM = REPO.parent / "shared" / "seed-models" / "upstream"
SEEDS = ("transnormer", "chatglm2", "chatglm3")
SPM_VOCAB = 1000

TINY_CONFIGS = {
    "transnormer": {
        "model_type": "transnormer",
        "architectures": ["TransnormerForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_transnormer.TransnormerConfig",
            "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM",
        },
        "decoder_embed_dim": 64,
        "decoder_layers": 2,
        "decoder_attention_heads": 4,
        "hidden_dim": 64,
        "glu_dim": 128,
        "linear_use_lrpe_list": [1, 0],
        "norm_type": "simplermsnorm",
        "linear_act_fun": "swish",
        "bias": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "init_std": 0.02,
    },
    "chatglm": {
        "num_layers": 2,
        "hidden_size": 64,
        "ffn_hidden_size": 128,
        "kv_channels": 16,
        "num_attention_heads": 4,
        "multi_query_group_num": 2,
        "seq_length": 512,
    },
}
TOKENIZER_CONFIG = {
    "transnormer": {
        "tokenizer_class": "BaiChuanTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaiChuanTokenizer", None]},
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
    },
}


def require_upstream() -> Path:
    if not UPSTREAM.is_dir():
        pytest.skip(f"{UPSTREAM} is absent: the seeds' upstream remote code is test data from ../shared")
    return UPSTREAM


def sample_texts() -> list[str]:
    texts = []
    for path in sorted((REPO / "recipes" / "data").iterdir()):
        rows = json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(x) for x in path.read_text().splitlines()]
        for row in rows:
            texts += [str(v) for v in row.values()]
    texts += ["Human:", "Assistant:", "[Round 1]", "问：", "答：", "Is this number even or odd?", "even", "odd"]
    return texts


def train_sentencepiece(out: Path) -> Path:
    """A sentencepiece model like the real ones (unk 0, bos 1, eos 2; byte fallback), trained in a second."""
    import io

    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts() * 4),
        model_writer=buffer,
        vocab_size=SPM_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",  # keep newlines and spaces as the real models' tokenizers do
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path = out / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


def write_files(seed: str, out: Path) -> None:
    """The upstream code, the tiny config and the tokenizer: a model dir without weights."""
    upstream = require_upstream() / seed
    out.mkdir(parents=True, exist_ok=True)
    for path in upstream.glob("*.py"):
        shutil.copy(path, out / path.name)
    train_sentencepiece(out)
    if seed == "transnormer":
        config = dict(TINY_CONFIGS["transnormer"], vocab_size=SPM_VOCAB)
        tokenizer_config = TOKENIZER_CONFIG["transnormer"]
    else:
        real = json.loads((upstream / "config.json").read_text())
        # ChatGLM's vocabulary: the sentencepiece pieces, then its special tokens (5, or 9 in ChatGLM3)
        config = real | TINY_CONFIGS["chatglm"] | {"padded_vocab_size": SPM_VOCAB + 16, "torch_dtype": "float32"}
        tokenizer_config = json.loads((upstream / "tokenizer_config.json").read_text())
        tokenizer_config.pop("name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def seed_recipe(seed: str, model_dir: Path, **model):
    """A minimal validated recipe for a tiny seed model (trust_remote_code, as the seed recipes say)."""
    from launcher.config.recipe import validate_recipe

    return validate_recipe(
        {
            "name": seed,
            "model": {"name_or_path": str(model_dir), "trust_remote_code": True} | model,
            "data": {"train_file": str(REPO / "recipes" / "data" / "huanhuan-sample.json"), "format": "alpaca"},
            "peft": {"method": "lora", "target_modules": ["placeholder"]},
        },
        source=f"{seed} test recipe",
    )


def build_seed_model(seed: str, out: Path) -> Path:
    """A complete tiny model dir: files, then random weights written through the launcher's loader."""
    import torch

    from launcher.models.loading import random_model

    write_files(seed, out)
    torch.manual_seed(0)
    model = random_model(str(out), torch.float32)
    assert all(param.isfinite().all() for param in model.parameters())
    model.save_pretrained(str(out))
    return out
