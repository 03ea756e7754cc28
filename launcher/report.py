"""The evaluation report: report.md and a self-contained report.html (plots embedded), with
the metrics table, the training loss curve, metrics per checkpoint and sample predictions."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from launcher.data import Example

SAMPLES = 10
LOSS_PLOT, CHECKPOINT_PLOT = "loss_curve.png", "checkpoint_metrics.png"


def write_report(out: Path, plan: dict, examples: list[Example], predictions: dict, result: dict) -> None:
    from launcher.runs import write_atomic

    plots = [p for p in (loss_plot(out, plan), checkpoint_plot(out, result)) if p]
    title = f"Evaluation of {len(plan['systems'])} systems on {result['examples']} examples ({result['data']})"
    write_atomic(out / "report.md", markdown(title, examples, predictions, result, plots))
    write_atomic(out / "report.html", page(title, examples, predictions, result, plots))


def metric_names(result: dict) -> list[str]:
    preferred = ["exact_match", "bleu4", "rouge1", "rouge2", "rougeL", "loss", "perplexity"]
    return [n for n in preferred if any(n in values for values in result["systems"].values())]


def table_rows(result: dict) -> list[list[str]]:
    names = metric_names(result)
    rows = [["system"] + names + ["generated tok/s"]]
    for system, values in result["systems"].items():
        speed = result["speed"][system]
        rate = speed["generated_tokens"] / speed["shard_seconds"] if speed["shard_seconds"] else 0.0
        rows.append([system] + [f"{values[n]:.4g}" if n in values else "—" for n in names] + [f"{rate:.0f}"])
    return rows


def failure_lines(result: dict) -> list[str]:
    """Why a system has losses only (its generation failed)."""
    return [
        f"{system}: no answers, loss and perplexity only: {why}" for system, why in result.get("generation_failed", {}).items()
    ]


def sample_rows(examples: list[Example], predictions: dict) -> list[list[str]]:
    systems = sorted(predictions, key=lambda name: "checkpoint-" in name)[:6]  # base and final adapters first
    rows = [["prompt", "reference"] + systems]
    for i, example in enumerate(examples[:SAMPLES]):
        rows.append([example.prompt, example.response] + [predictions[s][i] for s in systems])
    return rows


def markdown(title: str, examples, predictions, result, plots: list[Path]) -> str:
    lines = [f"# {title}", ""]
    lines += md_table(table_rows(result))
    lines += [
        "",
        "BLEU-4 and ROUGE F1 on a 0-100 scale (Chinese segmented: characters for BLEU, jieba words "
        "for ROUGE); loss and perplexity of the references, per response token.",
        "",
    ]
    lines += [f"- {line}" for line in failure_lines(result)] + ([""] if failure_lines(result) else [])
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Sample predictions", ""] + md_table(sample_rows(examples, predictions))
    return "\n".join(lines) + "\n"


def md_table(rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")[:160]

    return ["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|---" * len(rows[0]) + "|"] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in rows[1:]
    ]


def page(title: str, examples, predictions, result, plots: list[Path]) -> str:
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
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{table(table_rows(result))}"
        + "".join(f"<p>{html.escape(line)}</p>" for line in failure_lines(result))
        + f"{images}<h2>Sample predictions</h2>{table(sample_rows(examples, predictions))}</body></html>\n"
    )


def loss_plot(out: Path, plan: dict) -> Path | None:
    """Training loss per step of each evaluated run (from its logs/train_metrics.jsonl)."""
    from launcher.runs import RunDir

    curves = {}
    for root in plan.get("runs", []):
        rows = RunDir(Path(root)).metrics.rows()
        if rows:
            curves[Path(root).name] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    if not curves:
        return None
    figure, axes = new_figure()
    for name, (steps, losses) in curves.items():
        axes.plot(steps, losses, label=name)
    axes.set(xlabel="step", ylabel="training loss", title="Training loss")
    axes.legend()
    return save(figure, out / LOSS_PLOT)


def checkpoint_plot(out: Path, result: dict) -> Path | None:
    """Eval loss and text metrics of each checkpoint against its step (needs two checkpoints)."""
    points = sorted(
        (int(m.group(1)), values) for name, values in result["systems"].items() if (m := re.search(r"checkpoint-(\d+)$", name))
    )
    if len(points) < 2:
        return None
    figure, axes = new_figure()
    steps = [step for step, _ in points]
    axes.plot(steps, [v["loss"] for _, v in points], "o-", color="C0", label="eval loss")
    axes.set(xlabel="checkpoint step", ylabel="eval loss", title="Metrics per checkpoint")
    scores = [n for n in ("bleu4", "rougeL") if n in points[0][1]]
    if scores:
        right = axes.twinx()
        for color, name in zip(("C1", "C2"), scores):
            right.plot(steps, [v[name] for _, v in points], "s--", color=color, label=name)
        right.set_ylabel("score (0-100)")
        right.legend(loc="center right")
    axes.legend(loc="center left")
    return save(figure, out / CHECKPOINT_PLOT)


def new_figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(figsize=(6, 4), dpi=100)


def save(figure, path: Path) -> Path:
    from matplotlib import pyplot

    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
