"""One shard of a planned evaluation, in one process (a local process or a SLURM task): every
unfinished system's losses and answers on every K-th example, HF or vLLM answering, and the
benchmarks of the systems that fall to this shard. Each system's shard is saved as it finishes, so
a killed shard resumes with the systems it had left."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config.hardware import resolve_device
from launcher.config.recipe import Recipe, validate_recipe
from launcher.data.examples import Example, tokenize
from launcher.evaluate import probe
from launcher.evaluate.benchmarks import run_benchmarks
from launcher.evaluate.generation import evaluate_examples, failure_text, hf_batch, peft_type_of, selected, with_adapters
from launcher.evaluate.plan import benchmarks_left
from launcher.evaluate.vllm import answers, best_next_logprobs, fallback_lines, prompt_ids, split_systems, start_engine
from launcher.models.loading import load_base_model, load_tokenizer, quiet_libraries
from launcher.rundir.evaldir import BenchmarkRecord, BenchmarkSpec, EvalDir, EvalPlan, ShardMarker, System
from launcher.rundir.runs import accelerator_peak_mib, peak_rss_mib


def run_shard(out: Path, shard: int, device: str | None = None, started: float | None = None) -> None:
    """Evaluate every unfinished system on shard `shard`'s examples (every K-th, from `shard`), and
    run the benchmarks of the systems that fall to this shard; `started` is when this shard's
    process began (its markers record it)."""

    folder = EvalDir(Path(out))
    plan = folder.plan()
    recipe = validate_recipe(plan.recipe, source=str(folder.plan_path))
    pending = [s for s in plan.systems if not folder.shard_done(s.name, shard, plan.shards)]
    benchmarking = benchmarks_left(out, plan, shard)
    if not (pending or benchmarking):
        return
    device = device or shard_device(resolve_device(recipe.distributed.device), shard)
    quiet_libraries(device.split(":")[0])
    examples = [Example(**row) for row in folder.example_rows()]
    indices = list(range(shard, len(examples), plan.shards))
    tokenizer = load_tokenizer(recipe, padding_side="left")
    work = Work(folder, plan, recipe, tokenizer, [examples[i] for i in indices], indices, shard, started)
    served, prompts = [], []
    if recipe.eval.backend == "vllm" and pending and all(e.prompt for e in work.examples):
        prompts = prompt_ids(tokenizer, work.examples)
        served, work.hf_because = split_systems(recipe, pending, device, prompts)
        for line in fallback_lines(work.hf_because):
            print(line, flush=True)
    waiting = with_hf(work, device, pending, benchmarking, served)
    if waiting:
        answer_with_vllm(work, waiting, prompts, device)


@dataclass
class Work:
    """One shard's evaluation: where it goes, what it evaluates, on which examples."""

    folder: EvalDir
    plan: EvalPlan
    recipe: Recipe
    tokenizer: object
    """Left-padded, for generation; loaded once per shard."""
    examples: list[Example]
    indices: list[int]
    shard: int
    started: float | None
    hf_because: dict[str, str] = field(default_factory=dict)
    """Why HF generate answers for a system although eval.backend = vllm, by system name."""

    def save(self, system: System, rows: list[dict], seconds: float, failure: str | None, backend: str = "hf") -> None:
        """The system's rows on this shard, then the marker: generation time and backend, this
        process's start and peaks, and why generation failed (when it did)."""
        for index, row in zip(self.indices, rows):
            row["index"] = index
        marker = ShardMarker(
            examples=len(rows),
            new_tokens=sum(r["new_tokens"] for r in rows),
            seconds=round(seconds, 3),
            backend=backend,
            node=os.environ.get("SLURMD_NODENAME", os.uname().nodename),
            started=self.started or time.time() - seconds,
            finished=time.time(),
            peak_rss_mib=peak_rss_mib(),
            peak_accelerator_mib=accelerator_peak_mib(),
            generation_failed=failure,
            hf_because=self.hf_because.get(system.name),
        )
        self.folder.write_shard(system.name, self.shard, self.plan.shards, rows, marker)


def with_hf(work: Work, device: str, pending: list[System], benchmarking: list[System], served: list[System]) -> dict:
    """The HF model's part: benchmarks, reference losses, and answers for the systems vLLM does not
    serve (saved); returns the rows and seconds of those it does, waiting for their answers."""
    import torch

    recipe, tokenizer = work.recipe, work.tokenizer
    waiting = {}
    for group in by_peft_type(pending + benchmarking):  # peft holds adapters of one type in a model
        adapted = {s.name: s for s in group if s.adapter}  # each adapter loaded once
        model = with_adapters(load_base_model(recipe).to(device).eval(), list(adapted.values()))
        check_adapters(model, tokenizer, work, list(adapted.values()))
        for system in (s for s in pending if s in group):
            torch.manual_seed(recipe.eval.seed + work.shard)
            began = time.time()
            with torch.no_grad(), selected(model, system):
                rows, failure = evaluate_examples(model, tokenizer, work.examples, recipe, answer=system not in served)
            if system in served:
                waiting[system] = (rows, time.time() - began)
            else:
                work.save(system, rows, time.time() - began, failure)
        for system in (s for s in benchmarking if s in group):  # after generation: the harness may change the model
            began = time.time()
            with selected(model, system):
                record = benchmark_record(model, tokenizer, work.plan.benchmarks, recipe, began)
            work.folder.write_benchmarks(system.name, record)
        del model
    return waiting


def check_adapters(model, tokenizer, work: Work, adapted: list[System]) -> None:
    """Every adapter changes the base model's next tokens, and reproduces the trained model's
    (where its probe was saved): before any is scored."""
    if not adapted:
        return
    batch = hf_batch(tokenizer, [tokenize(e, tokenizer, work.recipe.data.max_length) for e in work.examples[: probe.PROMPTS]])
    with selected(model, System(name="base")):
        base = probe.hf_logprobs(model, batch)
    for system in adapted:
        with selected(model, system):
            probe.check_changes(system.name, probe.hf_logprobs(model, batch), base, "HF")
            trained = probe.saved_probe(system.adapter)
            if trained is not None:
                got = probe.hf_logprobs(model, {"input_ids": trained.input_ids, "attention_mask": trained.attention_mask})
                probe.check_matches(system.name, got, trained.logprobs, work.recipe, "HF")


def check_served_adapters(engine, tokenizer, work: Work, systems: list[System]) -> None:
    """The same checks as check_adapters, of the engine's answers: each adapter vLLM serves changes
    the base model's next tokens and reproduces the trained model's (numbered as for its answers)."""
    rows = [tokenize(e, tokenizer, work.recipe.data.max_length)["input_ids"] for e in work.examples[: probe.PROMPTS]]
    base = best_next_logprobs(engine, rows, None, 0, probe.POSITIONS)
    for number, system in enumerate(systems, start=1):
        if system.adapter is None:
            continue
        adapted = best_next_logprobs(engine, rows, system.adapter, number, probe.POSITIONS)
        probe.check_changes(system.name, adapted, base, "vLLM")
        trained = probe.saved_probe(system.adapter)
        unpadded, want = trained.unpadded() if trained is not None else ([], [])
        if unpadded:
            got = best_next_logprobs(engine, unpadded, system.adapter, number, probe.POSITIONS)
            probe.check_matches(system.name, got, want, work.recipe, "vLLM")


def by_peft_type(systems: list[System]) -> list[list[System]]:
    """The systems in groups of one adapter type (the base model with the first), in order of
    first appearance; a system both answered and benchmarked appears once."""
    kinds = {system: peft_type_of(system.adapter) for system in systems if system.adapter}
    first = next(iter(kinds.values()), None)
    groups: dict[str | None, list[System]] = {}
    for system in dict.fromkeys(systems):
        groups.setdefault(kinds.get(system, first), []).append(system)
    return list(groups.values())


def answer_with_vllm(work: Work, waiting: dict, prompts: list[list[int]], device: str) -> None:
    """Answers from one vLLM engine for the systems it serves (the HF model is gone by now)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    tokenizer = work.tokenizer
    engine = start_engine(work.recipe, [system.adapter for system in waiting if system.adapter], prompts, device)
    check_served_adapters(engine, tokenizer, work, list(waiting))
    for number, (system, (rows, seconds)) in enumerate(waiting.items(), start=1):
        began, failure = time.time(), None
        try:
            replies = answers(engine, tokenizer, work.examples, prompts, work.recipe, system.adapter, number)
        except Exception as err:  # the losses stand, as with HF generation
            replies, failure = [("", 0)] * len(rows), failure_text(err)
        for row, (text, count) in zip(rows, replies):
            row.update(prediction=text, new_tokens=count)
        work.save(system, rows, seconds + time.time() - began, failure, backend="vllm")


def shard_device(device: str, shard: int) -> str:
    """cuda:N for shard N on a machine with several GPUs (SLURM hands each task its own)."""
    if device != "cuda":
        return device
    import torch

    return f"cuda:{shard % max(torch.cuda.device_count(), 1)}"


def benchmark_record(model, tokenizer, spec: BenchmarkSpec, recipe: Recipe, began: float) -> BenchmarkRecord:
    """lm-eval's results for the selected system, or why there are none (the rest of the
    evaluation keeps its results: a benchmark's dataset missing offline is no reason to lose them)."""
    try:
        results = run_benchmarks(model, tokenizer, spec, recipe.eval.batch_size, recipe.eval.seed)
        return BenchmarkRecord(results=results, seconds=round(time.time() - began, 2))
    except Exception as err:
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        return BenchmarkRecord(failed=why, seconds=round(time.time() - began, 2))
