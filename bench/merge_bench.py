"""Streaming merge vs PEFT merge_and_unload + save_pretrained, and a plain copy of the same files.

    python bench/merge_bench.py [--hidden 2048] [--layers 12] [--out /tmp/merge-bench]

Builds a random Llama of about 2.5 GB (fp32, saved in 1 GB shards) and a LoRA adapter on all
linear layers, then runs each contender in its own process (so peak RSS is its own) one after
the other in the same run: `cp` of the shards (the disk's limit), the streaming merge, and
PEFT's merge_and_unload + save_pretrained. Prints one JSON line per contender and the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(out: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = out / "base", out / "adapter"
    if base.exists() and adapter.exists():
        return base, adapter
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=32000,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(base, max_shard_size="1GB")
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    tuned.save_pretrained(adapter)
    return base, adapter


def contender(kind: str, base: Path, adapter: Path, out: Path) -> dict:
    from launcher.rundir.runs import peak_rss_mib

    started = time.perf_counter()
    if kind == "copy":
        out.mkdir(parents=True)
        for path in base.iterdir():
            shutil.copy(path, out / path.name)
    elif kind == "streaming":
        from launcher.adapters.streaming_merge import stream_merge

        stream_merge(str(base), adapter, out)
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out, max_shard_size="1GB")
    return {"contender": kind, "wall_s": round(time.perf_counter() - started, 2), "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("/tmp/merge-bench"))
    parser.add_argument("--one", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, base, adapter, out = args.one
        print(json.dumps(contender(kind, Path(base), Path(adapter), Path(out))))
        return
    base, adapter = build(args.out, args.hidden, args.layers)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(json.dumps({"base_gb": round(size / 1e9, 2), "shards": len(list(base.glob("*.safetensors")))}))
    results = {}
    for kind in ("copy", "streaming", "peft"):
        target = args.out / f"out-{kind}"
        shutil.rmtree(target, ignore_errors=True)
        done = subprocess.run(
            [sys.executable, __file__, "--one", kind, str(base), str(adapter), str(target)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[kind]))
        shutil.rmtree(target, ignore_errors=True)
    print(
        json.dumps(
            {
                "peak_rss_peft_over_streaming": round(results["peft"]["peak_rss_mib"] / results["streaming"]["peak_rss_mib"], 2),
                "wall_peft_over_streaming": round(results["peft"]["wall_s"] / results["streaming"]["wall_s"], 2),
                "wall_streaming_over_copy": round(results["streaming"]["wall_s"] / results["copy"]["wall_s"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
