"""Packing without cross-contamination (data.batching = "packed"), proven on numbers:

- the packing probe is right about every architecture on the installed transformers: where it
  proves packing, each example of a packed row has the logits it has alone (fp32, <= 1e-5), and
  where it refuses, they really differ (or the forward cannot take the row); its verdict is cached
  per stack and said in one line;
- the loss and the LoRA gradients of a packed micro-batch equal those of the same examples padded,
  token-weighted as the Trainer computes them, also over two accumulated micro-batches;
- a 2-rank run with gradient accumulation trains step for step as the padded run does (e2e).
"""

from __future__ import annotations

import json

import pytest
from conftest import SIZES, run_launch, tiny_recipe_text, write_recipe

from launcher.models.loading import load_pretrained
from launcher.train.batching import packed_batch
from launcher.train.packing import TOLERANCE, cache_dir, choose_batching, packing_verdict

# model type -> (config class, extra config): one tiny model per type the registry speaks for
CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16)),
    "phi": ("PhiConfig", {}),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "starcoder2": ("Starcoder2Config", dict(num_key_value_heads=2)),
    "olmo": ("OlmoConfig", {}),
    "granite": ("GraniteConfig", {}),
    "cohere": ("CohereConfig", {}),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64)),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4)),
    "falcon": ("FalconConfig", dict(new_decoder_architecture=False, multi_query=True)),
}
LENGTHS = [5, 9, 3]


def tiny_model(model_type: str):
    import torch
    import transformers

    name, extra = CONFIGS[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, name)(**(SIZES | extra))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def packed_error(model, vocab: int = 250) -> float:
    """Max |logits of the packed row - logits of each example alone| (inf: the forward refused the row)."""
    import torch

    torch.manual_seed(1)
    examples = [{"input_ids": torch.randint(3, vocab, (n,)).tolist(), "labels": [0] * n} for n in LENGTHS]
    batch = packed_batch(examples)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples])
        try:
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        except TypeError:  # its forward takes no position ids
            return float("inf")
    return (packed - alone).abs().max().item()


def recipe_for(tmp_path, tiny_assets, *overrides):
    from launcher.config.recipe import load_recipe

    return load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_assets)), list(overrides))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_the_probe_packs_exactly_the_architectures_that_keep_examples_apart(model_type, tmp_path, fresh_cache):
    """The test's own tiny model (its sizes, its seed) measures the truth; the probe, given only the
    architecture's config.json, must reach the same verdict on whatever transformers is installed."""
    import transformers

    model = tiny_model(model_type)
    error = packed_error(model)
    model.config.save_pretrained(tmp_path / model_type)
    verdict = packing_verdict(str(tmp_path / model_type))
    assert verdict.kind in ("proven", "crosses", "cannot"), verdict.why  # it could build and run the architecture
    assert verdict.packs == (error <= TOLERANCE), f"{model_type}: probe says {verdict.why}; the real error is {error}"
    assert error <= TOLERANCE or error > 100 * TOLERANCE, f"{model_type}: {error} is too close to call"
    if verdict.packs:
        assert verdict.why.startswith(f"proven on transformers {transformers.__version__} for {model_type} (max diff ")
    else:
        assert f"transformers {transformers.__version__}" in verdict.why or "forward" in verdict.why, verdict.why


def test_the_probe_remembers_its_verdict_per_stack(tmp_path, tiny_assets, fresh_cache):
    """The second ask is read from the cache (well under a second); another transformers version or
    another architecture is probed anew."""
    import time
    from unittest import mock

    first = packing_verdict(str(tiny_assets["model"]))
    assert first.packs and not first.cached and len(list((fresh_cache / "packing").iterdir())) == 1
    started = time.perf_counter()
    again = packing_verdict(str(tiny_assets["model"]))
    assert again.cached and again.why == first.why and time.perf_counter() - started < 0.5
    assert cache_dir() == fresh_cache
    with mock.patch("transformers.__version__", "99.0.0"):  # a new release: proven again, on that release
        upgraded = packing_verdict(str(tiny_assets["model"]))
    assert not upgraded.cached and "transformers 99.0.0" in upgraded.why
    assert len(list((fresh_cache / "packing").iterdir())) == 2


def test_auto_packs_what_the_probe_proves_and_explicit_packing_of_a_crossing_model_is_refused(tmp_path, tiny_assets, fresh_cache):
    from launcher.train.packing import batching_problems

    layout, why = choose_batching(recipe_for(tmp_path, tiny_assets))
    assert layout == "packed" and why.startswith("auto: proven on transformers ") and "for llama (max diff" in why
    model = tiny_model("opt")
    model.config.save_pretrained(tmp_path / "opt")
    opt = [f'model.name_or_path="{tmp_path / "opt"}"']
    layout, why = choose_batching(recipe_for(tmp_path, tiny_assets, *opt))
    assert layout == "grouped" and "opt's attention crosses packed examples" in why and "learned positions" in why
    errors, _ = batching_problems(recipe_for(tmp_path, tiny_assets, *opt, 'data.batching="packed"'))
    assert len(errors) == 1 and errors[0].startswith('data.batching: "packed" cannot work here (opt')


@pytest.mark.parametrize("seed", ["transnormer", "chatglm3"])
def test_the_seed_models_really_cannot_pack_and_fall_back_to_grouped(seed, tmp_path, tiny_assets, fresh_cache):
    """Their remote code, probed: TransNormer takes no position ids; ChatGLM's mask spans the row."""
    import torch
    from seed_models import build_seed_model, require_upstream

    from launcher.models.loading import load_pretrained, model_type_of

    require_upstream()
    build_seed_model(seed, tmp_path / seed)
    model = load_pretrained(str(tmp_path / seed), torch.float32, trust_remote_code=True).eval()
    assert packed_error(model) > 100 * TOLERANCE
    kind = model_type_of(str(tmp_path / seed))
    sets = [f'model.name_or_path="{tmp_path / seed}"', "model.trust_remote_code=true"]
    layout, why = choose_batching(recipe_for(tmp_path, tiny_assets, *sets))
    expected = {"transnormer": "transnormer's forward takes no position ids", "chatglm": "chatglm's attention crosses packed"}
    assert layout == "grouped" and why.startswith(f"auto: {expected[kind]}"), why
    assert "diff inf" not in why and "nan" not in why, why  # measured on initialised weights, not on torch.empty's memory


def tokenized_examples(tmp_path, tiny_assets, count: int) -> tuple[list[dict], object]:
    """The first `count` training examples of the tiny recipe, tokenized (numbers of 1-4 digits: lengths differ)."""
    from launcher.data.examples import to_example, tokenize
    from launcher.models.loading import load_tokenizer

    recipe = recipe_for(tmp_path, tiny_assets)
    tokenizer = load_tokenizer(recipe)
    rows = [json.loads(line) for line in tiny_assets["train_file"].read_text().splitlines()[:count]]
    examples = [tokenize(to_example(row, recipe.data), tokenizer, 64) for row in rows]
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], tokenizer


def lora_model(tiny_assets):
    import peft
    import torch

    torch.manual_seed(0)
    model = load_pretrained(str(tiny_assets["model"]), torch.float32)
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear")
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # B off zero, so the adapter takes part in the forward and has gradients into A
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def step_loss_and_grads(model, micro_batches: list[dict]) -> tuple[float, dict]:
    """As the Trainer does: each micro-batch's summed loss over the whole step's trained tokens."""
    import torch

    model.zero_grad()
    trained = sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss = model(**batch, num_items_in_batch=torch.tensor(trained)).loss
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_packed_step_has_the_loss_and_gradients_of_the_padded_step(tmp_path, tiny_assets):
    from transformers import DataCollatorForSeq2Seq

    examples, tokenizer = tokenized_examples(tmp_path, tiny_assets, 12)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    padded = [pad([dict(e) for e in examples[:6]]), pad([dict(e) for e in examples[6:]])]  # two accumulated micro-batches
    packed = [packed_batch(examples[:6]), packed_batch(examples[6:])]
    assert int(padded[0]["attention_mask"].eq(0).sum()) > 0 and packed[0]["input_ids"].shape[0] == 1
    model = lora_model(tiny_assets)
    padded_loss, padded_grads = step_loss_and_grads(model, padded)
    packed_loss, packed_grads = step_loss_and_grads(model, packed)
    assert abs(packed_loss - padded_loss) <= TOLERANCE, (packed_loss, padded_loss)
    worst = max((packed_grads[n] - padded_grads[n]).abs().max().item() for n in padded_grads)
    assert worst <= TOLERANCE, worst
    assert max(g.abs().max().item() for g in padded_grads.values()) > 100 * TOLERANCE  # the check has teeth


@pytest.mark.e2e
def test_two_ranks_with_accumulation_train_the_same_packed_as_padded(tmp_path, tiny_assets):
    """Same seed and examples per step: the loss of every step is the padded run's (fp32)."""
    losses = {}
    for layout in ("packed", "padded"):
        extra = "[merge]\nenabled = false\n"
        text = tiny_recipe_text(tiny_assets, name=layout, extra=extra).replace("max_steps = 12", "max_steps = 4")
        text = text.replace("micro_batch_size = 8", "micro_batch_size = 4\ngradient_accumulation_steps = 2")
        text = text.replace("[eval]", "[eval]\nenabled = false")
        recipe = write_recipe(tmp_path, text, f"{layout}.toml")
        run_dir = tmp_path / layout
        result = run_launch(str(recipe), "--run-dir", str(run_dir), "--set", f'data.batching="{layout}"')
        assert result.returncode == 0, result.stdout + result.stderr
        rows = [json.loads(line) for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
        losses[layout] = [row["loss"] for row in rows]
        assert f"batching: {layout}" in (run_dir / "logs" / "rank0.log").read_text()
    assert len(losses["packed"]) == 4
    assert losses["packed"] == pytest.approx(losses["padded"], abs=TOLERANCE)
