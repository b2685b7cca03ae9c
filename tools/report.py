"""Learning-curve plot and HTML report of one run.

The plot is the kit's picture (step curve of NAUC on the log time axis
x = log(1 + t/60) / log(1 + T/60), area filled, ALC in the legend) with a top
axis in seconds whose ticks are chosen for the actual budget T (the kit's are
hard-coded for T >= 1200 s). The HTML page is self-contained: the PNG is inlined.
"""
from __future__ import annotations

import base64
import html
import math
import os
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from autodl_core import metrics  # noqa: E402

# Candidate top-axis ticks in seconds: round numbers a reader recognises.
_NICE_SECONDS = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400]
_MIN_TICK_GAP = 0.07  # on the transformed axis, so labels do not overlap


def seconds_ticks(time_budget: float) -> list[float]:
    """Round-second ticks inside [0, T], always including 0 and T, spaced apart on the log axis."""
    if time_budget <= 0:
        raise ValueError(f"time budget must be positive, got {time_budget}")
    ticks = [0.0]
    end = float(time_budget)
    for t in _NICE_SECONDS:
        if t >= end:
            break
        x = float(metrics.transform_time(t, end))
        if x - float(metrics.transform_time(ticks[-1], end)) >= _MIN_TICK_GAP and 1.0 - x >= _MIN_TICK_GAP:
            ticks.append(float(t))
    ticks.append(end)
    return ticks


def _format_seconds(t: float) -> str:
    return f"{t:g}" if t < 1e5 else f"{t:.3g}"


def plot_learning_curve(timestamps, naucs, time_budget: float, path: str | os.PathLike,
                        alc: float | None = None, title: str | None = None) -> Path:
    """Save the step learning curve as a PNG; predictions after T are not drawn (as in the kit)."""
    time_budget = float(time_budget)
    pairs = [(float(t), float(s)) for t, s in zip(timestamps, naucs)]
    if alc is None:
        alc = metrics.alc([t for t, _ in pairs], [s for _, s in pairs], time_budget)
    drawn = [(t, s) for t, s in pairs if t <= time_budget]
    xs = [0.0] + [float(metrics.transform_time(t, time_budget)) for t, _ in drawn]
    ys = [0.0] + [s for _, s in drawn]

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.set_xlim(0, 1)
    low = min([0.0] + ys)
    ax.set_ylim(min(-0.01, low - 0.05), 1.05)
    ax.set_xlabel(f"transformed time  log(1 + t/60) / log(1 + T/60)   (T = {time_budget:g} s)")
    ax.set_ylabel("NAUC = 2 AUC - 1")
    ax.grid(True, alpha=0.4)
    ax.fill_between(xs + [1.0], ys + [ys[-1]], step="post", color="tab:cyan", alpha=0.35)
    ax.plot(xs, ys, drawstyle="steps-post", marker="o", markersize=3, color="tab:blue",
            label=f"ALC = {alc:.4f}")
    ax.plot(xs[-1:] + [1.0], ys[-1:] * 2, linestyle="--", linewidth=1, color="tab:blue")
    if len(drawn):
        ax.annotate(f"{ys[-1]:.4f}", (1.0, ys[-1]), xytext=(-40, 5), textcoords="offset points")
    if len(drawn) < len(pairs):
        ax.text(0.02, 0.02, f"{len(pairs) - len(drawn)} prediction(s) after T not drawn",
                transform=ax.transAxes, fontsize=8, color="tab:red")
    ax.legend(loc="lower right")

    top = ax.twiny()
    top.set_xlim(0, 1)
    ticks = seconds_ticks(time_budget)
    top.set_xticks([float(metrics.transform_time(t, time_budget)) for t in ticks])
    top.set_xticklabels([_format_seconds(t) for t in ticks])
    top.set_xlabel("seconds since the clock started")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def write_html_report(scores: dict, png_path: str | os.PathLike | None, path: str | os.PathLike,
                      details: dict | None = None) -> Path:
    """Write a self-contained HTML page: status, summary numbers, the curve, one row per prediction.

    `scores` is the scores.json dict (ScoreSummary fields plus status, peak memory, error...).
    `details` are extra key/value rows for the summary (code dir, dataset, TF mode...).
    """
    esc = html.escape
    status = str(scores.get("status", "unknown"))
    ok = status == "ok"
    summary_rows = [
        ("status", status),
        ("task", scores.get("task_name")),
        ("time budget (s)", _fmt(scores.get("time_budget"), 0)),
        ("ALC", _fmt(scores.get("alc"))),
        ("final NAUC", _fmt(scores.get("final_nauc"))),
        ("predictions", scores.get("n_predictions")),
        ("time to first prediction (s)", _fmt(scores.get("time_to_first_prediction"), 2)),
        ("duration: last prediction (s)", _fmt(scores.get("duration"), 2)),
    ]
    if scores.get("peak_rss_bytes"):
        summary_rows.append(("peak memory (GB)", f"{scores['peak_rss_bytes'] / 1e9:.2f}"))
    for key, value in (details or {}).items():
        summary_rows.append((key, value))
    table = "\n".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in summary_rows)

    budget = float(scores.get("time_budget") or float("nan"))
    accuracy = scores.get("accuracy")
    pred_rows = []
    for k, (t, s) in enumerate(zip(scores.get("timestamps", []), scores.get("naucs", []))):
        x = float(metrics.transform_time(t, budget)) if budget > 0 else float("nan")
        acc = _fmt(accuracy[k]) if accuracy else "-"
        late = ' class="late"' if budget > 0 and t > budget else ""
        pred_rows.append(f"<tr{late}><td>{k}</td><td>{t:.2f}</td><td>{x:.4f}</td>"
                         f"<td>{_fmt(s)}</td><td>{acc}</td></tr>")
    predictions = "\n".join(pred_rows) or '<tr><td colspan="5">no prediction</td></tr>'

    image = ""
    if png_path and Path(png_path).is_file():
        encoded = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
        image = f'<img alt="learning curve" src="data:image/png;base64,{encoded}"/>'
    error = scores.get("error")
    error_block = f'<pre class="error">{esc(str(error))}</pre>' if error else ""

    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>AutoDL run: {esc(str(scores.get('task_name')))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }}
.status {{ font-weight: bold; color: {'#1a7f37' if ok else '#b42318'}; }}
.error {{ background: #fee; padding: 0.8em; white-space: pre-wrap; }}
tr.late {{ color: #b42318; }}
</style></head><body>
<h1>AutoDL run: {esc(str(scores.get('task_name')))}</h1>
<p class="status">status: {esc(status)}</p>
{error_block}
<h2>Summary</h2>
<table>
{table}
</table>
<h2>Learning curve</h2>
{image}
<h2>Predictions</h2>
<table>
<tr><th>k</th><th>t (s)</th><th>x(t)</th><th>NAUC</th><th>accuracy</th></tr>
{predictions}
</table>
<p><small>generated {datetime.now().isoformat(timespec='seconds')}</small></p>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
