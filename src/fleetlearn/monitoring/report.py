"""`write_report(run_dir)`: an HTML page with PNG plots of a run, from its run store.

Plots (matplotlib, drawn on Agg figures without pyplot, so the caller's
backend is untouched): accuracy and loss; local vs global accuracy; update
norms, variance and cosine; bytes per round; participation and dropouts;
completion-time percentiles.  Every plot marks the rounds with alerts (dashed
lines, coloured by severity) and rollbacks (red bands).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..ops.store import RunStore
from ..records import RoundRecord
from .series import columns, events

SEVERITY_COLOURS = {"info": "#7f7f7f", "warning": "#ff7f0e", "critical": "#d62728"}
ROLLBACK_COLOUR = "#d62728"
FAILED_COLOUR = "#555555"
PLOTS = ("accuracy_loss", "local_vs_global", "updates", "bytes", "participation", "completion")


def _arr(xs: Sequence[float]) -> np.ndarray:
    return np.asarray(xs, dtype=np.float64)


def _plot(ax, x: np.ndarray, y: Sequence[float], label: str, **kw) -> bool:
    """Plot the finite points of y (connected across unevaluated rounds); False if none."""
    y = _arr(y)
    ok = np.isfinite(y)
    if not ok.any():
        return False
    ax.plot(x[ok], y[ok], label=label, marker="o" if ok.sum() < 30 else None, markersize=3, **kw)
    return True


def _auto_log(ax, *series: Sequence[float]) -> None:
    """Log scale when positive values span more than two decades (a blown-up round
    would otherwise flatten every other round to zero)."""
    v = np.concatenate([_arr(s) for s in series]) if series else np.array([])
    v = v[np.isfinite(v)]
    if v.size and np.all(v > 0) and v.max() / v.min() > 100:
        ax.set_yscale("log")


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="#888888")


def _mark(ax, ev: dict[str, list[dict[str, Any]]]) -> list:
    """Alerts as dashed vertical lines, rollbacks as red bands, failed rounds as grey bands.
    Returns legend handles for what was drawn."""
    handles = []
    for rb in ev["rollbacks"]:
        ax.axvspan(rb["round"] - 0.5, rb["round"] + 0.5, color=ROLLBACK_COLOUR, alpha=0.18, lw=0, zorder=0)
    if ev["rollbacks"]:
        handles.append(Patch(color=ROLLBACK_COLOUR, alpha=0.3, label="rollback"))
    for f in ev["failed"]:
        ax.axvspan(f["round"] - 0.5, f["round"] + 0.5, color=FAILED_COLOUR, alpha=0.12, lw=0, zorder=0)
    if ev["failed"]:
        handles.append(Patch(color=FAILED_COLOUR, alpha=0.25, label="failed round"))
    seen = set()
    for a in ev["alerts"]:
        sev = a.get("severity") or "warning"
        colour = SEVERITY_COLOURS.get(sev, "#ff7f0e")
        ax.axvline(a["round"], color=colour, ls="--", lw=1.0, alpha=0.8, zorder=3)
        if sev not in seen:
            seen.add(sev)
            handles.append(Line2D([], [], color=colour, ls="--", label=f"alert ({sev})"))
    return handles


def _legend(ax, handles: list, labels: list) -> None:
    # Outside the axes, on the right: curves are never hidden behind it.
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _finish(ax, handles: list, ylabel: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    h, l = ax.get_legend_handles_labels()
    if h or handles:
        _legend(ax, h + handles, l + [x.get_label() for x in handles])


def _figure(rows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(11, 3.6 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def plot_accuracy_loss(c: dict, ev: dict) -> Figure:
    fig, (ax,) = _figure()
    x = _arr(c["round"])
    any_acc = _plot(ax, x, c["accuracy"], "accuracy (central)", color="#1f77b4")
    ax2 = ax.twinx()
    any_loss = _plot(ax2, x, c["loss"], "loss (central)", color="#2ca02c")
    _auto_log(ax2, c["loss"])
    ax2.set_ylabel("loss")
    if not (any_acc or any_loss):
        _no_data(ax, "evaluation")
    handles = _mark(ax, ev)
    h2, l2 = ax2.get_legend_handles_labels()
    h1, l1 = ax.get_legend_handles_labels()
    # Below the axes: the right-hand side holds the loss axis.
    ax.legend(h1 + h2 + handles, l1 + l2 + [x.get_label() for x in handles], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=4, borderaxespad=0.0)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy and loss of the global model (held-out test set)")
    return fig


def plot_local_vs_global(c: dict, ev: dict) -> Figure:
    fig, (ax, bx) = _figure(2)
    x = _arr(c["round"])
    drew = [
        _plot(ax, x, c["accuracy"], "global model, central test set"),
        _plot(ax, x, c["fed_accuracy"], "global model, clients' test splits (mean)"),
        _plot(ax, x, c["fed_accuracy_p10"], "global model, clients' test splits (p10)", ls=":"),
        _plot(ax, x, c["local_accuracy"], "local models, own test splits (mean)", ls="--"),
    ]
    if not any(drew):
        _no_data(ax, "accuracy")
    _finish(ax, _mark(ax, ev), "accuracy")
    ax.set_title("Local vs global accuracy")
    drew = [
        _plot(bx, x, c["train_loss_before"], "local train loss before training"),
        _plot(bx, x, c["train_loss_after"], "local train loss after training"),
        _plot(bx, x, c["loss"], "global model, central loss", ls="--"),
    ]
    if not any(drew):
        _no_data(bx, "loss")
    _finish(bx, _mark(bx, ev), "loss")
    return fig


def plot_updates(c: dict, ev: dict) -> Figure:
    fig, (ax, bx, cx) = _figure(3)
    x = _arr(c["round"])
    lo, hi = _arr(c["debug_update_norm_min"]), _arr(c["debug_update_norm_max"])
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.fill_between(x[ok], lo[ok], hi[ok], alpha=0.2, label="min - max")
        _plot(ax, x, c["debug_update_norm_p50"], "p50")
        _plot(ax, x, c["debug_update_norm_p90"], "p90")
    elif not (_plot(ax, x, c["update_norm_mean"], "mean") | _plot(ax, x, c["update_norm_max"], "max")):
        _no_data(ax, "update norm")
    _plot(ax, x, c["debug_step_norm"], "server step ||w_new - w_old||", color="black", ls=":")
    _auto_log(ax, c["debug_update_norm_min"], c["debug_update_norm_max"], c["debug_step_norm"], c["update_norm_max"])
    _finish(ax, _mark(ax, ev), "update norm")
    ax.set_title("Client update norms")
    var = _arr(c["debug_update_variance"])
    if _plot(bx, x, var, "variance around the weighted mean (trace / d)", color="#9467bd"):
        if np.all(var[np.isfinite(var)] > 0):
            bx.set_yscale("log")
    else:
        _no_data(bx, "update variance")
    _finish(bx, _mark(bx, ev), "variance")
    cm, cs = _arr(c["debug_cosine_mean"]), _arr(c["debug_cosine_std"])
    ok = np.isfinite(cm) & np.isfinite(cs)
    if _plot(cx, x, cm, "cosine to the aggregate (mean)", color="#8c564b"):
        cx.fill_between(x[ok], (cm - cs)[ok], (cm + cs)[ok], alpha=0.2, color="#8c564b", label="+- 1 std")
    else:
        _no_data(cx, "cosine")
    _finish(cx, _mark(cx, ev), "cosine")
    return fig


def plot_bytes(c: dict, ev: dict) -> Figure:
    fig, (ax,) = _figure()
    x = _arr(c["round"])
    up, down = _arr(c["uplink_bytes"]), _arr(c["downlink_bytes"])
    ax.bar(x - 0.15, up, width=0.3, label="uplink (clients -> server)")
    ax.bar(x + 0.15, down, width=0.3, label="downlink (server -> clients)")
    if not np.nansum(up) and not np.nansum(down):
        _no_data(ax, "traffic")
    _finish(ax, _mark(ax, ev), "bytes per round")
    ax.set_title("Bytes per round")
    return fig


def plot_participation(c: dict, ev: dict) -> Figure:
    fig, (ax,) = _figure()
    x = _arr(c["round"])
    bottom = np.zeros_like(x)
    for key, colour in (("accepted", "#2ca02c"), ("rejected", "#d62728"), ("late", "#ff7f0e"), ("dropped", "#7f7f7f")):
        v = np.nan_to_num(_arr(c[key]))
        ax.bar(x, v, bottom=bottom, label=key, color=colour, width=0.6)
        bottom = bottom + v
    _plot(ax, x, c["selected"], "selected", color="black", ls="--")
    top = np.nanmax(np.concatenate([bottom, _arr(c["selected"])])) if len(x) else 0
    ax.set_ylim(0, max(float(top), 1.0) * 1.15)
    _finish(ax, _mark(ax, ev), "clients")
    ax.set_title("Participation and dropouts")
    return fig


def plot_completion(c: dict, ev: dict) -> Figure:
    fig, (ax,) = _figure()
    x = _arr(c["round"])
    drew = [_plot(ax, x, c[f"completion_p{q}_s"], f"p{q}") for q in (50, 90, 99)]
    _plot(ax, x, c["deadline_s"], "deadline", color="black", ls=":")
    if not any(drew):
        _no_data(ax, "completion time")
    _finish(ax, _mark(ax, ev), "seconds after dispatch")
    ax.set_title("Client completion-time percentiles")
    return fig


PLOTTERS = {
    "accuracy_loss": plot_accuracy_loss,
    "local_vs_global": plot_local_vs_global,
    "updates": plot_updates,
    "bytes": plot_bytes,
    "participation": plot_participation,
    "completion": plot_completion,
}
CAPTIONS = {
    "accuracy_loss": "Accuracy and loss of the global model on the held-out test set.",
    "local_vs_global": "Accuracy of the global model on the central test set and on clients' local test splits, against the clients' local models; local training loss before and after training.",
    "updates": "Distribution of the accepted update norms (band: min to max), server step size, variance of the updates around their weighted mean, and cosine of the updates to the aggregate.",
    "bytes": "Bytes sent per round, both directions.",
    "participation": "Selected clients and what became of them: accepted, rejected by validation, late, dropped.",
    "completion": "Percentiles of the time from dispatch to a client's reply.",
}


def render_plots(records: Sequence[RoundRecord], out_dir: Path) -> list[Path]:
    """Write one PNG per plot into `out_dir`; returns their paths in PLOTS order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    c, ev = columns(records), events(records)
    paths = []
    for name in PLOTS:
        fig = PLOTTERS[name](c, ev)
        path = out_dir / f"{name}.png"
        fig.savefig(path, format="png")
        paths.append(path)
    return paths


def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    if not rows:
        return "<p class='none'>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Read the run store at `run_dir` and write ``report.html`` with its PNG plots
    into `out_dir` (default ``run_dir/report``).  Returns the HTML file's path."""
    store = RunStore.open(run_dir)
    records = store.records()
    info = store.info()
    out = Path(out_dir) if out_dir is not None else store.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = render_plots(records, out)
    ev = events(records)
    from ..ops import ModelRegistry

    versions = [v.to_dict() for v in ModelRegistry(store).versions()]
    summary = info.get("summary") or {}
    facts = [
        ("run", info["run_id"]), ("name", info.get("name") or ""), ("status", info["status"]),
        ("created", str(info.get("created_at") or "")), ("rounds", str(len(records))),
        ("final accuracy", _cell(summary.get("final_accuracy"))), ("best accuracy", _cell(summary.get("best_accuracy"))),
        ("final loss", _cell(summary.get("final_loss"))), ("rollbacks", str(len(ev["rollbacks"]))),
        ("alerts", str(len(ev["alerts"]))), ("failed rounds", str(len(ev["failed"]))),
    ]
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    figs = "".join(
        f"<figure><img src='{p.name}' alt='{html.escape(name)}'><figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>"
        for name, p in zip(PLOTS, pngs)
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fleetlearn report: {html.escape(info['run_id'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
.none {{ color: #888; }}
</style></head><body>
<h1>Run {html.escape(info['run_id'])}</h1>
<p>Written {html.escape(_dt.datetime.now().isoformat(timespec='seconds'))} from {html.escape(str(store.run_dir))}.</p>
<table>{facts_html}</table>
<h2>Plots</h2>
<p>Dashed lines mark alerts (orange: warning, red: critical, grey: info); red bands mark rounds that were rolled back.</p>
{figs}
<h2>Rollbacks</h2>
{_table(ev['rollbacks'], ('round', 'rejected_version', 'version', 'reason'))}
<h2>Canary decisions</h2>
{_table(ev['canary'], ('round', 'mode', 'decision', 'metric', 'production', 'candidate', 'margin', 'overrides', 'reason'))}
<h2>Model versions</h2>
{_table(versions, ('version', 'parent_version', 'round', 'arm', 'status', 'config_hash', 'accuracy', 'tags'))}
<h2>Guardrail actions</h2>
{_table(ev['guardrail'], ('round', 'fired', 'rolled_back', 'restored_version', 'server_lr', 'clip_norm', 'excluded'))}
<h2>Alerts</h2>
{_table(ev['alerts'], ('round', 'detector', 'severity', 'message', 'clients'))}
<h2>Failed rounds</h2>
{_table(ev['failed'], ('round', 'reason'))}
<h2>Configuration</h2>
<pre>{html.escape(info.get('config_toml') or '')}</pre>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
