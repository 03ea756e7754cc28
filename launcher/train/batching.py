"""How a rank's micro-batch of tokenized examples is laid out (data.batching).

packed: the micro-batch's examples in one row, one after the other, with no padding. Position ids
restart at each example, and the model is called with no attention_mask and no cache, which makes
transformers build a block-diagonal causal mask from the position ids (FlashAttention's varlen path
on GPUs): no token attends across an example boundary. The first label of each example is masked,
so no token is trained to predict the next example. The row holds the same examples a padded
micro-batch holds, so the token-weighted loss and the gradients are those of padded batches; only
the padding's compute is gone. Only models proven to keep packed examples apart pack: the probe
in launcher.train.packing runs the recipe's own architecture on the installed stack and says why.

grouped: the Trainer's length-grouped sampler (drawn from the seeded RNG, so a resume sees the same
order) batches examples of similar length, which are then padded. padded: padded to the longest
example of each micro-batch, the seeds' way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from launcher.data.examples import IGNORE_INDEX


def packed_batch(features: list[dict]) -> dict:
    """One padding-free row of the examples: input ids, labels (each example's first masked) and
    position ids restarting at 0 per example; use_cache off (a cache turns the packed mask off)."""
    import torch

    ids, labels, positions = [], [], []
    for feature in features:
        ids += feature["input_ids"]
        labels += [IGNORE_INDEX, *feature["labels"][1:]]
        positions += range(len(feature["input_ids"]))
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions), "use_cache": False}


class SampleLoggingCollator:
    """Appends a micro-batch's sample indices to a per-rank log, so the data order (and what a resume
    skipped or repeated) can be checked afterwards, then lays it out with `lay_out` (the objective's:
    packed or padded examples, padded preference pairs)."""

    def __init__(self, lay_out: Callable[[list[dict]], dict], log_path: Path, attempt: int):
        self.lay_out, self.log_path, self.attempt = lay_out, log_path, attempt

    def __call__(self, features: list[dict]) -> dict:
        ids = [f.pop("index") for f in features]
        for feature in features:
            feature.pop("length", None)  # the grouped sampler's column, not a model input
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({"attempt": self.attempt, "ids": ids}) + "\n")
        return self.lay_out(features)
