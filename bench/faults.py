"""Fault trials: every way of ending `launch`, several times each, on the tiny run the tests use
(2 ranks, ZeRO-2 on CPU). Per trial: processes of the run left 10 s after `launch` ended (goal 0),
seconds from the signal to the last process gone, steps written twice, and the largest loss
difference against an uninterrupted run once the relaunch has finished.

    PYTHONPATH=. python bench/faults.py [--trials 3] [--steps 160] [--out /tmp/fault-trials]

Prints one JSON line per trial, then a summary per way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WAYS = {
    "ctrl-c": lambda pid: os.kill(pid, signal.SIGINT),
    "sigterm": lambda pid: os.kill(pid, signal.SIGTERM),
    "hang-up": lambda pid: os.kill(pid, signal.SIGHUP),
    "sigterm-group": lambda pid: os.killpg(pid, signal.SIGTERM),
    "sigkill": lambda pid: os.kill(pid, signal.SIGKILL),
    "sigkill-group": lambda pid: os.killpg(pid, signal.SIGKILL),
}


def launch_args(recipe: Path, run_dir: Path, steps: int) -> list[str]:
    sets = [f"train.max_steps={steps}", "train.save_steps=40", "merge.enabled=false", "eval.enabled=false"]
    return [sys.executable, "-m", "launcher.cli", str(recipe), "--run-dir", str(run_dir), "--executor", "local"] + [
        x for s in sets for x in ("--set", s)
    ]


def processes_of(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, NotADirectoryError):
            continue
        if str(run_dir.resolve()) in line:
            found.append(int(entry.name))
    return found


def written(run_dir: Path) -> list[dict]:
    log = run_dir / "logs" / "train_metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    from launcher.rundir.runs import RunDir

    return {row["step"]: row["loss"] for row in RunDir(run_dir).metrics.rows()}


def trial(recipe: Path, run_dir: Path, way: str, steps: int, straight: dict[int, float]) -> dict:
    launch = subprocess.Popen(launch_args(recipe, run_dir, steps), cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True)
    while len(written(run_dir)) < 5:
        time.sleep(0.05)
    signalled = time.time()
    WAYS[way](launch.pid)
    launch.wait(timeout=300)
    while processes_of(run_dir) and time.time() - signalled < 120:
        time.sleep(0.05)
    gone_s = time.time() - signalled
    time.sleep(max(0.0, 10 - (time.time() - signalled)))  # counted 10 s after the signal at the earliest
    left = processes_of(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    again = subprocess.run(launch_args(recipe, run_dir, steps), cwd=REPO, capture_output=True, text=True)
    got = losses(run_dir)
    steps_written = [row["step"] for row in written(run_dir)]
    return {
        "way": way,
        "left_after_10s": len(left),
        "all_gone_s": round(gone_s, 2),
        "state_after": manifest["state"],
        "relaunch_rc": again.returncode,
        "steps_redone": len(steps_written) - len(set(steps_written)),
        "max_abs_loss_diff": max(abs(straight[s] - got.get(s, float("inf"))) for s in straight),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=160)  # long enough that the kill lands mid-training
    parser.add_argument("--out", type=Path, default=Path("/tmp/fault-trials"))
    args = parser.parse_args()
    from launcher.assets import build_quickstart_assets

    args.out.mkdir(parents=True, exist_ok=False)
    assets = build_quickstart_assets(args.out / "assets")
    recipe = args.out / "recipe.toml"
    recipe.write_text(
        f'name = "trials"\n[model]\nname_or_path = "{assets["model"]}"\n[data]\ntrain_file = "{assets["train_file"]}"\n'
        "max_length = 64\n[train]\nlearning_rate = 3e-3\nmicro_batch_size = 8\nwarmup_steps = 2\n"
        '[distributed]\nprocs_per_node = 2\ndeepspeed = "zero2"\n'
    )
    subprocess.run(launch_args(recipe, args.out / "straight", args.steps), cwd=REPO, check=True, capture_output=True)
    straight = losses(args.out / "straight")
    print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}))
    results = []
    for number in range(args.trials):
        for way in WAYS:
            results.append(trial(recipe, args.out / f"{way}-{number}", way, args.steps, straight))
            print(json.dumps(results[-1]), flush=True)
    for way in WAYS:
        mine = [r for r in results if r["way"] == way]
        summary = {
            "way": way,
            "trials": len(mine),
            "processes_left": sum(r["left_after_10s"] for r in mine),
            "slowest_stop_s": max(r["all_gone_s"] for r in mine),
            "relaunch_failures": sum(r["relaunch_rc"] != 0 for r in mine),
            "steps_redone": sum(r["steps_redone"] for r in mine),
            "max_abs_loss_diff": max(r["max_abs_loss_diff"] for r in mine),
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
