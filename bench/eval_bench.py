"""Evaluation throughput: launch's batched generation vs a naive loop shaped like the seed's
`batch_generate_data`, and `launch eval` with 2 shards vs 1.

    python bench/eval_bench.py [--hidden 256] [--layers 4] [--examples 256] [--device cpu|cuda] [--vllm]

Builds a random Llama and prompts of mixed length (log-uniform, 4 to 256 words). Both loops
decode greedily with the same model, prompts, batch size and max_new_tokens, and count
generated tokens the same way (up to EOS); they alternate, twice each, in one process:
  naive:  fixed batches in input order, left padding to the longest prompt of the batch;
  launch: launcher.evaluate.shards.generate (batches of length-sorted prompts).
Then the whole `launch eval` path (plan, shards, reference loss, metrics, report) on the base
model with eval.shards = 1 and 2, each in fresh processes.

With --vllm (run it with the vLLM environment's Python: .venv-vllm/bin/python, built by
requirements/vllm-env, or a GPU venv with vllm): vLLM against HF generate and the seed-style loop
on the same prompts, for the base model and a LoRA adapter (random, rank 8 on every projection),
greedy; vLLM's tok/s with the engine's start-up excluded and included, and the share of prompts
whose answers agree with HF generate's (every disagreement printed with its first diverging token).
Prints JSON lines and the ratios.
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
from contextlib import nullcontext
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

    from launcher.evaluate.generation import generate
    from launcher.evaluate.plan import eval_examples
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

    from launcher.evaluate.plan import plan_evaluation
    from launcher.launch.pipeline import run_evaluation
    from launcher.rundir.evaldir import System

    folder = out / f"eval-{shards}-shards-{backend}"
    shutil.rmtree(folder, ignore_errors=True)
    recipe.eval.shards, recipe.eval.backend = shards, backend
    plan_evaluation(recipe, [System(name="base")], folder)
    started = time.perf_counter()
    # Fresh processes for 1 shard too (one local job, a task per shard): the same start-up cost.
    result = run_evaluation(recipe, folder, "local", Console(quiet=True))
    seconds = time.perf_counter() - started
    tokens = result.speed["base"].generated_tokens
    row = {
        "contender": f"launch eval, {shards} shard(s), {backend}",
        "examples": result.examples,
        "generated_tokens": tokens,
        "wall_s": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "predictions": str(folder / "predictions.jsonl"),
    }
    print(json.dumps(row), flush=True)
    return row


def random_lora(recipe, out: Path) -> Path:
    """A LoRA adapter of rank 8 on every projection, B random (a trained one's stand-in)."""
    from peft import LoraConfig, get_peft_model

    from launcher.models.loading import load_base_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_base_model(recipe), config).save_pretrained(out)
    return out


def vllm_against_hf(recipe, out: Path, device: str) -> dict:
    """HF generate, the seed-style loop and vLLM on the same prompts, base and LoRA."""
    import gc

    import torch
    from peft import PeftModel

    from launcher.evaluate.generation import generate
    from launcher.evaluate.plan import eval_examples
    from launcher.evaluate.vllm import answers, prompt_ids, start_engine
    from launcher.models.loading import load_base_model, load_tokenizer

    adapter = random_lora(recipe, out / "lora")
    tokenizer, examples, e = load_tokenizer(recipe, padding_side="left"), eval_examples(recipe, None), recipe.eval
    model = PeftModel.from_pretrained(load_base_model(recipe), str(adapter)).to(device).eval()
    prompts_text, hf, rows = [x.prompt for x in examples], {}, []
    for system in ("base", "lora"):
        with torch.no_grad(), model.disable_adapter() if system == "base" else nullcontext():
            started = time.perf_counter()
            naive_tokens = naive_generate(model, tokenizer, prompts_text, e.batch_size, e.max_new_tokens)
            naive_s, started = time.perf_counter() - started, time.perf_counter()
            hf[system] = generate(model, tokenizer, examples, recipe)
            hf_s = time.perf_counter() - started
        rows += [
            {"contender": "seed-style loop", "system": system, "tokens_per_s": round(naive_tokens / naive_s, 1)},
            {"contender": "launch HF generate", "system": system, "tokens_per_s": round(sum(n for _, n in hf[system]) / hf_s, 1)},
        ]
    del model
    gc.collect()
    prompts = prompt_ids(tokenizer, examples)
    started = time.perf_counter()
    engine = start_engine(recipe, [str(adapter)], prompts, device)
    startup, served_s, served_tokens = time.perf_counter() - started, 0.0, 0
    for system, lora in (("base", None), ("lora", str(adapter))):
        started = time.perf_counter()
        fast = answers(engine, tokenizer, examples, prompts, recipe, lora, 1)
        seconds, tokens = time.perf_counter() - started, sum(n for _, n in fast)
        served_s, served_tokens = served_s + seconds, served_tokens + tokens
        differ = [(i, a, b) for i, ((a, _), (b, _)) in enumerate(zip(hf[system], fast)) if a != b]
        for i, a, b in differ:
            print(f"  {system} prompt {i}: {first_difference(tokenizer, a, b)}", flush=True)
        agreement = round(1 - len(differ) / len(examples), 3)
        rows.append(
            {"contender": "vLLM", "system": system, "tokens_per_s": round(tokens / seconds, 1), "agreement_with_hf": agreement}
        )
    for row in rows:
        print(json.dumps(row), flush=True)
    with_startup = {
        "contender": "vLLM, engine start-up included",
        "startup_s": round(startup, 1),
        "tokens_per_s": round(served_tokens / (served_s + startup), 1),
    }
    print(json.dumps(with_startup), flush=True)
    best = {(r["contender"], r["system"]): r["tokens_per_s"] for r in rows}
    return {
        "vllm_over_hf_base": round(best[("vLLM", "base")] / best[("launch HF generate", "base")], 2),
        "vllm_over_hf_lora": round(best[("vLLM", "lora")] / best[("launch HF generate", "lora")], 2),
        "vllm_over_seed_loop_lora": round(best[("vLLM", "lora")] / best[("seed-style loop", "lora")], 2),
        "vllm_with_startup_over_hf_lora": round(with_startup["tokens_per_s"] / best[("launch HF generate", "lora")], 2),
        "agreement_base": next(r["agreement_with_hf"] for r in rows if r["contender"] == "vLLM" and r["system"] == "base"),
        "agreement_lora": next(r["agreement_with_hf"] for r in rows if r["contender"] == "vLLM" and r["system"] == "lora"),
    }


def first_difference(tokenizer, a: str, b: str) -> str:
    x, y = tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer(b, add_special_tokens=False)["input_ids"]
    at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    piece = lambda ids: repr(tokenizer.decode(ids[at : at + 1])) if at < len(ids) else "<end>"  # noqa: E731
    return f"token {at}: HF {piece(x)} vs vLLM {piece(y)}"


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
    parser.add_argument("--vllm", action="store_true", help="vLLM against HF generate, base and LoRA (the vLLM environment)")
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
    if args.vllm:
        print(json.dumps(vllm_against_hf(recipe, args.out, args.device)))
        return
    rows = loops(recipe)
    best = {name: max(r["tokens_per_s"] for r in rows if r["contender"] == name) for name in ("naive", "launch")}
    one, two = sharded(recipe, args.out, 1), sharded(recipe, args.out, 2)
    ratios = {
        "launch_over_naive_tokens_per_s": round(best["launch"] / best["naive"], 2),
        "two_shards_over_one_wall": round(one["wall_s"] / two["wall_s"], 2),
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    sys.exit(main())
