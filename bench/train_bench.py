"""Training throughput: the seed's loop vs `launch` (defaults, and each speed option alone) vs a
hand-tuned loop, at equal examples per step; real (non-pad) tokens per second, held-out loss after
the same steps, and model FLOP utilisation.

    python bench/train_bench.py [--device cpu|cuda] [--steps 12] [--out /tmp/train_bench]
    python bench/train_bench.py --device cuda --shape llama3-8b --micro-batch 24 --ranks 1 --checkpointing \
        --contenders launch,bf16,hand-tuned --peak-tflops 989

On a GPU a packed micro-batch of 24 examples is one row of about 4,100 tokens; the seed's fp32 loop
does not fit an 8B model there, so it is left out; --set KEY=VALUE passes recipe overrides to the
launch contenders (peft.method="qlora", distributed.deepspeed="zero3").

Builds a Llama-shaped model with random weights (default "100m": hidden 768, 8 layers, FFN 2048,
32,000-word vocabulary, 106M parameters) and alpaca-format data whose prompt + response lengths
are log-uniform between 32 and 512 tokens (a word-level tokenizer: one word, one token); the
response is a fixed word-for-word mapping of the prompt, so the adapter has something to learn.
LoRA r = 16 on every linear layer, micro batch 8 per rank, 2 ranks, ZeRO-2, the same seed and
learning rate everywhere. Contenders, one after the other in one run, the seed's loop first and
again last (the drift between the two says how noisy the machine was):
  seed:      HF Trainer + DataCollatorForSeq2Seq padding to the longest, fp32, shuffled: the
             seeds' loop, run through `launch` with data.batching = "padded", model.dtype = "fp32";
  launch:    `launch` with its defaults (on a bf16-capable CPU: bf16 and packed batches);
  packed / grouped / bf16: one option alone over the seed's settings;
  hand-tuned: a loop a strong engineer writes without the launcher: torch.distributed (gloo/NCCL),
             DDP over the LoRA parameters, the base in bf16 with bf16 autocast, padding-free rows
             (position ids restart per example), fused AdamW where the device has it.
Real tokens per second count every non-pad token a step trains on, over the steps after the
first two (warm-up), from the logged step times. Held-out loss: the trained adapter on 64 held-out
examples, fp32, token-weighted, the same code for every contender. MFU: (4 x non-embedding
parameters (output head included) per token + causal attention, 12 x layers x hidden x n^2 / 2 per
example of n tokens) / time, against the bf16 matmul peak measured here in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "100m": dict(hidden_size=768, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12),
    "llama3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8
    ),
}
VOCAB = 32000
LEARNING_RATE = 2e-3  # high for LoRA, so that a few steps move the held-out loss


# ---------------------------------------------------------------- assets


def build_assets(out: Path, shape: str, examples: int, max_length: int, seed: int = 0) -> dict[str, Path]:
    """Model (fp32 safetensors), word-level tokenizer and train / held-out data, built once per folder."""
    done = out / "assets.json"
    if done.exists() and json.loads(done.read_text()).get("examples") == examples:
        return {k: Path(v) for k, v in json.loads(done.read_text()).items() if k != "examples"}
    rng = random.Random(seed)
    mapping = list(range(4, VOCAB))
    rng.shuffle(mapping)
    weights = [1 / (rank + 1) for rank in range(VOCAB - 4)]  # Zipf: a few words common, most rare

    def row() -> dict:
        total = int(math.exp(rng.uniform(math.log(32), math.log(min(512, max_length)))))
        prompt = max(1, int(total * rng.uniform(0.3, 0.7)))
        words = rng.choices(range(4, VOCAB), weights=weights, k=prompt)
        answer = [mapping[w - 4] for w in words][: total - prompt - 1] or [mapping[words[0] - 4]]
        return {"instruction": " ".join(f"w{w}" for w in words), "input": "", "output": " ".join(f"w{w}" for w in answer)}

    paths = {"model": out / "model", "train": out / "train.jsonl", "held_out": out / "held_out.jsonl"}
    for name, count in (("train", examples), ("held_out", 64)):
        paths[name].write_text("".join(json.dumps(row()) + "\n" for _ in range(count)))
    if (
        not (paths["model"] / "config.json").exists()
        or json.loads((paths["model"] / "config.json").read_text())["hidden_size"] != SHAPES[shape]["hidden_size"]
    ):
        build_model(paths["model"], shape)
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()} | {"examples": examples}))
    return paths


def build_model(out: Path, shape: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    if shape != "llama3-8b":
        LlamaForCausalLM(config).save_pretrained(out)
        return
    torch.set_default_dtype(torch.bfloat16)  # 8B random weights made in bf16 straight away (32 GB in fp32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    model.save_pretrained(out)  # the rotary buffers are not saved: loading rebuilds them


# ---------------------------------------------------------------- contenders


def recipe_text(paths: dict, args, **settings) -> str:
    """The benchmark recipe; `settings` are (section.key, TOML value) overrides."""
    lines = {
        "model.name_or_path": json.dumps(str(paths["model"])),
        "data.train_file": json.dumps(str(paths["train"])),
        "data.eval_fraction": "0.0",
        "data.max_length": str(args.max_length),
        "peft.method": '"lora"',
        "peft.r": "16",
        "peft.alpha": "32.0",
        "peft.target_modules": '"all-linear"',
        "train.learning_rate": str(LEARNING_RATE),
        "train.max_steps": str(args.steps),
        "train.micro_batch_size": str(args.micro_batch),
        "train.save_steps": str(args.steps),
        "train.seed": "42",
        "distributed.procs_per_node": str(args.ranks),
        "distributed.deepspeed": '"zero2"',
        "distributed.device": json.dumps(args.device),
        "eval.enabled": "false",
        "merge.enabled": "false",
    } | settings
    sections: dict[str, list[str]] = {}
    for key, value in lines.items():
        section, leaf = key.split(".", 1)
        sections.setdefault(section, []).append(f"{leaf} = {value}")
    return 'name = "bench"\n' + "".join(f"\n[{s}]\n" + "\n".join(body) + "\n" for s, body in sections.items())


LAUNCH_CONTENDERS = {
    "seed": {"data.batching": '"padded"', "model.dtype": '"fp32"'},
    "launch": {},
    "packed": {"data.batching": '"packed"', "model.dtype": '"fp32"'},
    "grouped": {"data.batching": '"grouped"', "model.dtype": '"fp32"'},
    "bf16": {"data.batching": '"padded"', "model.dtype": '"bf16"'},
}


def run_launch(name: str, paths: dict, args, out: Path) -> dict:
    run_dir = out / "runs" / name
    recipe = out / f"{name}.toml"
    settings = LAUNCH_CONTENDERS[name.split("#")[0]] | dict(item.split("=", 1) for item in args.set)
    if args.checkpointing:
        settings["train.gradient_checkpointing"] = "true"
    recipe.write_text(recipe_text(paths, args, **settings))
    started = time.time()
    result = subprocess.run(["launch", str(recipe), "--run-dir", str(run_dir)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: launch failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    chosen = next(line for line in (run_dir / "logs" / "rank0.log").read_text().splitlines() if line.startswith("batching:"))
    return {"rows": rows, "adapter": run_dir / "adapter", "wall_s": time.time() - started, "settings": chosen}


def run_hand_tuned(paths: dict, args, out: Path) -> dict:
    """The hand-tuned loop in `args.ranks` fresh processes (torchrun), as its author would run it."""
    target = out / "runs" / "hand-tuned"
    target.mkdir(parents=True, exist_ok=True)
    started = time.time()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}", "--master-port=29655",
        __file__, "--hand-tuned-rank", str(target), "--device", args.device, "--steps", str(args.steps),
        "--micro-batch", str(args.micro_batch), "--max-length", str(args.max_length), "--out", str(out),
        *(["--checkpointing"] if args.checkpointing else []),
    ]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    if result.returncode != 0:
        raise SystemExit(f"hand-tuned loop failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "adapter": target / "adapter", "wall_s": time.time() - started, "settings": "hand-tuned"}


def hand_tuned_rank(target: Path, args) -> None:
    """One rank of the hand-tuned loop: bf16 base, fp32 LoRA under bf16 autocast, padding-free rows."""
    import peft
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.data.examples import IGNORE_INDEX
    from launcher.train.batching import packed_batch

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    paths = json.loads((Path(args.out) / "assets.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    examples = []
    for line in Path(paths["train"]).read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer(row["instruction"] + "\n")["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(
            {
                "input_ids": (prompt + answer)[: args.max_length],
                "labels": ([IGNORE_INDEX] * len(prompt) + answer)[: args.max_length],
            }
        )
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.bfloat16).to(device)
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=16, lora_alpha=32, target_modules="all-linear")
    if getattr(args, "checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=True)  # adapter weights stay fp32
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(42)).tolist()
    per_step = args.micro_batch * world
    log = open(target / "metrics.jsonl", "w") if rank == 0 else None
    seen = 0
    for step in range(args.steps):
        chosen = order[step * per_step : (step + 1) * per_step][rank::world]
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in packed_batch([examples[i] for i in chosen]).items()}
        counts = torch.tensor([float((batch["labels"][..., 1:] != IGNORE_INDEX).sum()), float(batch["input_ids"].numel())])
        dist.all_reduce(counts)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss_sum = torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )
        (loss_sum * world / counts[0]).backward()  # DDP averages: token-weighted over both ranks
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        reduced = loss_sum.detach().clone()
        dist.all_reduce(reduced)
        seen += int(counts[1])
        if log:
            log.write(
                json.dumps({"step": step + 1, "loss": float(reduced / counts[0]), "tokens_seen": seen, "time": time.time()})
                + "\n"
            )
            log.flush()
    if rank == 0:
        model.module.save_pretrained(str(target / "adapter"))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- measuring


def held_out_loss(paths: dict, adapter: Path, device: str) -> float:
    """Token-weighted loss of base + adapter on the held-out rows, fp32, one example at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in Path(paths["held_out"]).read_text().splitlines():
            row = json.loads(line)
            prompt = tokenizer(row["instruction"] + "\n")["input_ids"]
            answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + answer], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum").item()
            count += len(answer)
    return total / count


def flops_per_token_and_attention(paths: dict, shape: str) -> tuple[float, float]:
    """(4 x non-embedding parameters incl. the head, causal attention FLOPs per token^2 of an example)."""
    s = SHAPES[shape]
    h, layers, ffn = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ffn
    return 4 * (layers * per_layer + h * VOCAB), 12 * layers * h / 2


def matmul_peak(device: str, dtype_name: str, threads: int) -> float:
    """Measured dense matmul FLOP/s of this machine in `dtype` (best of 5; all cores on CPU)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def summarise(name: str, result: dict, paths: dict, args, per_token: float, attention: float, peak: float) -> dict:
    rows = result["rows"]
    warm = rows[min(1, len(rows) - 2)]  # timing from the end of step 2: compilation, caches and first steps excluded
    last = rows[-1]
    tokens = last["tokens_seen"] - warm["tokens_seen"]
    seconds = last["time"] - warm["time"]
    lengths = example_lengths(paths, args.max_length)
    mean_square_over_mean = sum(n * n for n in lengths) / sum(lengths)  # attention work per token
    flops = tokens * (per_token + attention * mean_square_over_mean)
    return {
        "contender": name,
        "real_tokens_per_s": tokens / seconds,
        "train_loss_last": last["loss"],
        "held_out_loss": held_out_loss(paths, result["adapter"], args.device),
        "real_tokens": last["tokens_seen"],
        "mfu": flops / seconds / peak,
        "wall_s": result["wall_s"],
        "settings": result["settings"],
    }


def example_lengths(paths: dict, max_length: int) -> list[int]:
    lengths = []
    for line in Path(paths["train"]).read_text().splitlines():
        row = json.loads(line)
        lengths.append(min(len(row["instruction"].split()) + len(row["output"].split()) + 1, max_length))
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="100m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--contenders", default="seed,launch,packed,grouped,bf16,hand-tuned,seed#2")
    parser.add_argument("--out", default="/tmp/train_bench")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every contender")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE (TOML value) for the launch contenders")
    parser.add_argument(
        "--peak-tflops", type=float, help="MFU against this peak (H100 SXM dense bf16: 989) instead of the measured one"
    )
    parser.add_argument("--hand-tuned-rank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hand_tuned_rank:
        return hand_tuned_rank(Path(args.hand_tuned_rank), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = args.steps * args.micro_batch * args.ranks
    paths = build_assets(out, args.shape, examples, args.max_length)
    per_token, attention = flops_per_token_and_attention(paths, args.shape)
    threads = os.cpu_count() or 1
    peaks = {d: matmul_peak(args.device, d, threads) for d in ("bfloat16", "float32")}
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peaks["bfloat16"]
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cores": threads, "peak_flops": peaks}))
    results = []
    for name in args.contenders.split(","):
        run = run_hand_tuned(paths, args, out) if name == "hand-tuned" else run_launch(name, paths, args, out)
        results.append(summarise(name, run, paths, args, per_token, attention, peak))
        print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps({"peaks": peaks, "results": results}, indent=2))
    print_table(results)


def print_table(results: list[dict]) -> None:
    seeds = [r["real_tokens_per_s"] for r in results if r["contender"].startswith("seed")]
    baseline = sum(seeds) / len(seeds) if seeds else results[0]["real_tokens_per_s"]
    hand = next((r for r in results if r["contender"] == "hand-tuned"), None)
    print("| contender | real tok/s | x seed | x hand-tuned | held-out loss | last train loss | MFU (bf16 peak) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        versus_hand = f"{r['real_tokens_per_s'] / hand['real_tokens_per_s']:.2f}" if hand else "-"
        print(
            f"| {r['contender']} | {r['real_tokens_per_s']:.0f} | {r['real_tokens_per_s'] / baseline:.2f} | {versus_hand} | "
            f"{r['held_out_loss']:.4f} | {r['train_loss_last']:.4f} | {100 * r['mfu']:.1f}% |"
        )


if __name__ == "__main__":
    main()
