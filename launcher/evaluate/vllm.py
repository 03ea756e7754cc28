"""vLLM as the evaluation's generation backend (`eval.backend = "vllm"`, optional extra [vllm]).

One vLLM engine over the base model answers for the base and for every LoRA-family adapter or
checkpoint (each a LoRARequest; `max_lora_rank` from the adapters' configs, since vLLM's default of
16 refuses larger ranks). The reference losses stay HF's (they need the logits of the reference),
computed first; the HF model is freed before the engine starts. HF generate stays where vLLM cannot
serve, each said in one line: a CPU, an adapter that is not plain LoRA (IA3, the prompt family,
DoRA), an architecture vLLM does not have.

vllm 0.33 pins torch==2.14 and transformers<5.21: install it in its own environment on the GPU
nodes (README, Evaluation: the commands).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from launcher.config import methods
from launcher.evaluate.decoding import answer_of
from launcher.models.loading import torch_dtype

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
INSTALL = "pip install 'peft-launcher[vllm]' (in its own environment: vllm pins its torch and transformers)"


def engine_refusal(recipe, device: str) -> str | None:
    """Why no system of this evaluation can be served by vLLM here (None: it can)."""
    if not device.startswith("cuda"):
        return f"vLLM runs on GPUs and this evaluation runs on {device}"
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed in this environment; {INSTALL}"
    from transformers import AutoConfig
    from vllm import ModelRegistry

    m = recipe.model
    config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    if not set(architectures) & set(ModelRegistry.get_supported_archs()):
        return f"vLLM has no implementation of {', '.join(architectures) or 'this model'}"
    return None


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


def split_systems(recipe, systems: list, device: str) -> tuple[list, list[str]]:
    """(the systems vLLM answers for, one line per system or reason HF generate keeps)."""
    refusal = engine_refusal(recipe, device)
    if refusal:
        return [], [f"eval.backend = vllm: {refusal}; generating with HF"]
    served, lines = [], []
    for system in systems:
        why = adapter_refusal(system.adapter) if system.adapter else None
        if why:
            lines.append(f"eval.backend = vllm: {system.name}: {why}; generating its answers with HF")
        else:
            served.append(system)
    return served, lines


def start_engine(recipe, adapters: list[str]):
    from vllm import LLM

    m = recipe.model
    return LLM(
        model=m.name_or_path,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        dtype=torch_dtype(recipe),
        seed=recipe.eval.seed,
        enable_lora=bool(adapters),
        max_lora_rank=max_lora_rank(adapters),
        max_loras=1,
    )


def answers(engine, tokenizer, examples: list, recipe, adapter: str | None, number: int) -> list[tuple[str, int]]:
    """(cleaned text, generated tokens up to EOS) per example, in order, from the engine; the
    prompts go in as the token ids HF generation would use."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    e = recipe.eval
    special = all(x.special_tokens for x in examples)
    prompts = [{"prompt_token_ids": tokenizer(x.prompt, add_special_tokens=special)["input_ids"]} for x in examples]
    sampling = SamplingParams(
        max_tokens=e.max_new_tokens,
        temperature=e.temperature if e.do_sample else 0.0,
        top_p=e.top_p if e.do_sample else 1.0,
        seed=e.seed,
        stop_token_ids=[tokenizer.eos_token_id],
    )
    request = LoRARequest(f"adapter-{number}", number, adapter) if adapter else None
    outputs = engine.generate(prompts, sampling, lora_request=request, use_tqdm=False)
    return [answer_of(tokenizer, list(output.outputs[0].token_ids), x.suffix) for x, output in zip(examples, outputs)]
