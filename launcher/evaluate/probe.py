"""Is the adapter applied, and is it the model that was trained? Checked before an evaluation
scores an adapter, for each backend, so that a table of identical scores is never written for an
adapter that was silently not applied (lm-evaluation-harness#808) or a backend that answers for
another model than the one trained.

Two checks, on next-token log-probabilities:
- the adapter moves them off the base model's (on a few of the shard's examples): an adapter that
  changes nothing stops the evaluation;
- they match the trained model's own, saved with the final adapter (launcher-probe.safetensors: its
  logits on two training examples): a backend further off than the dtype's tolerance stops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.adapters.merge import PROBE_FILE
from launcher.errors import UserError

CHANGED = 1e-6
"""Smallest largest difference of a log-probability that counts as the adapter changing the model."""
TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1}
"""Largest mean difference of the next tokens' log-probabilities from the trained model's, per dtype."""
QUANTIZED_TOLERANCE = 0.1
"""The same over a base quantized by bitsandbytes: its int8 / 4-bit matmuls round differently in
training and in evaluation (0.0098 seen in fp32 with 8 bits)."""


def tolerance(dtype: str, quantized: bool) -> float:
    return max(TOLERANCE.get(dtype, 0.1), QUANTIZED_TOLERANCE if quantized else 0.0)


PROMPTS = 4
POSITIONS = 16
"""A backend that takes token lists is asked for each of the last POSITIONS next tokens of a row."""


class AdapterNotApplied(UserError):
    """The evaluation would score an adapter that changes nothing, or another model than the trained one."""


@dataclass(frozen=True)
class SavedProbe:
    """The trained model's probe: its input batch and, per row, each next token's log-probability
    and the largest log-probability of each next-token distribution."""

    input_ids: object
    attention_mask: object
    logprobs: list[list[float]]
    best: list[list[float]]

    def unpadded(self) -> tuple[list[list[int]], list[list[float]]]:
        """The rows' tokens without padding and the largest next-token log-probabilities of their last
        POSITIONS positions, for a backend that takes token lists (right-padded rows only: a
        left-padded row's positions would differ)."""
        rows, best = [], []
        for ids, mask, values in zip(self.input_ids.tolist(), self.attention_mask.tolist(), self.best):
            length = sum(mask)
            if length > 1 and mask[:length] == [1] * length:
                rows.append(ids[:length])
                best.append(values[-POSITIONS:])
        return rows, best


def next_token_logprobs(logits, input_ids, attention_mask) -> list[list[float]]:
    """Per row, the log-probability the logits give each next real token."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    return at_real_positions(logprobs.gather(-1, input_ids[:, 1:, None].to(logprobs.device))[..., 0].cpu(), attention_mask)


def best_logprobs(logits, attention_mask) -> list[list[float]]:
    """Per row, the largest log-probability of the next-token distribution after each real token
    but the last."""
    import torch

    return at_real_positions(torch.log_softmax(logits.float(), dim=-1)[:, :-1].max(-1).values.cpu(), attention_mask)


def at_real_positions(values, attention_mask) -> list[list[float]]:
    """Per row, the values (one per next-token prediction) where both tokens are real, not padding."""
    keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    return [row[mask].tolist() for row, mask in zip(values, keep)]


def saved_probe(adapter: str) -> SavedProbe | None:
    path = Path(adapter) / PROBE_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    probe = load_file(str(path))
    logits, input_ids, mask = probe["logits"], probe["input_ids"], probe["attention_mask"]
    return SavedProbe(input_ids, mask, next_token_logprobs(logits, input_ids, mask), best_logprobs(logits, mask))


def mean_difference(got: list[list[float]], want: list[list[float]]) -> float:
    pairs = [(a, b) for x, y in zip(got, want) for a, b in zip(x, y)]
    return sum(abs(a - b) for a, b in pairs) / max(len(pairs), 1)


def largest_difference(got: list[list[float]], want: list[list[float]]) -> float:
    return max((abs(a - b) for x, y in zip(got, want) for a, b in zip(x, y)), default=0.0)


def check_changes(system: str, adapted: list[list[float]], base: list[list[float]], backend: str) -> None:
    moved = largest_difference(adapted, base)
    if moved < CHANGED:
        raise AdapterNotApplied(
            f"{system}: with {backend}, the adapter changes nothing (next-token log-probabilities equal the base "
            f"model's on {len(base)} prompts, largest difference {moved:.1e}); it was not trained, or not applied: "
            f"evaluate another adapter, or leave it out"
        )


def check_matches(system: str, got: list[list[float]], want: list[list[float]], recipe, backend: str) -> None:
    dtype, quantized = recipe.model.dtype, recipe.peft.spec.quantization is not None
    off, allowed = mean_difference(got, want), tolerance(dtype, quantized)
    if off > allowed:
        over = f"{dtype}, quantized base" if quantized else dtype
        raise AdapterNotApplied(
            f"{system}: with {backend}, next-token log-probabilities are {off:.3g} off the trained model's on average "
            f"(more than {allowed:g} for {over}; its {PROBE_FILE}): another base model, revision or dtype than "
            f"training's, or the adapter not applied; evaluate with the run's own recipe"
        )
    print(f"{system}: with {backend}, reproduces the trained model (log-probabilities {off:.2g} off on average)", flush=True)


# ---------------------------------------------------------------- HF


def hf_logprobs(model, batch: dict) -> list[list[float]]:
    import torch

    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
        ).logits
    width = batch["input_ids"].shape[1]
    return next_token_logprobs(logits[:, -width:], batch["input_ids"], batch["attention_mask"])  # virtual tokens first
