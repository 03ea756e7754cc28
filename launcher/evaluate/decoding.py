"""Greedy or sampled decoding over a model's forward, for models whose own generate() cannot run on
the installed transformers (ChatGLM's tuple-cache code is handed a DynamicCache).

With `cache`, the model's forward keeps its own cache (whatever type its code returns, ChatGLM's
tuples): the first step runs the prompt, each next step only the new token. Without it, every step
runs the whole sequence again (O(n^2) in the answer length). Greedy output equals generate()'s on
models where both run, and the cached loop equals the uncached one (tests/test_seed_quirks.py).
"""

from __future__ import annotations

import inspect


def forward_parameters(model) -> set[str]:
    """Names the underlying model's forward accepts (through a PeftModel's wrappers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def decode(
    model,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    cache: bool = False,
):
    """New tokens (batch, steps): each row's answer, pad after its EOS; stops when every row has ended."""
    import torch

    with_positions = "position_ids" in forward_parameters(model)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens, past = [], None
    for _ in range(max_new_tokens):
        start = 0 if past is None else input_ids.shape[1] - 1  # with a cache, only the new token
        extra = {"position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:]} if with_positions else {}
        if past is not None:
            extra["past_key_values"] = past
        output = model(input_ids=input_ids[:, start:], attention_mask=attention_mask, use_cache=cache, **extra)
        past = output.past_key_values if cache else None
        logits = output.logits[:, -1, :]
        token = next_token(logits.float(), do_sample, temperature, top_p)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        new_tokens.append(token)
        finished |= token == eos_token_id
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        if finished.all():
            break
    return torch.stack(new_tokens, dim=1) if new_tokens else input_ids[:, :0]


def next_token(logits, do_sample: bool, temperature: float, top_p: float):
    """argmax, or a draw from the temperature-scaled distribution cut to its top-p nucleus."""
    import torch

    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the most likely token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


def generated_length(tokens: list[int], eos: int) -> int:
    """Tokens up to and with the first EOS (the rest of the row is padding)."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def clean_prediction(text: str, suffix: str) -> str:
    suffix = suffix.strip()
    if suffix and suffix in text:
        text = text[: text.index(suffix)]
    return text.strip()


def answer_of(tokenizer, tokens: list[int], suffix: str) -> tuple[str, int]:
    """(cleaned text, generated tokens up to and with EOS) of one row of new tokens, whichever
    backend generated it."""
    count = generated_length(tokens, tokenizer.eos_token_id)
    known = [t for t in tokens[:count] if t < len(tokenizer)]  # a padded vocabulary's extra rows are no text
    return clean_prediction(tokenizer.decode(known, skip_special_tokens=True), suffix), count
