"""The streaming merge (one base shard at a time) equals PEFT's merge_and_unload, for every
mergeable adapter kind, on a base saved in several shards."""

from __future__ import annotations

import json

import pytest

from launcher.models.loading import load_pretrained


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory, tiny_assets):
    import torch

    out = tmp_path_factory.mktemp("sharded")
    load_pretrained(tiny_assets["model"], torch.float32).save_pretrained(out, max_shard_size="100KB")
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return out


def adapter_configs():
    import peft

    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        "rslora": peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_rslora=True,
            alpha_pattern={"v_proj": 2},
            init_lora_weights=False,
        ),
        "adalora": peft.AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
        "ia3": peft.IA3Config(task_type="CAUSAL_LM"),
    }


@pytest.mark.parametrize("kind", ["lora", "rslora", "adalora", "ia3"])
def test_streaming_merge_equals_merge_and_unload(kind, sharded_base, tmp_path):
    import peft
    import torch

    from launcher.adapters.streaming_merge import shard_names, stream_merge

    torch.manual_seed(0)
    model = peft.get_peft_model(load_pretrained(sharded_base, torch.float32), adapter_configs()[kind])
    with torch.no_grad():  # move every adapter off its identity start, so the merge has something to do
        for name, param in model.named_parameters():
            if any(part in name for part in ("lora_B", "lora_E", "ia3_l")):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = model.merge_and_unload()(input_ids=tokens).logits
    done = stream_merge(str(sharded_base), tmp_path / "adapter", tmp_path / "merged")
    assert done["shards"] == len(shard_names(sharded_base)) > 1 and done["merged_weights"] > 0
    merged = load_pretrained(tmp_path / "merged", torch.float32)
    with torch.no_grad():
        got = merged(input_ids=tokens).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_an_adapter_of_another_base_is_refused(sharded_base, tmp_path):
    import torch
    from safetensors.torch import save_file

    from launcher.adapters.streaming_merge import stream_merge
    from launcher.errors import UserError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8, "r": 2}))
    save_file(
        {
            "base_model.model.model.layers.0.mlp.fc_in.lora_A.weight": torch.ones(2, 64),
            "base_model.model.model.layers.0.mlp.fc_in.lora_B.weight": torch.ones(64, 2),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    with pytest.raises(UserError, match="1 adapted weights not found .* is this the adapter's base model"):
        stream_merge(str(sharded_base), adapter, tmp_path / "merged")
