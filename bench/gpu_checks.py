"""The GPU checks no CPU test can make: NCCL, bf16, QLoRA / 8-bit on CUDA, ZeRO-3 on a GPU, and
the pre-flight memory estimate against torch.cuda.max_memory_allocated.

    python bench/gpu_checks.py [--hidden 2048] [--layers 12] [--steps 30] [--out /tmp/gpu-checks]

Builds a random Llama (bf16, ~0.45B parameters with the defaults) on the quickstart's parity
data and trains each variant end to end with `launch` (train, streaming merge, eval), one rank
on the one GPU. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "lora-bf16-zero2": ['peft.method="lora"', 'distributed.deepspeed="zero2"'],
    "lora-bf16-zero3": ['peft.method="lora"', 'distributed.deepspeed="zero3"'],
    "qlora-bf16-zero2": ['peft.method="qlora"', 'distributed.deepspeed="zero2"'],
    "lora-8bit-bf16-zero2": ['peft.method="lora-8bit"', 'distributed.deepspeed="zero2"'],
}


def build_model(out: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.assets import build_tokenizer, corpus_of, parity_rows

    if (out / "config.json").exists():
        return out
    tokenizer = build_tokenizer(corpus_of(parity_rows(1200)), out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 256,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, max_shard_size="500MB")
    return out


def run_variant(name: str, model: Path, out: Path, steps: int, device: str = "cuda") -> dict:
    overrides = VARIANTS[name] + [
        f'model.name_or_path="{model}"',
        'model.dtype="bf16"',
        f'distributed.device="{device}"',
        "distributed.procs_per_node=1",
        f"train.max_steps={steps}",
        "train.learning_rate=2e-4",
        "train.save_steps=10",
        "eval.max_examples=64",
        "eval.batch_size=32",
        'data.train_file="' + str(REPO / "recipes/assets/parity/train.jsonl") + '"',
    ]
    command = [sys.executable, "-m", "launcher.cli", str(REPO / "recipes/quickstart.toml"), "--run-dir", str(out / name)]
    for item in overrides:
        command += ["--set", item]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    result = {"variant": name, "rc": done.returncode, "wall_s": round(time.time() - started, 1)}
    estimate = re.search(r"memory per device \(estimate[^)]*\): ([\d.]+ [MG]iB)", done.stdout)
    result["preflight_estimate"] = estimate.group(1) if estimate else None
    run = out / name
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    train = manifest.get("train") or {}
    result |= {
        "peak_accelerator_mib": train.get("peak_accelerator_mib"),
        "train_wall_s": train.get("wall_s"),
        "launch_to_first_step_s": manifest.get("launch_to_first_step_s"),
    }
    rows = (
        [json.loads(line) for line in (run / "logs/train_metrics.jsonl").read_text().splitlines()]
        if (run / "logs/train_metrics.jsonl").exists()
        else []
    )
    if rows:
        result |= {
            "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"],
            "tokens_per_second": round(sum(r["tokens_per_second"] for r in rows[2:]) / max(len(rows) - 2, 1), 1),
        }
    log = (run / "logs/rank0.log").read_text() if (run / "logs/rank0.log").exists() else ""
    result["topology"] = next((line for line in log.splitlines() if "backend" in line), None)
    metrics = run / "eval/metrics.json"
    if metrics.exists():
        result["eval"] = {
            s: {k: round(v, 4) for k, v in m.items() if k in ("loss", "exact_match")}
            for s, m in json.loads(metrics.read_text())["systems"].items()
        }
    if done.returncode != 0:
        result["error"] = (done.stderr or done.stdout)[-1500:] + log[-1500:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-checks"))
    parser.add_argument("--device", default="cuda", help="cpu only to try this script out")
    args = parser.parse_args()
    model = build_model(args.out / "model", args.hidden, args.layers)
    for name in args.variants:
        print(json.dumps(run_variant(name, model, args.out, args.steps, args.device)), flush=True)


if __name__ == "__main__":
    main()
