"""A sweep: one recipe and a set of overrides per variant, from a recipe's [sweep] table or `--grid`.

    [sweep]
    grid = { "train.learning_rate" = [1e-4, 3e-4], "peft.r" = [8, 16] }      # every combination
    variants = [ { "peft.method" = "lora" }, { "peft.method" = "ia3" } ]    # explicit ones (optional "name")
    random = { count = 20, seed = 0, space = { "train.learning_rate" = { log-uniform = [1e-5, 1e-3] },
                                              "peft.r" = { choice = [8, 16, 32] } } }
    max_parallel = 4            # SLURM: array elements running at once (--array=0-N%K)
    strategy = "halving"        # optional: successive halving at these steps (train.max_steps beyond the last)
    rungs = [50, 100]
    metric = "loss"             # the held-out metric that picks the best variant
    mode = "min"

The variants are each explicit variant (one empty one when there are none) crossed with every grid
point, crossed with `random.count` draws (one empty draw when there is no random search). A
variant's name is its swept values (`lr=3e-4,r=16`), which is its run dir's name in the sweep dir.
Pure Python: the recipe's own validation checks every variant (launch/sweeping).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from launcher.config.recipe import NAME_PATTERN, check_key
from launcher.errors import UserError

CONFIRM_ABOVE = 1000  # more variants than this are queued only with --yes
NAME_LIMIT = 96  # a longer variant name (many swept keys) becomes v<index>
SHORT_NAMES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "ga",
    "micro_batch_size": "bs",
    "target_modules": "targets",
    "num_virtual_tokens": "tokens",
    "weight_decay": "wd",
    "warmup_steps": "warmup",
    "lr_scheduler": "sched",
}
DISTRIBUTIONS = ("log-uniform", "uniform", "int-uniform", "choice")


class SweepSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    grid: dict[str, Any] = {}
    """KEY -> list of values: every combination is a variant."""
    variants: list[dict[str, Any]] = []
    """Explicit variants, each a table of KEY -> value overrides (and an optional "name")."""
    random: RandomSearch | None = None
    max_parallel: int = Field(4, gt=0)
    """SLURM: how many array elements run at once (the %K of --array=0-N%K)."""
    strategy: Literal["all", "halving"] = "all"
    """all: every variant trains to its end; halving: successive halving over `rungs` (local runs)."""
    rungs: list[int] = []
    """halving: the steps at which the variants' held-out losses are compared and the worse half stops."""
    metric: str = "loss"
    """The held-out metric of the adapter that picks the best variant (loss, perplexity, exact_match, bleu4, rouge1, ...)."""
    mode: Literal["min", "max"] = "min"

    @field_validator("grid", mode="before")
    @classmethod
    def _dotted_grid(cls, value: Any) -> Any:
        return flatten(value, leaf=lambda v: isinstance(v, list)) if isinstance(value, dict) else value

    @field_validator("variants", mode="before")
    @classmethod
    def _dotted_variants(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [flatten(v, leaf=lambda x: not isinstance(x, dict)) if isinstance(v, dict) else v for v in value]
        return value


class RandomSearch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    count: int = Field(gt=0)
    seed: int = Field(0, ge=0)
    space: dict[str, Any]
    """KEY -> { log-uniform = [lo, hi] } | { uniform = [lo, hi] } | { int-uniform = [lo, hi] } | { choice = [...] }."""

    @field_validator("space", mode="before")
    @classmethod
    def _dotted_space(cls, value: Any) -> Any:
        return (
            flatten(value, leaf=lambda v: isinstance(v, dict) and set(v) & set(DISTRIBUTIONS))
            if isinstance(value, dict)
            else value
        )


SweepSection.model_rebuild()


def flatten(tree: dict, leaf, prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": [..]}} (TOML's dotted keys) -> {"train.learning_rate": [..]}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not leaf(value):
            flat |= flatten(value, leaf, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    """KEY -> value, applied over the recipe as --set does."""


def parse_sweep(table: Any, where: str = "sweep") -> SweepSection:
    """The [sweep] table, checked: known recipe keys, non-empty value lists, sound ranges."""
    if not isinstance(table, dict):
        raise UserError([f"{where}: must be a table ([sweep]), got {json.dumps(table, default=str)}"])
    try:
        sweep = SweepSection.model_validate(table)
    except ValidationError as err:
        raise UserError([f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]) from None
    problems = []
    for key, values in sweep.grid.items():
        problems += key_problems(key, f"{where}.grid")
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.grid.{key}: give a non-empty list of values, e.g. [1e-4, 3e-4]")
    for number, variant in enumerate(sweep.variants):
        for key in variant:
            if key != "name":
                problems += key_problems(key, f"{where}.variants[{number}]")
        name = variant.get("name")
        if name is not None and not (isinstance(name, str) and re.match(NAME_PATTERN, name)):
            problems.append(f"{where}.variants[{number}].name: {json.dumps(name)} is not a plain name (letters, digits, . _ -)")
    if sweep.random:
        for key, spec in sweep.random.space.items():
            problems += key_problems(key, f"{where}.random.space") + distribution_problems(key, spec, f"{where}.random.space")
    if sweep.strategy == "halving" and (not sweep.rungs or sweep.rungs != sorted(set(sweep.rungs)) or sweep.rungs[0] <= 0):
        problems.append(f"{where}.rungs: halving needs rungs, rising steps above 0, e.g. rungs = [50, 100]; got {sweep.rungs}")
    if not (sweep.grid or sweep.variants or sweep.random):
        problems.append(f"{where}: no variants; give a grid, a list of variants or a random search")
    if problems:
        raise UserError(problems)
    return sweep


def key_problems(key: str, where: str) -> list[str]:
    try:
        check_key(key, flag=where)
    except UserError as err:
        return err.lines
    if key == "name":
        return [f"{where}.name: a sweep's variants share its name; sweep other keys"]
    return []


def distribution_problems(key: str, spec: Any, where: str) -> list[str]:
    kinds = [kind for kind in DISTRIBUTIONS if isinstance(spec, dict) and kind in spec]
    if len(kinds) != 1 or len(spec) != 1:
        return [f"{where}.{key}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{ log-uniform = [1e-5, 1e-3] }}"]
    kind, bounds = kinds[0], spec[kinds[0]]
    if kind == "choice":
        return [] if isinstance(bounds, list) and bounds else [f"{where}.{key}.choice: give a non-empty list of values"]
    numbers = (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    )
    if not numbers or bounds[0] > bounds[1]:
        return [f"{where}.{key}.{kind}: give [low, high] with low <= high, got {json.dumps(bounds)}"]
    if kind == "log-uniform" and bounds[0] <= 0:
        return [f"{where}.{key}.log-uniform: its bounds must be above 0, got {json.dumps(bounds)}"]
    if kind == "int-uniform" and not all(isinstance(b, int) for b in bounds):
        return [f"{where}.{key}.int-uniform: its bounds must be whole numbers, got {json.dumps(bounds)}"]
    return []


def parse_grid_flags(items: list[str]) -> dict[str, list]:
    """`--grid KEY=[v1,v2]` items -> {KEY: [v1, v2]} (values as TOML; a single value is a list of one)."""
    import tomllib

    grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError([f"--grid {item}: expected KEY=[V1,V2,...], e.g. --grid train.learning_rate=[1e-4,3e-4]"])
        try:
            values = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise UserError([f"--grid {item}: {text!r} is not a TOML value or list, e.g. [1e-4,3e-4] or ['a','b']"]) from None
        check_key(key.strip(), flag="--grid")
        grid[key.strip()] = values if isinstance(values, list) else [values]
    return grid


def expand(sweep: SweepSection) -> list[Variant]:
    """Every variant of the sweep, named by its values (unique names: a clash gets -2, -3, ...)."""
    explicit = sweep.variants or [{}]
    keys = list(sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))]
    draws = random_draws(sweep.random) if sweep.random else [{}]
    variants, taken = [], set()
    for number, (chosen, point, draw) in enumerate(itertools.product(explicit, points, draws)):
        overrides = {k: v for k, v in chosen.items() if k != "name"} | point | draw
        name = chosen.get("name") or variant_name(overrides, number)
        if "name" in chosen and (point or draw):
            name = f"{chosen['name']},{variant_name(point | draw, number)}"
        unique, suffix = name, 1
        while unique in taken:
            suffix += 1
            unique = f"{name}-{suffix}"
        taken.add(unique)
        variants.append(Variant(unique, overrides))
    return variants


def random_draws(search: RandomSearch) -> list[dict[str, Any]]:
    """`count` draws of the space from `seed` (floats rounded to 3 significant digits: names stay readable)."""
    rng = random.Random(search.seed)
    return [{key: draw(spec, rng) for key, spec in search.space.items()} for _ in range(search.count)]


def draw(spec: dict, rng: random.Random) -> Any:
    ((kind, bounds),) = spec.items()
    if kind == "choice":
        return rng.choice(bounds)
    if kind == "int-uniform":
        return rng.randint(bounds[0], bounds[1])
    if kind == "log-uniform":
        value = math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))
    else:
        value = rng.uniform(bounds[0], bounds[1])
    return float(f"{value:.3g}")


def variant_name(overrides: dict[str, Any], number: int) -> str:
    """`lr=3e-4,r=16`: each swept key's short name and value; v<number> when that gets too long."""
    leaves = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = []
    for key, leaf in zip(overrides, leaves):
        short = SHORT_NAMES.get(leaf, leaf) if leaves.count(leaf) == 1 else key
        parts.append(f"{short}={value_text(overrides[key])}")
    name = ",".join(parts) or "base"
    return name if len(name) <= NAME_LIMIT else f"v{number:04d}"


def value_text(value: Any) -> str:
    """A value as a path-safe word: 3e-4, 16, true, q_proj+v_proj."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(value_text(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))[:40]
