"""What each training objective needs, in one place, keyed by `train.objective` (as methods.py is by
`peft.method`): the data formats it learns from, its own recipe keys, what it cannot run with, and the
metrics its trainer logs.

Recipe validation asks which data formats and [preference] keys an objective takes; pre-flight and the
batching choice ask whether it packs and which PEFT methods it trains; the worker asks for its trainer
(launcher/train/trainers.py, keyed by the same name) and which logged metrics go into each metrics row.
Nothing outside this module and the trainers' table tests an objective's name: adding one is an entry
in each plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

SFT_FORMATS = ("alpaca", "prompt-response", "text", "messages")
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
"""TRL's preference metrics, per logged step: implicit rewards beta * log(policy / reference) of each answer."""
DPO_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
"""TRL 1.16's DPO loss types (DPOConfig.loss_type)."""
PREFERENCE_FORMATS = ("preference",)


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    """What it trains, in a few words (the recipe reference and its errors say it)."""
    data_formats: tuple[str, ...]
    """The data.format values it learns from; another is refused."""
    keys: tuple[str, ...] = ()
    """Its own [preference] keys; one set under another objective is refused."""
    packs: bool = True
    """Its batches can be packed (data.batching = "packed"); else auto picks grouped."""
    methods: tuple[str, ...] | None = None
    """The PEFT methods it trains (None: all); another is refused before the queue."""
    sequences: int = 1
    """Sequences one example feeds the model (a pair: prompt + chosen and prompt + rejected, in one batch)."""
    reference_forward: bool = False
    """Each step also runs the reference (the base, adapter disabled) forward, without gradients."""
    logged: tuple[str, ...] = ()
    """Metrics its trainer logs that go into each row of logs/train_metrics.jsonl (besides the loss)."""


REGISTRY: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("sft", "next-token loss on the response", SFT_FORMATS),
        Objective(
            "dpo",
            "direct preference optimisation on chosen / rejected pairs (TRL's DPOTrainer)",
            PREFERENCE_FORMATS,
            keys=("beta", "loss_type", "loss_weights", "label_smoothing"),
            packs=False,  # TRL 1.16 accepts padding_free for DPO and pads anyway
            sequences=2,
            reference_forward=True,
            methods=("lora", "qlora", "lora-8bit"),
            logged=REWARD_METRICS,
        ),
    )
}
NAMES = tuple(REGISTRY)


def objective(name: str) -> Objective:
    return REGISTRY[name]


def owners_of(key: str) -> list[str]:
    return [o.name for o in REGISTRY.values() if key in o.keys]


def problems(name: str, data_format: str, preference_keys: set[str], method: str) -> list[str]:
    """What a recipe of this objective, data format, [preference] keys and method cannot do: one line each."""
    entry = REGISTRY[name]
    for key in sorted(preference_keys - set(entry.keys)):
        owners = " / ".join(f'"{o}"' for o in owners_of(key))
        return [f'preference.{key} belongs to train.objective = {owners}, not "{name}"; remove it or change train.objective']
    if entry.methods is not None and method not in entry.methods:
        tested = " / ".join(entry.methods)
        return [f'peft.method: train.objective = "{name}" is not supported with {method} yet; use {tested}']
    if data_format not in entry.data_formats:
        takes = " / ".join(entry.data_formats)
        others = [o.name for o in REGISTRY.values() if data_format in o.data_formats]
        fix = f'set train.objective = "{others[0]}"' if others else f"use data.format = {takes}"
        return [
            f'data.format: "{data_format}" rows do not fit train.objective = "{name}" ({entry.summary}: it takes {takes}); {fix}'
        ]
    return []
