"""What each training objective needs, in one place, keyed by `train.objective` (as methods.py is by
`peft.method`): the data formats it learns from, and whether this version trains it.

Recipe validation asks which data formats an objective takes. Nothing outside this module tests an
objective's name: adding one is an entry here plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

SFT_FORMATS = ("alpaca", "prompt-response", "text", "messages")
PREFERENCE_FORMATS = ("preference",)


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    """What it trains, in a few words (the recipe reference and its errors say it)."""
    data_formats: tuple[str, ...]
    """The data.format values it learns from; another is refused."""
    not_built: str | None = None
    """Why this version cannot train it yet (None: it can)."""


REGISTRY: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("sft", "next-token loss on the response", SFT_FORMATS),
        Objective(
            "dpo",
            "direct preference optimisation on chosen / rejected pairs",
            PREFERENCE_FORMATS,
            not_built="this version reads and checks preference data (launch check) but does not train DPO yet",
        ),
    )
}
NAMES = tuple(REGISTRY)


def objective(name: str) -> Objective:
    return REGISTRY[name]


def problems(name: str, data_format: str) -> list[str]:
    """What a recipe of this objective and data format cannot do: one line each."""
    entry = REGISTRY[name]
    if data_format not in entry.data_formats:
        takes = " / ".join(entry.data_formats)
        others = [o.name for o in REGISTRY.values() if data_format in o.data_formats]
        fix = f'set train.objective = "{others[0]}"' if others else f"use data.format = {takes}"
        return [
            f'data.format: "{data_format}" rows do not fit train.objective = "{name}" ({entry.summary}: it takes {takes}); {fix}'
        ]
    return []
