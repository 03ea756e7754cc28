"""The streaming merge equals PEFT's merge_and_unload for every mergeable adapter kind on every
architecture family the seeds and their peers use (fp32, <= 1e-5 on the logits), with adapters
randomised off their identity start (no training needed; DoRA's magnitudes too): OPT, GPT-2 (Conv1D weights stored as
(in, out)), GPT-NeoX, Bloom, Qwen2, Mistral, Gemma (tied embeddings), Phi-3 (fused projections),
Falcon, and the seeds' own TransNormerLLM and ChatGLM (upstream remote code). Adapters trained on a
quantized base (qlora, lora-8bit; bitsandbytes turns Conv1D into Linear) merge into the
unquantized base as PEFT merges them there."""

from __future__ import annotations

import pytest
from conftest import SIZES

# family -> (config class, extra config, attention targets, feed-forward target)
FAMILIES = {
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64), ["q_proj", "v_proj"], "fc2"),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64), ["c_attn", "attn.c_proj"], "mlp.c_proj"),
    "gpt_neox": ("GPTNeoXConfig", {}, ["query_key_value", "attention.dense"], "dense_4h_to_h"),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4), ["query_key_value", "self_attention.dense"], "dense_4h_to_h"),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2), ["q_proj", "v_proj"], "down_proj"),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2), ["q_proj", "o_proj"], "down_proj"),
    "gemma": (
        "GemmaConfig",
        dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
        ["q_proj", "v_proj"],
        "down_proj",
    ),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, pad_token_id=0), ["qkv_proj", "o_proj"], "down_proj"),
    "falcon": (
        "FalconConfig",
        dict(new_decoder_architecture=False, multi_query=True),
        ["query_key_value", "self_attention.dense"],
        "dense_4h_to_h",
    ),
}
SEED_FAMILIES = {  # tiny models from the seeds' upstream code (tests/seed_models.py)
    "transnormer": (["qkvu_proj", "out_proj"], "l3"),
    "chatglm3": (["query_key_value", "self_attention.dense"], "dense_4h_to_h"),
}
KINDS = ["lora", "rslora", "dora", "adalora", "ia3", "ia3-attention-only"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (model dir, attention targets, feed-forward target); seed families skip without ../shared."""
    return {}


def base_for(family: str, bases: dict, tmp_path_factory):
    if family in bases:
        return bases[family]
    import torch
    import transformers

    out = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    if family in SEED_FAMILIES:
        from seed_models import build_seed_model, require_upstream

        require_upstream()
        build_seed_model(family, out)
        attention, feedforward = SEED_FAMILIES[family]
    else:
        name, extra, attention, feedforward = FAMILIES[family]
        config = getattr(transformers, name)(**(SIZES | extra))
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # biases start at zero, where a merge that forgets them would still pass
            for param_name, param in model.named_parameters():
                if param_name.endswith(".bias"):
                    param.add_(torch.randn_like(param) * 0.1)
        model.save_pretrained(out)
    bases[family] = (out, attention, feedforward)
    return bases[family]


def load(path, **extra):
    import torch

    from launcher.models.loading import load_pretrained

    return load_pretrained(str(path), torch.float32, trust_remote_code=True, **extra).eval()


def adapter_config(kind: str, attention: list[str], feedforward: str):
    import peft

    targets = attention + [feedforward]
    if kind == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    if kind == "rslora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True, alpha_pattern={feedforward: 2})
    if kind == "dora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    if kind == "adalora":
        return peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=targets)
    if kind == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[feedforward])
    return peft.IA3Config(target_modules=attention, feedforward_modules=[])


def randomise(model) -> None:
    """Move every adapter off its identity start, so the merge has something to do."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("lora_B", "lora_E", "ia3_l", "lora_magnitude_vector")):
                param.add_(torch.randn_like(param) * 0.1)


def merged_logits(base_dir, adapter_dir, out_dir, tokens):
    import torch

    from launcher.adapters.streaming_merge import stream_merge

    done = stream_merge(str(base_dir), adapter_dir, out_dir, trust_remote_code=True)
    assert done["merged_weights"] > 0
    with torch.no_grad():
        return load(out_dir)(input_ids=tokens).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", [*FAMILIES, *SEED_FAMILIES])
def test_streaming_merge_equals_merge_and_unload(family, kind, bases, tmp_path_factory, tmp_path):
    import peft
    import torch

    base_dir, attention, feedforward = base_for(family, bases, tmp_path_factory)
    torch.manual_seed(1)
    model = peft.get_peft_model(load(base_dir), adapter_config(kind, attention, feedforward))
    randomise(model)
    model.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        adapted = model(input_ids=tokens).logits
        want = model.merge_and_unload()(input_ids=tokens).logits
    assert (want - adapted).abs().max().item() <= 1e-4  # PEFT's own merge is the reference
    got = merged_logits(base_dir, tmp_path / "adapter", tmp_path / "merged", tokens)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("family", ["gpt2", "qwen2", "phi3"])
def test_an_adapter_of_a_quantized_base_merges_into_the_unquantized_base_as_peft_does(
    family, bits, bases, tmp_path_factory, tmp_path
):
    import peft
    import torch
    from transformers import BitsAndBytesConfig

    base_dir, attention, feedforward = base_for(family, bases, tmp_path_factory)
    quantization = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    quantized = load(base_dir, quantization_config=quantization, device_map={"": "cpu"})
    torch.manual_seed(1)
    model = peft.get_peft_model(quantized, peft.LoraConfig(r=4, lora_alpha=8, target_modules=attention + [feedforward]))
    randomise(model)
    model.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(3, 200, (2, 9))
    reloaded = peft.PeftModel.from_pretrained(load(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        base_logits = load(base_dir)(input_ids=tokens).logits
        want = reloaded.merge_and_unload()(input_ids=tokens).logits
    assert (want - base_logits).abs().max().item() > 1e-3  # the adapter does something
    got = merged_logits(base_dir, tmp_path / "adapter", tmp_path / "merged", tokens)
    assert (got - want).abs().max().item() <= 1e-5
