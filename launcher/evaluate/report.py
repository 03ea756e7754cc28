"""The evaluation report: report.md and a self-contained report.html (plots embedded), with a
header (what was trained and how, on what, how long it took, peak memory, when, which code), the
metrics table, the training curves (loss, learning rate, grad norm), every metric that moves per
checkpoint, and sample predictions of every system."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from launcher.data.examples import Example
from launcher.evaluate.benchmarks import table_rows as benchmark_rows
from launcher.evaluate.vllm import fallback_lines
from launcher.rundir.checkpoints import checkpoint_step
from launcher.rundir.evaldir import EvalDir, EvalPlan, EvalResults
from launcher.rundir.files import write_atomic
from launcher.rundir.runs import RunDir

SAMPLES = 10


def write_report(folder: EvalDir, plan: EvalPlan, examples: list[Example], predictions: dict, result: EvalResults) -> None:

    plots = [p for p in (loss_plot(folder, plan), checkpoint_plot(folder, result)) if p]
    title = f"Evaluation of {len(plan.systems)} systems on {result.examples} examples ({result.data})"
    header = header_lines(plan)
    write_atomic(folder.report_md, markdown(title, header, plan, examples, predictions, result, plots))
    write_atomic(folder.report_html, page(title, header, plan, examples, predictions, result, plots))


def header_lines(plan: EvalPlan) -> list[str]:
    """What was trained and how: model, method, hyper-parameters, data, wall time and peak memory of
    each stage, the date, the code (git SHA); one line each."""

    r = plan.recipe
    m, p, t, d, dist = r["model"], r["peft"], r["train"], r["data"], r["distributed"]
    keys = ", ".join(f"{k} {v}" for k, v in p.items() if k != "method" and not isinstance(v, (list, dict)))
    steps = f"{t['max_steps']} steps" if t["max_steps"] > 0 else f"{t['epochs']:g} epochs"
    lines = [
        f"model: {m['name_or_path']} ({m['dtype']}); method: {p['method']} ({keys or 'defaults'})",
        f"training: lr {t['learning_rate']:g} ({t['lr_scheduler']}, {t['warmup_steps']} warm-up steps), {steps}, "
        f"micro batch {t['micro_batch_size']} x {t['gradient_accumulation_steps']} accumulation x "
        f"{dist['nodes'] * dist['procs_per_node']} ranks, {dist['deepspeed']}, seed {t['seed']}",
        f"data: {d['train_file']} ({d['format']}, template {d['template']}, max length {d['max_length']}, "
        f"batching {d.get('batching', 'padded')})",
    ]
    for root in plan.runs:
        manifest = RunDir(Path(root)).manifest()
        stages = [(name, getattr(manifest, name)) for name in ("train", "merge", "eval")]
        cost = "; ".join(f"{name} {record.cost()}" for name, record in stages if record is not None)
        data = manifest.data or {}
        lines.append(
            f"run {Path(root).name}: {data.get('examples', '?')} training examples, {data.get('tokens', '?')} tokens; "
            f"{cost or 'no stage recorded'}; code {manifest.git_sha or 'not a git checkout'} "
            f"(launcher {manifest.launcher_version}), created {manifest.created}"
        )
    lines.append(f"report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    return lines


PREFERENCE_METRICS = ("preference_accuracy", "reward_accuracy", "reward_margin")


def metric_names(result: EvalResults) -> list[str]:
    preferred = ["exact_match", "bleu4", "rouge1", "rouge2", "rougeL", "loss", "perplexity", *PREFERENCE_METRICS]
    return [n for n in preferred if any(n in values for values in result.systems.values())]


def table_rows(result: EvalResults) -> list[list[str]]:
    names = metric_names(result)
    rows = [["system"] + names + ["generated tok/s"]]
    for system, values in result.systems.items():
        speed = result.speed[system]
        rate = speed.generated_tokens / speed.shard_seconds if speed.shard_seconds else 0.0
        rows.append([system] + [cell(values, n) for n in names] + [f"{rate:.0f}"])
    return rows


def cell(values: dict, name: str) -> str:
    if name not in values:
        return "—"
    return "n/a" if values[name] is None else f"{values[name]:.4g}"


CONVENTION_TEXT = {
    "chatglm": "BLEU-4 per example on characters (nltk, smoothing method3) and ROUGE-1/2/L F on jieba words with "
    "punctuation kept (rouge_chinese), averaged over examples, as ChatGLM's AdGen script and LLaMA-Factory count them",
    "sacrebleu": "corpus BLEU-4 (sacrebleu, zh tokenizer: CJK characters, 13a otherwise) and mean ROUGE-1/2/L F "
    "(rouge-score on lower-cased words, jieba words for Chinese, punctuation dropped)",
}


def metric_notes(result: EvalResults) -> list[str]:
    """How the numbers were counted: the convention (and why it was picked), exact match, and why
    BLEU-4 reads n/a where it does."""
    notes = ["loss and perplexity: of the reference responses, per response token"]
    convention = result.metrics_convention
    text = CONVENTION_TEXT[convention.name]
    notes.insert(0, f"metrics convention {convention.name} ({convention.why}): {text}; 0-100 scale")
    if any("exact_match" in v for v in result.systems.values()):
        notes.append("exact match: share of answers equal to the reference (0-1), surrounding spaces ignored")
    if any("preference_accuracy" in v for v in result.systems.values()):
        notes.append(
            "on the held-out preference pairs (the reference is the chosen answer): preference_accuracy, the share "
            "where the system finds the chosen answer likelier than the rejected one; reward_accuracy and "
            "reward_margin, an adapter's implicit rewards against the base as DPO counts them (beta x log-probability "
            "added to each answer): the share where the chosen answer gains more, and the mean difference"
        )
    fast = [system for system, speed in result.speed.items() if "vllm" in speed.backend]
    if fast:
        slow = [system for system in result.speed if system not in fast]
        notes.append(
            f"answers generated with vLLM: {', '.join(fast)}" + (f"; with HF generate: {', '.join(slow)}" if slow else "")
        )
    notes += fallback_notes(result)
    for name, label, size in (("bleu4", "BLEU-4", "4 tokens"), ("rouge2", "ROUGE-2", "2 words")):
        if any(name in v and v[name] is None for v in result.systems.values()):
            notes.append(
                f"{label} n/a: no reference has {size}, so no answer can score it (it would read 0 for any answer); "
                "read exact match and ROUGE-1 instead"
            )
    return notes


def fallback_notes(result: EvalResults) -> list[str]:
    """Why HF generate answered where eval.backend = vllm asked for vLLM, a line per reason."""
    return fallback_lines({system: speed.hf_because for system, speed in result.speed.items() if speed.hf_because})


def summary_lines(result: EvalResults) -> list[str]:
    """What the terminal says under the metrics table: why a score reads n/a, why HF answered
    instead of vLLM, and what failed."""
    return [note for note in metric_notes(result) if " n/a: " in note] + fallback_notes(result) + failure_lines(result)


def failure_lines(result: EvalResults) -> list[str]:
    """Why a system has losses only (its generation failed), or no benchmark results."""
    return [f"{system}: no answers, loss and perplexity only: {why}" for system, why in result.generation_failed.items()] + [
        f"{system}: no benchmark results: {why}" for system, why in result.benchmarks_failed.items()
    ]


def benchmark_section(plan: EvalPlan, result: EvalResults) -> tuple[list[list[str]], str] | None:
    """The benchmark table (system x task metric, ± standard error) and what was run, or None."""

    if not result.benchmarks:
        return None
    versions = {task: r["version"] for tasks in result.benchmarks.values() for task, r in tasks.items()}
    samples = {task: r["samples"] for tasks in result.benchmarks.values() for task, r in tasks.items()}
    about = ", ".join(f"{task} (version {versions[task]}, {samples[task]} samples)" for task in sorted(versions))
    where = f"; tasks from {plan.benchmarks.tasks_dir}" if plan.benchmarks.tasks_dir else ""
    return benchmark_rows(result.benchmarks), f"lm-evaluation-harness: {about}{where}"


def sample_rows(examples: list[Example], predictions: dict) -> list[list[str]]:
    systems = sorted(predictions, key=checkpoint_step)  # every system: base and final adapters, then checkpoints by step
    rows = [["prompt", "reference"] + systems]
    for i, example in enumerate(examples[:SAMPLES]):
        rows.append([example.prompt, example.response] + [predictions[s][i] for s in systems])
    return rows


def markdown(title: str, header: list[str], plan: EvalPlan, examples, predictions, result, plots: list[Path]) -> str:
    lines = [f"# {title}", ""] + [f"- {line}" for line in header] + [""]
    lines += md_table(table_rows(result))
    lines += [""] + [f"- {note}" for note in metric_notes(result)] + [""]
    lines += [f"- {line}" for line in failure_lines(result)] + ([""] if failure_lines(result) else [])
    benchmarks = benchmark_section(plan, result)
    if benchmarks:
        lines += ["## Benchmarks", ""] + md_table(benchmarks[0]) + ["", benchmarks[1], ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Sample predictions", ""] + md_table(sample_rows(examples, predictions))
    return "\n".join(lines) + "\n"


def md_table(rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")[:160]

    return ["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|---" * len(rows[0]) + "|"] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in rows[1:]
    ]


def page(title: str, header: list[str], plan: EvalPlan, examples, predictions, result, plots: list[Path]) -> str:
    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
        return f"<table><tr>{head}</tr>{body}</table>"

    images = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in plots
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;white-space:pre-wrap;max-width:30em}"
        "img{max-width:48%;margin-right:1%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        + "<ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in header)
        + "</ul>"
        + table(table_rows(result))
        + "<ul>"
        + "".join(f"<li>{html.escape(note)}</li>" for note in metric_notes(result))
        + "</ul>"
        + "".join(f"<p>{html.escape(line)}</p>" for line in failure_lines(result))
        + benchmark_html(plan, result, table)
        + f"{images}<h2>Sample predictions</h2>{table(sample_rows(examples, predictions))}</body></html>\n"
    )


def benchmark_html(plan: EvalPlan, result: EvalResults, table) -> str:
    benchmarks = benchmark_section(plan, result)
    return f"<h2>Benchmarks</h2>{table(benchmarks[0])}<p>{html.escape(benchmarks[1])}</p>" if benchmarks else ""


def loss_plot(folder: EvalDir, plan: EvalPlan) -> Path | None:
    """Training loss (log scale when it spans more than a decade), learning rate and grad norm per
    step of each evaluated run (from its logs/train_metrics.jsonl)."""

    curves = {Path(root).name: RunDir(Path(root)).metrics.rows() for root in plan.runs}
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return None
    figure, panels = new_figure(columns=3)
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        for axes, key in zip(panels, ("loss", "learning_rate", "grad_norm")):
            values = [r.get(key) for r in rows]
            if all(v is not None for v in values):
                axes.plot(steps, values, label=name)
    losses = [r["loss"] for rows in curves.values() for r in rows if r["loss"] > 0]
    if losses and max(losses) > 10 * min(losses):
        panels[0].set_yscale("log")
    for axes, label in zip(panels, ("training loss", "learning rate", "grad norm")):
        axes.set(xlabel="step", title=label)
    panels[0].legend()
    return save(figure, folder.loss_plot)


def checkpoint_plot(folder: EvalDir, result: EvalResults) -> Path | None:
    """Every metric that moves across the checkpoints, one panel each, against the step (needs two)."""
    points = sorted((checkpoint_step(name), values) for name, values in result.systems.items() if checkpoint_step(name) >= 0)
    if len(points) < 2:
        return None
    moving = [n for n in metric_names(result) if len({round(v.get(n) or 0.0, 9) for _, v in points}) > 1]
    if not moving:
        return None
    figure, panels = new_figure(columns=len(moving))
    steps = [step for step, _ in points]
    for axes, name in zip(panels, moving):
        axes.plot(steps, [v.get(name) for _, v in points], "o-")
        axes.set(xlabel="checkpoint step", title=name)
    return save(figure, folder.checkpoint_plot)


def new_figure(columns: int = 1):
    """A figure of `columns` panels side by side (a list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, columns, figsize=(4 * columns, 3.5), dpi=100, squeeze=False)
    return figure, list(axes[0])


def save(figure, path: Path) -> Path:
    from matplotlib import pyplot

    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
