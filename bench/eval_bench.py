"""Evaluation throughput: launch's batched generation vs a naive loop shaped like the seed's
`batch_generate_data`, and `launch eval` with 2 shards vs 1.

    python bench/eval_bench.py [--hidden 256] [--layers 4] [--examples 256] [--device cpu|cuda] [--vllm]

Builds a random Llama and prompts of mixed length (log-uniform, 4 to 256 words). Both loops
decode greedily with the same model, prompts, batch size and max_new_tokens, and count
generated tokens the same way (up to EOS); they alternate, twice each, in one process:
  naive:  fixed batches in input order, left padding to the longest prompt of the batch;
  launch: launcher.evaluate.shards.generate (batches of length-sorted prompts).
Then the whole `launch eval` path (plan, shards, reference loss, metrics, report) on the base
model with eval.shards = 1 and 2, each in fresh processes; with --vllm, once more with
eval.backend = vllm (tok/s against HF's 1 shard, and the share of prompts where the greedy answers
agree). Prints JSON lines and the ratios.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config.recipe import Recipe

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path


def build(out: Path, hidden: int, layers: int, examples: int, seed: int = 0) -> tuple[Path, Path]:
    from launcher.assets import build_tiny_llama, write_jsonl

    rng = random.Random(seed)
    words = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "kilo", "lima", "mike", "oscar", "papa", "romeo"]
    rows = []
    for _ in range(examples):
        length = int(math.exp(rng.uniform(math.log(4), math.log(256))))
        rows.append(
            {
                "instruction": " ".join(rng.choice(words) for _ in range(length)),
                "input": "",
                "output": " ".join(rng.choice(words) for _ in range(8)),
            }
        )
    data = write_jsonl(rows, out / "prompts.jsonl")
    model = build_tiny_llama(out / "model", [" ".join(words)] * 4, hidden=hidden, layers=layers, heads=max(hidden // 64, 4))
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (model / "config.json").write_text(json.dumps(config))
    return model, data


def recipe_for(model: Path, data: Path, args) -> Recipe:
    from launcher.config.recipe import validate_recipe

    return validate_recipe(
        {
            "name": "eval-bench",
            "model": {"name_or_path": str(model), "dtype": args.dtype},
            "data": {"train_file": str(data), "template": "plain", "max_length": 2048},
            "distributed": {"device": args.device},
            "eval": {
                "data": str(data),
                "max_examples": args.examples,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
            },
        },
        source="eval_bench",
    )


def naive_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> int:
    """The seed's shape: fixed batches in input order, padding="longest", left padded."""
    from launcher.evaluate.decoding import generated_length

    tokens = 0
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], padding="longest", return_tensors="pt").to(model.device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, batch["input_ids"].shape[1] :].cpu().tolist():
            tokens += generated_length(row, tokenizer.eos_token_id)
    return tokens


def loops(recipe, repeats: int = 2) -> list[dict]:
    import torch

    from launcher.evaluate.shards import eval_examples, generate
    from launcher.models.loading import load_base_model, load_tokenizer

    device = "cuda" if recipe.distributed.device == "cuda" else "cpu"
    tokenizer = load_tokenizer(recipe, padding_side="left")
    model = load_base_model(recipe).to(device).eval()
    examples = eval_examples(recipe, None)
    prompts = [e.prompt for e in examples]
    e = recipe.eval
    results = []
    with torch.no_grad():
        naive_generate(model, tokenizer, prompts[: e.batch_size], e.batch_size, 4)  # warm-up
        for _ in range(repeats):
            for name in ("naive", "launch"):
                sync(device)
                started = time.perf_counter()
                if name == "naive":
                    tokens = naive_generate(model, tokenizer, prompts, e.batch_size, e.max_new_tokens)
                else:
                    tokens = sum(count for _, count in generate(model, tokenizer, examples, recipe))
                sync(device)
                seconds = time.perf_counter() - started
                results.append(
                    {
                        "contender": name,
                        "generated_tokens": tokens,
                        "seconds": round(seconds, 3),
                        "tokens_per_s": round(tokens / seconds, 1),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    return results


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def sharded(recipe, out: Path, shards: int, backend: str = "hf") -> dict:
    from rich.console import Console

    from launcher.evaluate.shards import System, plan_evaluation
    from launcher.launch.pipeline import run_evaluation

    folder = out / f"eval-{shards}-shards-{backend}"
    shutil.rmtree(folder, ignore_errors=True)
    recipe.eval.shards, recipe.eval.backend = shards, backend
    plan_evaluation(recipe, [System("base", None)], folder)
    started = time.perf_counter()
    # Fresh processes for 1 shard too (one local job, a task per shard): the same start-up cost.
    result = run_evaluation(recipe, folder, "local", Console(quiet=True))
    seconds = time.perf_counter() - started
    tokens = result["speed"]["base"]["generated_tokens"]
    row = {
        "contender": f"launch eval, {shards} shard(s), {backend}",
        "examples": result["examples"],
        "generated_tokens": tokens,
        "wall_s": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "predictions": str(folder / "predictions.jsonl"),
    }
    print(json.dumps(row), flush=True)
    return row


def agreement(hf: dict, vllm: dict) -> float:
    """The share of prompts whose greedy answer is the same text under both backends."""
    read = lambda row: [json.loads(line)["base"] for line in Path(row["predictions"]).read_text().splitlines()]
    pairs = list(zip(read(hf), read(vllm)))
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def machine(device: str) -> str:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    cores = len(os.sched_getaffinity(0))
    gpu = f"{torch.cuda.get_device_name()}, " if device == "cuda" else ""
    return f"{gpu}{cores} cores of {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--out", type=Path, default=Path("/tmp/eval-bench"))
    parser.add_argument("--vllm", action="store_true", help="also `launch eval` with eval.backend = vllm (a GPU and vllm)")
    args = parser.parse_args()
    from launcher.models.loading import quiet_libraries

    quiet_libraries(args.device)
    shutil.rmtree(args.out, ignore_errors=True)
    model, data = build(args.out, args.hidden, args.layers, args.examples)
    recipe = recipe_for(model, data, args)
    print(
        json.dumps(
            {
                "machine": machine(args.device),
                "date": time.strftime("%Y-%m-%d"),
                "device": args.device,
                "hidden": args.hidden,
                "layers": args.layers,
                "examples": args.examples,
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
            }
        ),
        flush=True,
    )
    rows = loops(recipe)
    best = {name: max(r["tokens_per_s"] for r in rows if r["contender"] == name) for name in ("naive", "launch")}
    one, two = sharded(recipe, args.out, 1), sharded(recipe, args.out, 2)
    ratios = {
        "launch_over_naive_tokens_per_s": round(best["launch"] / best["naive"], 2),
        "two_shards_over_one_wall": round(one["wall_s"] / two["wall_s"], 2),
    }
    if args.vllm:
        fast = sharded(recipe, args.out, 1, backend="vllm")
        ratios |= {
            "vllm_over_hf_tokens_per_s": round(fast["tokens_per_s"] / one["tokens_per_s"], 2),
            "vllm_hf_greedy_agreement": round(agreement(one, fast), 3),
        }
    print(json.dumps(ratios))


if __name__ == "__main__":
    sys.exit(main())
