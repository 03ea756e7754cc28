"""Batch offline evaluation: the base model and adapters (or checkpoints) side by side, sharded
over processes or SLURM tasks, resumable shard by shard.

An evaluation folder holds:
    plan.json              what is evaluated: the resolved recipe, systems, data, shards, decoding
    examples.jsonl         the examples, in input order (fixed once, so every shard agrees)
    shards/S/shard-K.jsonl one system's predictions and reference losses for shard K's examples
    shards/S/shard-K.done  its completion marker (written last): a re-run skips this shard
    predictions.jsonl, metrics.json, report.md, report.html, *.png   once every shard is done
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.config.hardware import resolve_device
from launcher.config.quirks import quirks_for
from launcher.config.recipe import Recipe, validate_recipe
from launcher.data.examples import Example, load_examples, split_examples, tokenize
from launcher.errors import UserError
from launcher.evaluate.benchmarks import benchmark_spec, result_file, run_benchmarks, shard_of
from launcher.evaluate.benchmarks import collect as collect_benchmarks
from launcher.evaluate.decoding import answer_of, decode
from launcher.evaluate.report import write_report
from launcher.evaluate.scores import resolve_convention, text_scores
from launcher.evaluate.vllm import answers, split_systems, start_engine
from launcher.models.loading import load_base_model, load_tokenizer, quiet_libraries
from launcher.rundir.checkpoints import checkpoints_in, is_complete
from launcher.rundir.evaldir import EvalDir
from launcher.rundir.runs import (
    RunDir,
    accelerator_peak_mib,
    exclusive,
    made_by_launcher,
    mark_output,
    peak_rss_mib,
    set_aside,
    write_atomic,
)
from launcher.tracking.trackers import log_evaluation

DECODING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")


@dataclass(frozen=True)
class System:
    name: str  # "base", "adapter", "checkpoint-40", or "<run>/adapter" with several runs
    adapter: str | None  # adapter folder; None is the base model


# ---------------------------------------------------------------- planning


def systems_of(runs: list[RunDir], adapters: list[Path], checkpoints: str, base: bool = True) -> list[System]:
    """base, then each run's final adapter (and complete checkpoints with checkpoints="all"),
    then adapter folders given directly."""

    several = len(runs) + len(adapters) > 1
    found = [System("base", None)] if base else []
    for run in runs:
        prefix = f"{run.root.name}/" if several else ""
        if checkpoints == "all":
            found += [System(f"{prefix}{c.name}", str(c.resolve())) for c in checkpoints_in(run.checkpoints) if is_complete(c)]
        if run.adapter.exists():
            found.append(System(f"{prefix}adapter", str(run.adapter.resolve())))
    for adapter in adapters:
        found.append(System(f"{adapter.parent.name}/{adapter.name}" if several else adapter.name, str(adapter.resolve())))
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise UserError([f"two systems would share a name ({', '.join(names)}); evaluate them in separate --out folders"])
    return found


def eval_examples(recipe: Recipe, data: str | None) -> list[Example]:

    tokenizer = load_tokenizer(recipe) if recipe.data.template == "tokenizer" else None
    if data or recipe.eval.data:
        examples, _ = load_examples(str(data or recipe.eval.data), recipe.data, tokenizer)
    else:
        examples = split_examples(recipe, tokenizer).held_out
    if not examples:
        raise UserError(["eval: no examples to evaluate; set data.eval_file, data.eval_fraction > 0 or pass --data FILE"])
    return examples[: recipe.eval.max_examples]


def plan_evaluation(
    recipe: Recipe,
    systems: list[System],
    out: Path,
    data: str | None = None,
    overwrite: bool = False,
    runs: list[RunDir] = (),
    set_aside_other: bool = False,
) -> dict:
    """Write plan.json and examples.jsonl into `out`, or find the same plan there (a resume).

    A finished or different evaluation in `out` is replaced only with overwrite=True (or, for the
    run's own final evaluation, set_aside_other=True when it is a different one), and then moved
    aside, never deleted; a folder the launcher did not write is never used."""
    settings = recipe.eval
    benchmarks = benchmark_spec(settings.benchmarks, settings.benchmark_tasks_dir, settings.benchmark_limit)  # before any work
    examples = eval_examples(recipe, data)
    lines = [json.dumps(asdict(e), ensure_ascii=False) for e in examples]
    plan = {
        "recipe": recipe.to_dict(),
        "systems": [asdict(s) for s in systems],
        "data": str(data or recipe.eval.data or "held-out split"),
        "shards": recipe.eval.shards,
        "examples": len(examples),
        "examples_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        "decoding": {key: getattr(recipe.eval, key) for key in DECODING_KEYS},
        "runs": [str(run.root.resolve()) for run in runs],  # their training curves go in the report
    } | ({"benchmarks": benchmarks} if benchmarks else {})
    old = read_plan(out)
    same = old is not None and {k: v for k, v in old.items() if k != "recipe"} == {k: v for k, v in plan.items() if k != "recipe"}
    if same and not overwrite:
        return old  # the same evaluation: resume its unfinished shards
    if old is not None and not (overwrite or set_aside_other):
        raise UserError(
            f"{out}: holds another evaluation ({describe_difference(old, plan)}); "
            f"pass --out DIR for a new one, or --overwrite to replace it (the old one is kept, renamed)"
        )
    if out.exists() and any(out.iterdir()):
        if not made_by_launcher(out):
            raise UserError(
                f"{out}: exists and is not an evaluation folder of the launcher; it is never replaced: pass --out DIR"
            )
        if old is not None:
            set_aside(out)  # a finished or different evaluation: kept, renamed
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "evaluation")
    write_atomic(EvalDir(out).examples, "\n".join(lines) + "\n")
    write_atomic(EvalDir(out).plan, json.dumps(plan, indent=2, ensure_ascii=False) + "\n")  # last: the plan stands
    return plan


def describe_difference(old: dict, new: dict) -> str:
    changed = [key for key in new if key != "recipe" and old.get(key) != new.get(key)]
    return "different " + ", ".join(changed) if changed else "a different plan"


def read_plan(out: Path) -> dict | None:
    path = EvalDir(Path(out)).plan
    return json.loads(path.read_text()) if path.is_file() else None


def shard_file(out: Path, system: str, shard: int, shards: int) -> Path:
    return EvalDir(Path(out)).shard_file(system, shard, shards)


marker_of = EvalDir.marker_of


def unfinished(out: Path, plan: dict) -> list[tuple[int, str]]:
    """(shard, work) not done yet: a system's answers on a shard, or its benchmarks."""
    answers = [
        (k, s["name"])
        for k in range(plan["shards"])
        for s in plan["systems"]
        if not marker_of(shard_file(out, s["name"], k, plan["shards"])).exists()
    ]
    return answers + [(shard_of(plan, s.name), f"{s.name} benchmarks") for s in benchmarks_left(out, plan, shard=None)]


def benchmarks_left(out: Path, plan: dict, shard: int | None) -> list[System]:
    """The systems whose benchmarks are not done (those of one shard, or of every shard with None)."""
    if not plan.get("benchmarks"):
        return []
    return [
        System(**s)
        for s in plan["systems"]
        if (shard is None or shard_of(plan, s["name"]) == shard) and not marker_of(result_file(out, s["name"])).exists()
    ]


# ---------------------------------------------------------------- one shard


def run_shard(out: Path, shard: int, device: str | None = None, started: float | None = None) -> None:
    """Evaluate every unfinished system on shard `shard`'s examples (every K-th, from `shard`), and
    run the benchmarks of the systems that fall to this shard; `started` is when this shard's
    process began (its markers record it)."""

    plan = read_plan(out)
    recipe = validate_recipe(plan["recipe"], source=str(EvalDir(Path(out)).plan))
    shards, systems = plan["shards"], [System(**s) for s in plan["systems"]]
    pending = [s for s in systems if not marker_of(shard_file(out, s.name, shard, shards)).exists()]
    benchmarking = benchmarks_left(out, plan, shard)
    if not (pending or benchmarking):
        return
    device = device or shard_device(resolve_device(recipe.distributed.device), shard)
    quiet_libraries(device.split(":")[0])
    examples = [Example(**json.loads(line)) for line in EvalDir(Path(out)).examples.read_text().splitlines()]
    indices = list(range(shard, len(examples), shards))
    served = []
    if recipe.eval.backend == "vllm" and pending and all(examples[i].prompt for i in indices):
        served, lines = split_systems(recipe, pending, device)
        for line in lines:
            print(line, flush=True)
    work = Work(out, plan, recipe, [examples[i] for i in indices], indices, shard, started)
    waiting = with_hf(work, device, pending, benchmarking, served)
    if waiting:
        answer_with_vllm(work, waiting)


@dataclass
class Work:
    """One shard's evaluation: where it goes, what it evaluates, on which examples."""

    out: Path
    plan: dict
    recipe: Recipe
    examples: list[Example]
    indices: list[int]
    shard: int
    started: float | None

    def save(self, system: System, rows: list[dict], seconds: float, failure: str | None, backend: str = "hf") -> None:
        for index, row in zip(self.indices, rows):
            row["index"] = index
        path = shard_file(self.out, system.name, self.shard, self.plan["shards"])
        save_shard(path, rows, seconds, self.started or time.time() - seconds, failure, backend)


def with_hf(work: Work, device: str, pending: list[System], benchmarking: list[System], served: list[System]) -> dict:
    """The HF model's part: benchmarks, reference losses, and answers for the systems vLLM does not
    serve (saved); returns the rows and seconds of those it does, waiting for their answers."""
    import torch

    recipe, tokenizer = work.recipe, load_tokenizer(work.recipe, padding_side="left")
    adapted = {s.name: s for s in pending + benchmarking if s.adapter}  # each adapter loaded once
    model = with_adapters(load_base_model(recipe).to(device).eval(), list(adapted.values()))
    waiting = {}
    for system in pending:
        torch.manual_seed(recipe.eval.seed + work.shard)
        began = time.time()
        with torch.no_grad(), selected(model, system):
            rows, failure = evaluate_examples(model, tokenizer, work.examples, recipe, answer=system not in served)
        if system in served:
            waiting[system] = (rows, time.time() - began)
        else:
            work.save(system, rows, time.time() - began, failure)
    for system in benchmarking:  # after generation: the harness may leave the tokenizer or model changed
        began = time.time()
        with selected(model, system):
            record = benchmark_record(model, tokenizer, work.plan["benchmarks"], recipe)
        save_benchmarks(work.out, system.name, record, time.time() - began)
    return waiting


def answer_with_vllm(work: Work, waiting: dict) -> None:
    """Answers from one vLLM engine for the systems it serves (the HF model is gone by now)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    tokenizer = load_tokenizer(work.recipe, padding_side="left")
    engine = start_engine(work.recipe, [system.adapter for system in waiting if system.adapter])
    for number, (system, (rows, seconds)) in enumerate(waiting.items(), start=1):
        began, failure = time.time(), None
        try:
            replies = answers(engine, tokenizer, work.examples, work.recipe, system.adapter, number)
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


def with_adapters(model, systems: list[System]):
    """One model holding every adapter (loaded once per shard); set_adapter picks one."""
    from peft import PeftModel

    for number, system in enumerate(systems):
        name = adapter_name(system)
        if number == 0:
            model = PeftModel.from_pretrained(model, system.adapter, adapter_name=name)
        else:
            model.load_adapter(system.adapter, adapter_name=name)
    return model.eval()


def adapter_name(system: System) -> str:
    return "a" + hashlib.sha1(system.name.encode()).hexdigest()[:10]  # peft names cannot hold "/" or "."


def selected(model, system: System):
    """The base model (adapters disabled) or one adapter, for a `with` block."""
    if system.adapter is None:
        return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    model.set_adapter(adapter_name(system))
    return nullcontext()


def benchmark_record(model, tokenizer, spec: dict, recipe: Recipe) -> dict:
    """lm-eval's results for the selected system, or why there are none (the rest of the
    evaluation keeps its results: a benchmark's dataset missing offline is no reason to lose them)."""
    try:
        return {"results": run_benchmarks(model, tokenizer, spec, recipe.eval.batch_size, recipe.eval.seed)}
    except Exception as err:
        return {"failed": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}


def save_benchmarks(out: Path, system: str, record: dict, seconds: float) -> None:
    path = result_file(out, system)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record | {"seconds": round(seconds, 2)}, indent=2) + "\n")
    write_atomic(marker_of(path), json.dumps({"finished": time.time()}) + "\n")  # last: the results stand


def save_shard(
    path: Path, rows: list[dict], seconds: float, started: float, failure: str | None = None, backend: str = "hf"
) -> None:
    """The rows, then the marker (last): generation time and backend, this process's start and
    peaks, and why generation failed (when it did)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    generated = sum(r["new_tokens"] for r in rows)
    write_atomic(
        marker_of(path),
        json.dumps(
            {
                "examples": len(rows),
                "new_tokens": generated,
                "seconds": round(seconds, 3),
                "backend": backend,
                "node": os.environ.get("SLURMD_NODENAME", os.uname().nodename),
                "started": started,
                "finished": time.time(),
                "peak_rss_mib": peak_rss_mib(),
                "peak_accelerator_mib": accelerator_peak_mib(),
            }
            | ({"generation_failed": failure} if failure else {})
        )
        + "\n",
    )


def shard_markers(out: Path) -> list[dict]:
    """Every completion marker of the planned evaluation in `out`."""
    plan = read_plan(out)
    return [
        json.loads(marker_of(shard_file(out, s["name"], k, plan["shards"])).read_text())
        for k in range(plan["shards"])
        for s in plan["systems"]
    ]


def evaluate_examples(
    model, tokenizer, examples: list[Example], recipe: Recipe, answer: bool = True
) -> tuple[list[dict], str | None]:
    """Per example: the reference's summed loss and token count, and (when there is a prompt to
    answer, and `answer`) the generated text and how many tokens it took. Generation that fails
    leaves the losses standing: the second value says why there are no answers (None when there are)."""
    rows = [dict(zip(("loss_sum", "loss_tokens"), pair)) for pair in reference_losses(model, tokenizer, examples, recipe)]
    answers, failure = [("", 0)] * len(rows), None
    if answer and all(e.prompt for e in examples):
        try:
            answers = generate(model, tokenizer, examples, recipe)
        except Exception as err:  # the model's own generation code: a good training keeps its losses
            failure = failure_text(err)
    for row, (text, count) in zip(rows, answers):
        row.update(prediction=text, new_tokens=count)
    return rows, failure


def failure_text(err: BaseException) -> str:
    return f"generation failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"


def generate(model, tokenizer, examples: list[Example], recipe: Recipe) -> list[tuple[str, int]]:
    """Batched generation, left padded; batches are built from length-sorted prompts so they pad
    little. Returns (cleaned text, generated tokens up to EOS) per example, in input order."""

    e = recipe.eval
    quirks = quirks_for(model.config.model_type)
    special = all(x.special_tokens for x in examples)  # one template: all or none
    lengths = [len(tokenizer(x.prompt, add_special_tokens=special)["input_ids"]) for x in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    sampling = {"do_sample": True, "temperature": e.temperature, "top_p": e.top_p} if e.do_sample else {"do_sample": False}
    outputs: dict[int, tuple[str, int]] = {}
    for start in range(0, len(order), e.batch_size):
        batch = order[start : start + e.batch_size]
        prompts = [examples[i].prompt for i in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=special).to(model.device)
        ends = {
            "max_new_tokens": e.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if quirks.own_generation_loop:
            cache = quirks.generate_with_cache
            new_tokens = decode(model, encoded["input_ids"], encoded["attention_mask"], **ends, **sampling, cache=cache).cpu()
        else:
            generated = model.generate(**encoded, **ends, use_cache=quirks.generate_with_cache, **sampling)
            new_tokens = generated[:, encoded["input_ids"].shape[1] :].cpu()
        for i, tokens in zip(batch, new_tokens):
            outputs[i] = answer_of(tokenizer, tokens.tolist(), examples[i].suffix)
    return [outputs[i] for i in range(len(examples))]


def reference_losses(model, tokenizer, examples: list[Example], recipe: Recipe) -> list[tuple[float, int]]:
    """(summed cross-entropy, token count) of each reference response, prompt masked as in training."""
    import torch

    results = []
    for start in range(0, len(examples), recipe.eval.batch_size):
        rows = [tokenize(e, tokenizer, recipe.data.max_length) for e in examples[start : start + recipe.eval.batch_size]]
        width, pad = max(len(r["input_ids"]) for r in rows), tokenizer.pad_token_id
        input_ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        attention = (torch.arange(width)[None, :] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits.float().cpu()
        logits = logits[:, -width:]  # prompt / p-tuning put their virtual tokens first
        shifted = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100, reduction="none")
        results += [(float(total), int(count)) for total, count in zip(losses.sum(1), (shifted != -100).sum(1))]
    return results


# ---------------------------------------------------------------- results


def finish_if_complete(out: Path) -> dict | None:
    """Once every shard is done: predictions.jsonl in input order, metrics.json and the report.
    Whichever shard finishes last does it (under a lock, so two never write at once)."""
    out = Path(out)
    plan = read_plan(out)
    if unfinished(out, plan):
        return None
    with exclusive(EvalDir(out).finish_lock):
        if EvalDir(out).metrics.exists():
            return json.loads(EvalDir(out).metrics.read_text())
        return write_results(out, plan)


def collect(out: Path, plan: dict, system: str) -> tuple[list[dict], dict]:
    """One system's rows of every shard, in input order, and its timing totals."""
    rows, timing = [], {"new_tokens": 0, "seconds": 0.0, "generation_failed": None, "backends": set()}
    for k in range(plan["shards"]):
        path = shard_file(out, system, k, plan["shards"])
        rows += [json.loads(line) for line in path.read_text().splitlines()]
        marker = json.loads(marker_of(path).read_text())
        timing["new_tokens"] += marker["new_tokens"]
        timing["seconds"] += marker["seconds"]
        timing["backends"].add(marker.get("backend", "hf"))
        timing["generation_failed"] = timing["generation_failed"] or marker.get("generation_failed")
    return sorted(rows, key=lambda r: r["index"]), timing


def write_results(out: Path, plan: dict) -> dict:

    examples = [Example(**json.loads(line)) for line in EvalDir(out).examples.read_text().splitlines()]
    references = [e.response for e in examples]
    convention, why = resolve_convention(plan["recipe"]["eval"].get("metrics_convention", "auto"), references)
    predictions, metrics, speed, failed = {}, {}, {}, {}
    for system in (s["name"] for s in plan["systems"]):
        rows, timing = collect(out, plan, system)
        predictions[system] = [r["prediction"] for r in rows]
        loss = sum(r["loss_sum"] for r in rows) / max(sum(r["loss_tokens"] for r in rows), 1)
        metrics[system] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if timing["generation_failed"]:  # losses only; the answers were never generated
            failed[system] = timing["generation_failed"]
        elif all(e.prompt for e in examples):
            metrics[system] |= text_scores(predictions[system], references, convention)
        speed[system] = {
            "generated_tokens": timing["new_tokens"],
            "shard_seconds": round(timing["seconds"], 2),
            "backend": "+".join(sorted(timing["backends"])),  # hf, vllm, or hf+vllm across shards
        }
    rows = [
        {"prompt": e.prompt, "reference": e.response} | {s: predictions[s][i] for s in predictions}
        for i, e in enumerate(examples)
    ]
    write_atomic(EvalDir(out).predictions, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    result = {
        "examples": len(examples),
        "data": plan["data"],
        "shards": plan["shards"],
        "metrics_convention": {"name": convention, "why": why},
        "systems": metrics,
        "speed": speed,
    }
    if failed:
        result["generation_failed"] = failed
    if plan.get("benchmarks"):
        result["benchmarks"], benchmark_failures = collect_benchmarks(out, plan)
        result |= {"benchmarks_failed": benchmark_failures} if benchmark_failures else {}
    write_report(out, plan, examples, predictions, result)
    write_atomic(EvalDir(out).metrics, json.dumps(result, indent=2, ensure_ascii=False) + "\n")  # last: marks it done
    for problem in log_evaluation(plan, result):  # into each evaluated run's trackers
        print(f"warning: {problem}", file=sys.stderr)
    return result
