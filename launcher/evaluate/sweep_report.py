"""A sweep's comparison: one row per variant (its swept values, state, progress, held-out metrics of
its adapter, cost), the best variant by the sweep's metric, and SWEEP/report.html with the variants'
loss curves overlaid and the table sortable by any column."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config.recipe import Recipe
from launcher.evaluate.report import new_figure, save
from launcher.rundir.files import write_atomic
from launcher.rundir.runs import RunDir
from launcher.rundir.sweepdir import BestRecord, RungRecord, SweepDir, VariantRecord, sweep_of

METRICS = ("loss", "perplexity", "exact_match", "bleu4", "rouge1", "rouge2", "rougeL")


@dataclass
class VariantRow:
    name: str
    values: dict[str, object]
    state: str
    step: int | None = None
    total: int | None = None
    train_loss: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    wall_s: float | None = None
    device_hours: float | None = None
    device: str = "CPU"
    tokens_per_s_per_device: float | None = None
    mfu: float | None = None
    job: str = ""
    waiting: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, training loss) of every logged step: the report's overlaid curves."""


def variant_row(variant: VariantRecord, run: RunDir, state: str = "", job: str = "", waiting: str = "") -> VariantRow:
    """What one variant's run dir says: progress from its metrics log, metrics from its evaluation, cost from its manifest."""
    if not run.manifest_path.is_file():
        return VariantRow(variant.name, variant.overrides, "not rendered")
    manifest = run.manifest()
    row = VariantRow(variant.name, variant.overrides, state or str(manifest.state), job=job, waiting=waiting)
    rows = run.metrics.rows()
    row.curve = [(r["step"], r["loss"]) for r in rows]
    if rows:
        last = rows[-1]
        row.step, row.total, row.train_loss = last["step"], last.get("max_steps"), last.get("loss")
    result = run.evaluation.results()
    if result is not None and "adapter" in result.systems:
        row.metrics = dict(result.systems["adapter"])
    recipe = run.load_recipe()
    row.device, devices = devices_of(recipe)
    if manifest.train is not None:
        row.wall_s = manifest.train.wall_s
        row.device_hours = manifest.train.wall_s * devices / 3600
    steady = rows[1:]  # the first row holds start-up
    speeds = [r["tokens_per_second"] for r in steady if r.get("tokens_per_second")]
    if speeds:
        row.tokens_per_s_per_device = sum(speeds) / len(speeds) / recipe.world_size()
    utilisation = [r["mfu"] for r in steady if r.get("mfu") is not None]
    if utilisation:
        row.mfu = sum(utilisation) / len(utilisation)
    return row


def devices_of(recipe: Recipe) -> tuple[str, int]:
    """("GPU", GPUs) when the job asks for GPUs, else ("CPU", cores): what an hour of the run costs in."""
    s, d = recipe.slurm, recipe.distributed
    if s.gpus_per_node:
        return "GPU", d.nodes * s.gpus_per_node
    return "CPU", recipe.world_size() * (s.cpus_per_task or 1)


def best_of(rows: list[VariantRow], metric: str, mode: str) -> BestRecord | None:
    scored = [(r.metrics.get(metric), r.name) for r in rows if isinstance(r.metrics.get(metric), (int, float))]
    if not scored:
        return None
    value, name = (min if mode == "min" else max)(scored)
    return BestRecord(variant=name, metric=metric, value=float(value), mode=mode)


def swept_keys(rows: list[VariantRow]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.values if k not in keys]
    return keys


def table(rows: list[VariantRow], best: BestRecord | None, compact_metric: str | None = None) -> list[list[str]]:
    """Header and one row per variant: swept values, state, progress, metrics, cost. `compact_metric`:
    for a terminal, only that metric and no swept-value columns (the variant's name holds them)."""
    keys = [] if compact_metric else swept_keys(rows)
    metrics = [m for m in METRICS if any(m in r.metrics for r in rows) and (not compact_metric or m == compact_metric)]
    device = rows[0].device if rows else "CPU"
    header = ["variant", *keys, "state", "step", "train loss", *metrics, "wall s", f"{device}-h", "tok/s/dev", "MFU", "job"]
    lines = [header]
    for r in rows:
        mark = " *" if best and r.name == best.variant else ""
        state = r.state + (f" ({r.waiting})" if r.waiting else "")
        lines.append(
            [r.name + mark]
            + [text(r.values.get(k)) for k in keys]
            + [state, f"{r.step}/{r.total}" if r.step is not None else "—", number(r.train_loss)]
            + [number(r.metrics.get(m)) for m in metrics]
            + [number(r.wall_s), number(r.device_hours), number(r.tokens_per_s_per_device), percent(r.mfu), r.job or "—"]
        )
    return lines


def text(value: object) -> str:
    return "—" if value is None else str(value)


def percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2g}%"


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def write_sweep_report(folder: SweepDir, rows: list[VariantRow], best: BestRecord | None) -> Path:
    """SWEEP/report.html: the loss curves overlaid, the sortable table, the best variant named."""
    plot = loss_curves(folder, rows)
    lines = table(rows, best)
    head = "".join(f"<th onclick='sortBy({i})'>{html.escape(c)}</th>" for i, c in enumerate(lines[0]))
    body = "".join(
        f"<tr{' class=best' if best and row[0].endswith(' *') else ''}>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in row)
        + "</tr>"
        for row in lines[1:]
    )
    verdict = (
        f"best: {best.variant} ({best.metric} {best.value:.4g}, {best.mode})"
        if best
        else f"no variant has a held-out {folder.manifest().metric} yet"
    )
    rungs = "".join(f"<p>{html.escape(rung_line(r))}</p>" for r in folder.manifest().rungs)
    image = f'<img alt="loss" src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">' if plot else ""
    script = (
        "function sortBy(c){const t=document.getElementById('v'),r=[...t.rows].slice(1),"
        "k=x=>{const v=x.cells[c].innerText,n=parseFloat(v);return isNaN(n)?v:n},"
        "d=t.dataset.c==c?-1:1;t.dataset.c=d==1?c:-1;"
        "r.sort((a,b)=>k(a)>k(b)?d:k(a)<k(b)?-d:0).forEach(x=>t.tBodies[0].appendChild(x))}"
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}th{cursor:pointer}.best{font-weight:bold;background:#efe}"
    )
    title = f"Sweep {folder.manifest().name}: {len(rows)} variants"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"<script>{script}</script></head><body><h1>{html.escape(title)}</h1><p>{html.escape(verdict)}; "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; click a column to sort</p>{rungs}{image}"
        f"<table id='v'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></body></html>"
    )
    write_atomic(folder.report_html, page)
    return folder.report_html


def loss_curves(folder: SweepDir, rows: list[VariantRow]) -> Path | None:
    """Every variant's training loss per step on one axes (log scale when it spans more than a decade)."""
    curves = {r.name: r.curve for r in rows if r.curve}
    if not curves:
        return None
    figure, (axes,) = new_figure()
    for name, points in curves.items():
        axes.plot([step for step, _ in points], [loss for _, loss in points], label=name)
    losses = [loss for points in curves.values() for _, loss in points if loss > 0]
    if losses and max(losses) > 10 * min(losses):
        axes.set_yscale("log")
    axes.set(xlabel="step", title="training loss")
    axes.legend(fontsize=6)
    return save(figure, folder.loss_plot)


def publish_comparison(folder: SweepDir, rows: list[VariantRow]) -> BestRecord | None:
    """The best variant recorded in sweep.json and report.html rewritten (under the sweep's lock)."""
    manifest = folder.manifest()
    best = best_of(rows, manifest.metric, manifest.mode)
    folder.set_best(best)
    write_sweep_report(folder, rows, best)
    return best


def refresh_after_variant(run: RunDir) -> None:
    """A variant's last stage ended in its job: the sweep's comparison is brought up to date, from the
    run dirs alone (best effort: a failure here never fails the variant, whose run is complete)."""
    folder = sweep_of(run)
    if folder is None:
        return
    try:
        publish_comparison(folder, [variant_row(v, r) for v, r in folder.runs()])
        print(f"sweep report: {folder.report_html}")
    except Exception as err:  # noqa: BLE001  (the comparison is a view; `launch report` writes it again)
        print(f"sweep report not refreshed ({type(err).__name__}: {err}); run launch report {folder.root}")


def rung_line(record: RungRecord) -> str:
    """ "halving at step 50: kept a (1.2), b (1.3); pruned c (1.9), d (2.4); saved 3.1 device-hours" """

    def named(names: list[str]) -> str:
        return ", ".join(f"{n} ({record.losses[n]:.4g})" if n in record.losses else f"{n} (failed)" for n in names)

    return (
        f"halving at step {record.step}: kept {named(record.kept)}; pruned {named(record.pruned) or 'none'}; "
        f"saved {record.saved_device_hours:.3g} device-hours"
    )
