"""A 1,000-variant random search: how long validation, pre-flight and rendering take, and `launch status`.

    python bench/sweep_bench.py [--count 1000] [--out /tmp/sweep-bench]

The quickstart's tiny model and data, a random search over learning rate (log-uniform), rank, alpha
and dropout. Times, each in this process: the variants expanded and validated as recipes; pre-flight
(once per distinct check: the rank changes the memory estimate, the rest does not); rendering every
run dir; the whole `launch sweep --dry-run` command in a fresh process; and `launch status SWEEP`
over all the variants (in a fresh process: imports included), which reads every variant's manifest and
makes one scheduler call (squeue over the sweep's arrays; none here, nothing was submitted).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

SPACE = (
    '"train.learning_rate" = { log-uniform = [1e-5, 1e-2] }, "peft.r" = { choice = [4, 8, 16] }, '
    '"peft.alpha" = { choice = [8, 16, 32] }, "peft.dropout" = { uniform = [0.0, 0.2] }'
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sweep-bench"))
    args = parser.parse_args()
    from rich.console import Console

    from launcher.assets import build_quickstart_assets
    from launcher.launch.sweeping import at, plan_sweep, preflight_sweep, record_sweep, render_variants
    from launcher.rundir.sweepdir import SweepDir

    shutil.rmtree(args.out, ignore_errors=True)
    assets = build_quickstart_assets(args.out / "assets")
    recipe = args.out / "bench.toml"
    recipe.write_text(
        f'name = "bench"\n[model]\nname_or_path = "{assets["model"]}"\n[data]\ntrain_file = "{assets["train_file"]}"\n'
        f'eval_fraction = 0.1\nmax_length = 64\n[train]\nmax_steps = 20\nreport_to = "none"\n'
        f"[sweep]\nrandom = {{ count = {args.count}, seed = 0, space = {{ {SPACE} }} }}\n"
    )
    os.chdir(args.out)
    quiet = Console(quiet=True)
    timings = {}
    started = time.perf_counter()
    sweep, planned, root = plan_sweep(recipe, [], [], yes=True)
    timings["validate_s"] = time.perf_counter() - started
    started = time.perf_counter()
    checks = preflight_sweep(planned, quiet)
    timings["preflight_s"] = time.perf_counter() - started
    started = time.perf_counter()
    planned = at(planned, args.out / "inproc")
    record_sweep(SweepDir(args.out / "inproc"), recipe, [], sweep, planned, "local")
    render_variants(planned)
    timings["render_s"] = time.perf_counter() - started
    command = [sys.executable, "-m", "launcher.cli"]
    started = time.perf_counter()
    subprocess.run([*command, "sweep", str(recipe), "--dry-run", "--yes", "--executor", "local"], check=True, capture_output=True)
    timings["dry_run_command_s"] = time.perf_counter() - started
    started = time.perf_counter()
    status = subprocess.run([*command, "status", str(root)], check=True, capture_output=True, text=True)
    timings["status_command_s"] = time.perf_counter() - started
    assert status.stdout.count("rendered") == args.count, status.stdout[-500:]
    result = {
        "bench": "sweep",
        "variants": len(planned),
        "preflight_checks": checks,
        **{key: round(value, 2) for key, value in timings.items()},
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
