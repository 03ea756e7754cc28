"""Whether a run packs its micro-batches (data.batching), proven on the installed stack.

Packing is only correct when the model's attention stays inside each example of a packed row. That
is a fact about installed code (transformers' version of the architecture, or the model's remote
code), which a table cannot keep: Falcon crossed examples on transformers 5.23 and keeps them apart
on 5.24. So pre-flight and every rank ask this probe: build a tiny instance of the recipe's own
architecture (its config with small sizes and 2 layers, random fp32 weights, its remote code when
trusted), run one packed row and each of its examples alone, and pack only if the logits agree
within TOLERANCE. The verdict is cached per (shrunk config, transformers, torch, remote code,
attention implementation), so after the first time it costs a file read.

The probe runs on the CPU with the attention implementation the recipe asks for (sdpa, the models'
default, stands in for flash_attention_2, which takes the same packed position ids on GPUs).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from launcher.config.quirks import quirks_for
from launcher.config.recipe import Recipe
from launcher.models.loading import random_model
from launcher.models.remote_code import config_json, load_config
from launcher.train.batching import packed_batch

TOLERANCE = 1e-5  # fp32 logits of a packed example vs the same example alone (tests/test_batching.py)
LENGTHS = (5, 9, 3)  # the probe's examples: different lengths, so a crossing shows in every one but the first
VERDICT_FORMAT = "packing verdict v2"  # v2: ChatGLM norms initialised (v1 verdicts read torch.empty memory)

# Small values for the size keys architectures use (set only where the config has the key).
SMALL = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "decoder_embed_dim": 64, "word_embed_proj_dim": 64, "hidden_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "decoder_attention_heads": 4,
    "head_dim": 16, "kv_channels": 16, "rotary_dim": 8,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "glu_dim": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 32,
    "first_k_dense_replace": 1,
}  # fmt: skip
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")


@dataclass(frozen=True)
class Verdict:
    packs: bool
    kind: str  # "proven" | "crosses" | "cannot" (its forward takes no packed row) | "unprobed" (it could not be built)
    why: str  # the line pre-flight and the rank's log print
    diff: float | None = None  # max |packed - alone| of the logits
    cached: bool = False


def recipe_verdict(recipe: Recipe) -> Verdict:
    """The packing probe's verdict for the recipe's model, with the attention it trains with."""
    m, attention = recipe.model, recipe.train.attention
    return cached_verdict(m.name_or_path, m.revision, m.trust_remote_code, attention if attention in ("eager", "sdpa") else None)


@cache  # pre-flight asks three times; the probe (or its cache file) answers once per process
def cached_verdict(name_or_path: str, revision: str | None, trust_remote_code: bool, attention: str | None) -> Verdict:
    return packing_verdict(name_or_path, revision, trust_remote_code, attention)


def packing_refusal(recipe: Recipe) -> tuple[str, str] | None:
    """None when this model and method can pack; else ("refused" | "unverified", why)."""
    if recipe.peft.spec.prompt_learning:
        return "refused", f"{recipe.peft.method} puts its virtual tokens before each row, not each example"
    if not recipe.train.objective_spec.packs:
        return "refused", f'train.objective = "{recipe.train.objective}" pads its pairs (TRL has no packed preference batches)'
    verdict = recipe_verdict(recipe)
    if verdict.packs:
        return None
    return ("unverified" if verdict.kind == "unprobed" else "refused"), verdict.why


def choose_batching(recipe: Recipe) -> tuple[str, str]:
    """(layout, why): data.batching resolved for this model and method ("auto": packed where proven)."""
    if recipe.data.batching != "auto":
        return recipe.data.batching, "data.batching"
    refusal = packing_refusal(recipe)
    if refusal is None:
        return "packed", f"auto: {recipe_verdict(recipe).why}"
    return "grouped", f"auto: {refusal[1]}"


def batching_problems(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(errors, warnings) of data.batching for this model: packing asked where it cannot work."""
    if recipe.data.batching != "packed":
        return [], []
    refusal = packing_refusal(recipe)
    if refusal is None:
        return [], []
    kind, why = refusal
    if kind == "refused":
        return [f'data.batching: "packed" cannot work here ({why}); use "grouped" (or "auto")'], []
    return [], [f'data.batching: "packed" is unproven here ({why}): its examples may attend to each other; "auto" uses "grouped"']


def cache_dir() -> Path:
    """LAUNCHER_CACHE_DIR, else the user's cache folder (XDG_CACHE_HOME or ~/.cache)/peft-launcher."""
    if os.environ.get("LAUNCHER_CACHE_DIR"):
        return Path(os.environ["LAUNCHER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft-launcher"


def packing_verdict(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, attention=None) -> Verdict:
    """The probe's verdict for this model, from the cache when the same stack answered before."""

    try:
        config = tiny_config(load_config(name_or_path, revision, trust_remote_code))
    except Exception as err:  # noqa: BLE001  (a config that cannot be had or shrunk: unproven, said so)
        return unprobed(config_json(name_or_path, revision).get("model_type"), err)
    path = cache_dir() / "packing" / f"{cache_key(config, name_or_path, revision, trust_remote_code, attention)}.json"
    try:
        return Verdict(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # not probed on this stack yet (or a file of another format)
        pass
    verdict = probe(config, name_or_path, revision, trust_remote_code, attention)
    if verdict.kind != "unprobed":  # a failure to build may be this machine's: not remembered
        store(path, asdict(verdict) | {"cached": True})
    return verdict


def store(path: Path, document: dict) -> None:
    """Written to a temporary file and renamed: ranks probing at once never read half a verdict."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(document, handle)
        os.replace(handle.name, path)
    except OSError:  # a read-only home: the verdict stands, it is only not remembered
        pass


def tiny_config(config):
    """A copy of the config with small sizes and 2 layers; per-layer lists cut to those 2 layers."""
    config = copy.deepcopy(config)
    quirks = quirks_for(getattr(config, "model_type", None))
    layers_key = next((k for k in (quirks.layers_key, "num_hidden_layers") if isinstance(getattr(config, k, None), int)), None)
    layers = getattr(config, layers_key) if layers_key else None
    heads = next((getattr(config, k) for k in ("num_attention_heads", "decoder_attention_heads") if hasattr(config, k)), None)
    for key, value in SMALL.items():
        shrink(config, key, value)
    for key in KV_HEAD_KEYS:  # keep the attention's kind: multi-head, grouped or multi-query
        kv = getattr(config, key, None)
        shrink(config, key, 4 if kv == heads else 1 if kv == 1 else 2)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and layers and len(value) == layers:
            setattr(config, key, value[:2])
    return config


def shrink(config, key: str, value: int) -> None:
    """Set an integer size the config holds; derived sizes (read-only properties) follow the others."""
    current = getattr(config, key, None)
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            setattr(config, key, value)
        except AttributeError:  # a property computed from other sizes
            pass


def cache_key(config, name_or_path: str, revision, trust_remote_code: bool, attention) -> str:
    import torch
    import transformers

    parts = {
        "format": VERDICT_FORMAT,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "code": remote_code_digest(name_or_path, revision) if trust_remote_code else None,
        "attention": attention,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def remote_code_digest(name_or_path: str, revision) -> str | None:
    """sha256 over the model's own .py files (a local dir, or the hub's cached snapshot)."""
    folder = Path(name_or_path)
    if not folder.is_dir():  # a hub id: the snapshot its config.json was cached in
        from transformers.utils import cached_file

        folder = Path(cached_file(name_or_path, "config.json", revision=revision)).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def probe(config, name_or_path: str, revision, trust_remote_code: bool, attention) -> Verdict:
    """Build the tiny instance and compare its packed row with its examples alone."""
    import transformers

    version = transformers.__version__
    model_type = getattr(config, "model_type", None) or "this"
    reason = quirks_for(model_type).packing_note
    try:
        model = tiny_instance(config, name_or_path, revision, trust_remote_code, attention)
    except Exception as err:  # noqa: BLE001  (its code cannot be built this way: unproven, said so)
        return unprobed(model_type, err)
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return Verdict(
            False, "cannot", f"{model_type}'s forward takes no position ids, so a packed row cannot be told apart{tail(reason)}"
        )
    try:
        alone = logits_alone(model)
    except Exception as err:  # noqa: BLE001  (the tiny instance does not run: unproven, said so)
        return unprobed(model_type, err)
    try:
        diff = packed_difference(model, alone)
    except (TypeError, RuntimeError, ValueError) as err:  # its forward cannot take a packed row
        return Verdict(
            False,
            "cannot",
            f"{model_type}'s forward cannot take a packed row ({type(err).__name__}: {first_line(err)}){tail(reason)}",
        )
    if diff <= TOLERANCE:
        return Verdict(True, "proven", f"proven on transformers {version} for {model_type} (max diff {diff:.1e})", diff)
    return Verdict(
        False,
        "crosses",
        f"{model_type}'s attention crosses packed examples on transformers {version} (diff {diff:.2g}){tail(reason)}",
        diff,
    )


def tail(reason: str | None) -> str:
    return f": {reason}" if reason else ""


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:120]


def unprobed(model_type: str | None, err: BaseException) -> Verdict:
    return Verdict(
        False,
        "unprobed",
        f"packing could not be proven for {model_type or 'this'} models ({type(err).__name__}: {first_line(err)})",
    )


def tiny_instance(config, name_or_path: str, revision, trust_remote_code: bool, attention):
    """The architecture with random fp32 weights on the CPU, its remote code repaired as for loading."""
    import torch

    if attention:
        config._attn_implementation = attention
    torch.manual_seed(0)
    return random_model(name_or_path, torch.float32, revision, trust_remote_code, config).float().eval()


def probe_examples(model) -> list[dict]:
    import torch

    vocab = min(int(model.get_input_embeddings().weight.shape[0]), 250)
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=generator).tolist(), "labels": [0] * n} for n in LENGTHS]


def logits_alone(model):
    """Each probe example's logits, run on its own, one after the other."""
    import torch

    with torch.no_grad():
        return torch.cat(
            [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in probe_examples(model)]
        )


def packed_difference(model, alone) -> float:
    """Max |logits of the packed row - logits of each example alone| (inf where they are not finite)."""
    import torch

    batch = packed_batch(probe_examples(model))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    difference = (packed.float() - alone.float()).abs().max().item()
    return float("inf") if difference != difference else difference
