"""Tiny real models, tokenizers and datasets, built locally (there is no model hub here).

Used by the quickstart (its assets under recipes/assets/ were written by `python -m
launcher.assets recipes/assets`) and by the tests, which build their own copies.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def parity_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """A task a tiny model really learns in a minute: 'is N even or odd?' with an exact answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        number = rng.randrange(0, 10 ** rng.randint(1, 4))
        rows.append(
            {
                "instruction": "Is this number even or odd?",
                "input": str(number),
                "output": "even" if number % 2 == 0 else "odd",
            }
        )
    return rows


def preference_pairs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The parity rows as preference pairs: the right answer chosen, the wrong one rejected."""
    flip = {"even": "odd", "odd": "even"}
    return [{"prompt": f"{r['instruction']}\n{r['input']}", "chosen": r["output"], "rejected": flip[r["output"]]} for r in rows]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on `texts` in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # One token per digit, so arithmetic-style tasks see every digit (as Llama's tokenizer does).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    wrapped.save_pretrained(out_dir)
    return wrapped


def build_tiny_llama(out_dir: Path, texts: list[str], hidden: int = 64, layers: int = 2, seed: int = 0, heads: int = 4) -> Path:
    """A randomly initialised Llama of ~0.1M parameters plus its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(texts, out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.05,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # Wider embeddings and output head than a usual init: with hidden 64 and std 0.02 the
        # logits stay within about +-1 and an adapter on the inner layers cannot make any
        # answer likely. Inner layers stay narrow, so fp32 rounding stays small (merge tests).
        model.model.embed_tokens.weight.normal_(0.0, 0.3)
        model.lm_head.weight.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return out_dir


def corpus_of(rows: list[dict[str, str]]) -> list[str]:
    return [" ".join(str(v) for v in row.values()) for row in rows] + [
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
    ]


def build_quickstart_assets(out_dir: Path) -> dict[str, Path]:
    """The quickstart's model, tokenizer and data: everything it needs, no hub."""
    out_dir = Path(out_dir)
    rows = parity_rows(1200, seed=0)
    train = write_jsonl(rows, out_dir / "parity" / "train.jsonl")
    pairs = write_jsonl(preference_pairs(rows), out_dir / "parity" / "preferences.jsonl")
    model = build_tiny_llama(out_dir / "tiny-llama", corpus_of(rows))
    return {"model": model, "train_file": train, "preferences": pairs}


if __name__ == "__main__":
    print(build_quickstart_assets(Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/assets")))
