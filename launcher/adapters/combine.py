"""Combining LoRA adapters trained on the same base into one (PEFT's add_weighted_adapter)."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.adapters.merge import validate_adapter
from launcher.config import methods
from launcher.config.recipe import Recipe
from launcher.errors import UserError
from launcher.models.loading import load_base_model
from launcher.rundir.runs import check_replaceable, publish, staging_for

# cat and svd are exact (cat: rank = the sum of ranks); linear, ties and dare_* approximate.
METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")


def check_combination(adapters: list[Path], weights: list[float], method: str, density: float | None) -> None:
    problems = []
    if len(adapters) < 2:
        problems.append("--adapters: name at least two adapters (run dirs or adapter folders) to combine")
    if len(weights) != len(adapters):
        problems.append(f"--weights: {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if method in NEEDS_DENSITY and not (density and 0 < density <= 1):
        problems.append(f"--density: {method} keeps this fraction of each delta's entries; give a value in (0, 1], e.g. 0.5")
    configs = [json.loads((a / "adapter_config.json").read_text()) for a in adapters if (a / "adapter_config.json").is_file()]
    types = {c.get("peft_type") for c in configs}
    if not all((spec := methods.of_peft_type(t)) and spec.combines for t in types):
        combining = ", ".join(methods.names_where(lambda m: m.combines))
        problems.append(f"--adapters: only LoRA adapters ({combining}) combine; these are {sorted(map(str, types))}")
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) > 1:
        problems.append(
            f"--adapters: trained on different base models ({', '.join(sorted(map(str, bases)))}); "
            "only adapters of the same base combine"
        )
    if problems:
        raise UserError(problems)


def combine_adapters(
    recipe: Recipe,
    adapters: list[Path],
    weights: list[float],
    method: str,
    out: Path,
    density: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the weighted combination of `adapters` to `out` (a PEFT adapter folder), validated."""
    from peft import PeftModel

    check_combination(adapters, weights, method, density)
    for adapter in adapters:
        validate_adapter(adapter)
    check_replaceable(out, overwrite)
    model = PeftModel.from_pretrained(load_base_model(recipe), str(adapters[0]), adapter_name="a0")
    for number, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(str(adapter), adapter_name=f"a{number}")
    extra = {"density": density} if method in NEEDS_DENSITY else {}
    try:
        model.add_weighted_adapter([f"a{n}" for n in range(len(adapters))], weights, "combined", combination_type=method, **extra)
    except (ValueError, RuntimeError) as err:
        raise UserError(
            [
                f"--method {method}: PEFT cannot combine these adapters ({err}); "
                "try --method cat, which accepts different ranks and target modules"
            ]
        ) from None
    staging = staging_for(out)
    model.save_pretrained(str(staging), selected_adapters=["combined"])  # PEFT writes it under combined/
    combined = staging / "combined"
    for path in combined.iterdir():
        path.rename(staging / path.name)
    combined.rmdir()
    (staging / "launcher-combined.json").write_text(
        json.dumps(
            {"adapters": [str(a.resolve()) for a in adapters], "weights": weights, "method": method, "density": density}, indent=2
        )
        + "\n"
    )
    validate_adapter(staging)
    return publish(staging, out, replace=overwrite, kind="combined adapter")
