"""Plots (PNG, matplotlib Agg) and the self-contained one-page ``report.html``."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from stage1.data.features import CLOSE
from stage1.evaluation.spans import find_spans
from stage1.utils import atomic_path, atomic_write_text

PROBE_KINDS = ("encoder", "raw", "random", "encoder+raw")
HOW_TO_READ = (
    "Skill is 1 − MAE<sub>model</sub> / MAE<sub>baseline</sub> on the same hidden bars: "
    "&gt; 0 means the model beats that naive baseline, 0 means it is as good, &lt; 0 worse. "
    "<b>last</b> carries the last visible bar forward, <b>interp</b> interpolates linearly "
    "across the span, <b>bridge</b> runs the hidden closes from the last visible close to the "
    "next visible open and adds the median visible wick; <b>agg</b> (coarser timeframes only) "
    "rebuilds a hidden coarse bar from the visible finer bars inside its period, so what "
    "aggregation gives away earns the model no credit; skill_best is against the best baseline "
    "per feature, and the table of best baselines says which one that is. <b>covered</b> hidden "
    "coarse bars have a visible finer bar inside their period, <b>uncovered</b> ones none: skill "
    "on uncovered bars is what the model adds where no finer timeframe helps. Correlation of price levels alone proves nothing: any smooth guess "
    "scores about 0.99 (compare corr_close with corr_close_interp). Right-edge bars are hidden "
    "bars after the last visible information in any timeframe: their close is a martingale step "
    "from the last known price, so close skill against that price should be about 0. "
    "Alarms mean leakage (the model or the probe saw something it should not), not genius. "
    "Probes: ridge (volatility R²) and logistic regression (sign) on the frozen encoder's "
    "features, on hand-made window features (raw) and on a randomly initialised encoder of "
    "the same shape; an encoder is worth something only if it beats raw and random."
)


@dataclass
class PlotSamples:
    """A few windows kept for the plots (raw features, one split).

    truth, pred, interp: ``[n, n_tf, L, 6]``; masks: bool ``[n, n_tf, L]`` for those windows;
    mask_sample: bool ``[m, n_tf, L]``, the masks of the first ``m`` windows of the split.
    """

    timeframes: list[str]
    window_ids: list[int]
    truth: np.ndarray
    pred: np.ndarray
    interp: np.ndarray
    masks: np.ndarray
    mask_sample: np.ndarray


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_reconstructions(samples: PlotSamples, tf_index: int, path: Path) -> Path:
    """Truth vs reconstruction of close for the sample windows of one timeframe; hidden
    spans shaded."""
    n = len(samples.window_ids)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n), squeeze=False, layout="constrained")
    for row, ax in enumerate(axes[:, 0]):
        truth = samples.truth[row, tf_index, :, CLOSE]
        masks = samples.masks[row, tf_index]
        positions = np.arange(truth.size)
        for start, stop in find_spans(masks):
            ax.axvspan(start - 0.5, stop - 0.5, color="0.85", lw=0)
        ax.plot(positions, truth, color="black", lw=1.2, label="truth")
        # Draw guesses on hidden bars joined to their visible neighbours, so spans read as
        # paths from the last known close to the next one.
        shown = masks | np.r_[masks[1:], False] | np.r_[False, masks[:-1]]
        for guess, style in (
            (samples.interp, {"color": "tab:orange", "lw": 1, "ls": "--", "label": "interp"}),
            (samples.pred, {"color": "tab:blue", "lw": 1.5, "marker": ".", "label": "model"}),
        ):
            composite = np.where(masks, guess[row, tf_index, :, CLOSE], truth)
            ax.plot(positions, np.where(shown, composite, np.nan), **style)
        ax.set_ylabel("log(close / ref)")
        ax.set_title(f"window {samples.window_ids[row]}", fontsize=9)
    axes[0, 0].legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel(f"bar position ({samples.timeframes[tf_index]}; grey = hidden)")
    fig.suptitle(f"{samples.timeframes[tf_index]}: close, truth vs reconstruction on hidden bars")
    return _save(fig, path)


def plot_skill(per_tf: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Skill per timeframe against each baseline (price features), and close skill on
    interior vs right-edge spans."""
    timeframes = list(per_tf)
    x = np.arange(len(timeframes))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for i, name in enumerate(("last", "interp", "bridge", "agg", "best")):
        values = [_number(per_tf[tf].get(f"skill_{name}")) for tf in timeframes]
        left.bar(x + (i - 2) * 0.16, values, width=0.16, label=name)
    left.set_title("skill on hidden bars (open/high/low/close) vs baseline")
    interior = [
        _number(per_tf[tf]["interior"]["features"]["close"].get("skill_best")) for tf in timeframes
    ]
    right_edge = [_number(per_tf[tf]["right_edge"].get("close_skill_fresh")) for tf in timeframes]
    right.bar(x - 0.175, interior, width=0.35, label="interior, vs best baseline")
    right.bar(x + 0.175, right_edge, width=0.35, label="right edge, vs last known price")
    right.axhline(0.01, color="red", lw=0.8, ls=":", label="alarm (right edge)")
    right.set_title("close skill: interior vs right edge")
    for ax in (left, right):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, timeframes)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_probe(probe: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Probe scores side by side: volatility R² and sign AUC for encoder, raw and random."""
    kinds = [k for k in PROBE_KINDS if k in probe]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    left.bar(kinds, [_number(probe[k].get("vol_r2")) for k in kinds], color="tab:blue")
    left.axhline(0, color="black", lw=0.8)
    left.set_title("next-horizon log volatility, R² (ridge)")
    right.bar(kinds, [_number(probe[k].get("sign_auc")) for k in kinds], color="tab:green")
    right.axhline(0.5, color="black", lw=0.8)
    right.axhline(0.55, color="red", lw=0.8, ls=":", label="alarm")
    right.set_ylim(0.4, 0.7)
    right.set_title("next-horizon return sign, AUC (logistic)")
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_masks(samples: PlotSamples, path: Path) -> Path:
    """Mask pattern (hidden = dark) of the first windows, one panel per timeframe."""
    n_tf = len(samples.timeframes)
    fig, axes = plt.subplots(1, n_tf, figsize=(2.2 * n_tf, 4), squeeze=False, layout="constrained")
    for k, ax in enumerate(axes[0]):
        ax.imshow(samples.mask_sample[:, k], aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set_title(samples.timeframes[k])
        ax.set_xlabel("position")
    axes[0, 0].set_ylabel("window")
    fig.suptitle("evaluation masks (dark = hidden)")
    return _save(fig, path)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:+.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


METRIC_COLUMNS = (
    "n_hidden_bars", "mae", "mae_price", "mae_pips", "corr_close", "corr_close_interp",
    "corr_delta", "skill_last", "skill_interp", "skill_bridge", "skill_agg", "skill_best",
    "consistency_ratio", "spectrum_error", "spectrum_error_interp",
)  # fmt: skip


def _metrics_table(per_tf: Mapping[str, Mapping[str, Any]], mean: Mapping[str, Any]) -> str:
    head = "".join(
        f"<th>{c}</th>"
        for c in (
            "timeframe",
            *METRIC_COLUMNS,
            "close skill_best interior",
            "right-edge close skill vs last known price",
        )
    )
    rows = []
    for name, entry in [*per_tf.items(), ("mean", mean)]:
        cells = [f"<td>{html.escape(name)}</td>"]
        cells += [f"<td>{_fmt(entry.get(c))}</td>" for c in METRIC_COLUMNS]
        interior = entry.get("interior", {}).get("features", {}).get("close", {})
        cells.append(f"<td>{_fmt(interior.get('skill_best'))}</td>")
        cells.append(f"<td>{_fmt(entry.get('right_edge', {}).get('close_skill_fresh'))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


BLOCK_COLUMNS = (
    "n_hidden_bars", "mae", "skill_last", "skill_interp", "skill_bridge", "skill_agg",
    "skill_best",
)  # fmt: skip
BEST_FEATURES = ("open", "high", "low", "close")


def _best_baseline_table(per_tf: Mapping[str, Mapping[str, Any]]) -> str:
    """Which baseline is best (lowest MAE) per timeframe, class of hidden bars and feature."""
    blocks = ("all", "interior", "right_edge", "covered", "uncovered")
    head = "".join(f"<th>{c}</th>" for c in ("timeframe", "hidden bars", *BEST_FEATURES))
    rows = []
    for tf, entry in per_tf.items():
        for block in blocks:
            source = entry if block == "all" else entry.get(block)
            if not source:
                continue
            feats = source.get("features", {})
            cells = "".join(
                f"<td>{_fmt(feats.get(f, {}).get('best_baseline'))}</td>" for f in BEST_FEATURES
            )
            rows.append(f"<tr><td>{html.escape(tf)}</td><td>{block}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _coverage_table(per_tf: Mapping[str, Mapping[str, Any]]) -> str:
    """Per coarser timeframe: covered vs uncovered hidden bars, each with its own skills."""
    head = "".join(
        f"<th>{c}</th>" for c in ("timeframe", "hidden bars", *BLOCK_COLUMNS, "close skill_bridge")
    )
    rows = []
    for tf, entry in per_tf.items():
        for block in ("covered", "uncovered"):
            if block not in entry:
                continue
            values = entry[block]
            close = values.get("features", {}).get("close", {})
            cells = "".join(f"<td>{_fmt(values.get(c))}</td>" for c in BLOCK_COLUMNS)
            rows.append(
                f"<tr><td>{html.escape(tf)}</td><td>{block}</td>{cells}"
                f"<td>{_fmt(close.get('skill_bridge'))}</td></tr>"
            )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _instrument_table(per_instrument: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per instrument: windows, pip and the mean skills (each on its own windows)."""
    keys = ("skill_last", "skill_interp", "skill_bridge", "skill_agg", "skill_best", "mae_pips")
    head = "".join(f"<th>{k}</th>" for k in ("instrument", "n_windows", "pip", *keys))
    rows = []
    for name, entry in per_instrument.items():
        mean = entry.get("mean", {})
        pip = entry.get("pip")
        cells = [
            html.escape(name),
            f"{entry.get('n_windows', 0):,}",
            "–" if pip is None else f"{pip:g}",
        ]
        cells += [_fmt(mean.get(k)) for k in keys]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _probe_table(probe: Mapping[str, Mapping[str, Any]]) -> str:
    columns = ("vol_r2", "sign_acc", "sign_auc", "n_train", "n_test")
    head = "".join(f"<th>{c}</th>" for c in ("features", *columns))
    rows = [
        "<tr><td>"
        + kind
        + "</td>"
        + "".join(f"<td>{_fmt(probe[kind].get(c))}</td>" for c in columns)
        + "</tr>"
        for kind in PROBE_KINDS
        if kind in probe
    ]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def write_html(metrics: Mapping[str, Any], images: Sequence[Path], path: Path) -> Path:
    """One self-contained page: summary, alarms, how to read, tables, images (base64)."""
    alarms = metrics.get("alarms", [])
    if alarms:
        alarm_html = '<div class="alarm"><b>Alarms (possible leakage):</b><ul>' + "".join(
            f"<li>{html.escape(a)}</li>" for a in alarms
        ) + "</ul></div>"  # fmt: skip
    else:
        alarm_html = '<div class="ok">No alarms: no sign of leakage.</div>'
    unsync = metrics.get("unsynchronised")
    unsync_html = (
        "<h2>Unsynchronised masks (optimistic, for comparison only)</h2>"
        f"<p>{html.escape(unsync['note'])}</p>" + _metrics_table(unsync["per_tf"], unsync["mean"])
        if unsync
        else ""
    )
    per_instrument = metrics.get("per_instrument") or {}
    instrument_html = (
        "<h2>Per instrument (each on its own windows; the tables above pool them)</h2>"
        + _instrument_table(per_instrument)
        if len(per_instrument) > 1
        else ""
    )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Stage 1 evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 1em 0; }}
td, th {{ border: 1px solid #bbb; padding: 3px 6px; text-align: right; }}
th {{ background: #eee; }}
.alarm {{ background: #fdd; border: 1px solid #c00; padding: 0.5em 1em; }}
.ok {{ background: #dfd; border: 1px solid #090; padding: 0.5em 1em; }}
img {{ max-width: 100%; display: block; margin: 1em 0; }}
</style></head><body>
<h1>Stage 1 evaluation: {html.escape(str(metrics.get("split")))} split</h1>
<p>{metrics.get("n_windows", 0):,} windows (every window of the split) ·
checkpoint <code>{html.escape(str(metrics.get("checkpoint")))}</code> ·
data <code>{html.escape(str(metrics.get("data_dir")))}</code> ·
masks: {html.escape(str(metrics.get("masking", {})))}</p>
{alarm_html}
<h2>How to read this</h2><p>{HOW_TO_READ}</p>
<h2>Reconstruction of hidden bars (synchronised masks)</h2>
<p>mae in normalised units (price features), mae_price in price units, mae_pips in pips
({html.escape(str(metrics.get("definitions", {}).get("pip", "")))}).</p>
{_metrics_table(metrics.get("per_tf", {}), metrics.get("mean", {}))}
{instrument_html}
<h2>Coarser timeframes: hidden bars with and without visible finer bars inside</h2>
<p>covered: at least one visible bar of a finer timeframe opens inside the bar's period (agg
reads them); uncovered: none (agg is the bridge there).</p>
{_coverage_table(metrics.get("per_tf", {}))}
<h2>Best baseline (lowest MAE) per timeframe, hidden-bar class and feature</h2>
{_best_baseline_table(metrics.get("per_tf", {}))}
{unsync_html}
<h2>Linear probes (fit on train windows, scored on this split)</h2>
{_probe_table(metrics.get("probe", {}))}
<h2>Plots</h2>
{"".join(_image(p) for p in images)}
</body></html>
"""
    atomic_write_text(path, page)
    return path


def write_report(
    report_dir: Path, metrics: Mapping[str, Any], samples: PlotSamples
) -> dict[str, Path]:
    """Write every PNG and ``report.html`` into ``report_dir``; return ``{name: path}``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    images = {"skill": plot_skill(metrics["per_tf"], report_dir / "skill.png")}
    if metrics.get("probe"):
        images["probe"] = plot_probe(metrics["probe"], report_dir / "probe.png")
    images["masks"] = plot_masks(samples, report_dir / "masks.png")
    for k, tf in enumerate(samples.timeframes):
        if len(samples.window_ids):
            images[f"reconstruction_{tf}"] = plot_reconstructions(
                samples, k, report_dir / f"reconstruction_{tf}.png"
            )
    report = write_html(metrics, list(images.values()), report_dir / "report.html")
    return {**images, "report": report}
