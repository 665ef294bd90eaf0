"""Reconstruction metrics on hidden positions: MAE, skill against naive baselines, correlation,
cross-timeframe consistency and log-power-spectrum error (SPEC §6).

Conventions (also written into the metrics JSON under ``definitions``):

* Baselines and errors are computed in RAW feature space (log price relative to the window's
  reference price). ``mae`` is then reported in normalised units: the raw MAE of a feature divided
  by the normaliser's std of that (timeframe, feature), i.e. exactly the MAE of the z-scored
  values. Skill ratios do not depend on that choice, per feature.
* Only hidden positions count. Visible positions never enter any metric, except as the known
  neighbours that baselines and composite series read.
* The headline ``mae`` of a timeframe is the mean of the per-feature normalised MAEs over the
  four price features (open, high, low, close); every price feature has the same number of hidden
  bars, so this is the pooled MAE. Headline ``skill_X = 1 - mae_model / mae_X`` uses those means;
  ``skill_best`` compares with the best baseline chosen per feature.
* ``skill_best`` and ``best_baseline`` take ``agg`` (:mod:`stage1.evaluation.agg`) into account
  where it exists (every timeframe but the base one, where ``mae_agg`` / ``skill_agg`` are None).
* ``right_edge`` bars are hidden bars after the last visible information of the window (see
  :func:`span_class_masks`); every other hidden bar is ``interior``. On every coarser timeframe
  the hidden bars are also split into ``covered`` (a visible finer bar inside the bar's period)
  and ``uncovered`` (:func:`coverage_class_masks`); the base timeframe has no such blocks.

The array-level measures live in :mod:`stage1.evaluation.measures`, the leak alarms in
:mod:`stage1.evaluation.alarms`; the names the documentation lists here are re-exported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stage1.data.features import CLOSE, DELTA_CLOSE, FEATURE_NAMES, N_FEATURES
from stage1.data.instruments import pip_size as pip_size  # the pip rule, re-exported
from stage1.evaluation.agg import baseline_agg
from stage1.evaluation.alarms import leak_alarms as leak_alarms
from stage1.evaluation.baselines import (
    BASELINE_NAMES,
    PRICE_FEATURES,
    all_baselines,
)
from stage1.evaluation.measures import consistency_counts as consistency_counts
from stage1.evaluation.measures import gain_t, pearson_from_sums, pearson_sums
from stage1.evaluation.measures import log_spectrum_error as log_spectrum_error
from stage1.evaluation.measures import mae_on_hidden as mae_on_hidden
from stage1.evaluation.measures import pearson as pearson
from stage1.evaluation.measures import skill as skill
from stage1.evaluation.spans import COVERAGE_CLASSES as COVERAGE_CLASSES
from stage1.evaluation.spans import SPAN_CLASSES as SPAN_CLASSES
from stage1.evaluation.spans import count_spans as count_spans
from stage1.evaluation.spans import coverage_class_masks
from stage1.evaluation.spans import find_spans as find_spans
from stage1.evaluation.spans import freshest_visible_close as freshest_visible_close
from stage1.evaluation.spans import span_class_masks as span_class_masks

SOURCES = ("model", *BASELINE_NAMES)
# Classes of hidden bars with their own block: two partitions (interior + right_edge; on coarser
# timeframes also covered + uncovered).
CLASSES = (*SPAN_CLASSES, *COVERAGE_CLASSES)
CONSISTENCY_TOLERANCE_STD = 0.25


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


class MetricAccumulator:
    """Streams batches of (truth, reconstruction, masks) and sums everything the metrics need,
    so every window of a split is scored without holding them all in memory.

    timeframes: finest first. feature_std: float ``[n_tf, 6]`` normaliser std in raw units (to
    report MAE in normalised units and to scale the consistency tolerance).
    """

    def __init__(self, timeframes: Sequence[str], feature_std: np.ndarray) -> None:
        self.timeframes = list(timeframes)
        self.feature_std = np.asarray(feature_std, dtype=np.float64)
        n_tf = len(self.timeframes)
        self.abs_err = np.zeros((n_tf, len(SOURCES), len(CLASSES), N_FEATURES))
        self.n_bars = np.zeros((n_tf, len(CLASSES)), dtype=np.int64)
        # Spans per class (runs of that class's bars) and in all; a coarse span can be split.
        self.n_spans = np.zeros((n_tf, len(CLASSES)), dtype=np.int64)
        self.n_spans_total = np.zeros(n_tf, dtype=np.int64)
        self.price_abs_err = np.zeros(n_tf)
        self.n_price_bars = np.zeros(n_tf, dtype=np.int64)
        # Pearson sums per timeframe: model close, model delta_close, interp close.
        self.corr_sums = np.zeros((n_tf, 3, 6))
        self.spectrum_sum = np.zeros((n_tf, 2))  # model, interp
        self.spectrum_rows = np.zeros(n_tf, dtype=np.int64)
        self.consistency = np.zeros((n_tf, 2), dtype=np.int64)  # agree, checked
        # Right-edge close errors of the model and of the freshest visible close (any timeframe).
        self.fresh_abs_err = np.zeros((n_tf, 2))
        # Per-bar gain over the last known price, |e_fresh| - |e_model|: count, sum, sum of squares.
        self.fresh_gain = np.zeros((n_tf, 3))
        self.n_windows = 0

    def update(
        self,
        truth: np.ndarray,
        pred: np.ndarray,
        masks: np.ndarray,
        times: np.ndarray,
        truth_prices: np.ndarray | None = None,
        pred_prices: np.ndarray | None = None,
    ) -> np.ndarray:
        """Add one batch.

        truth, pred: raw features ``[B, n_tf, L, 6]``; masks: bool ``[B, n_tf, L]``; times: int64
        ns ``[B, n_tf, L]``; truth_prices, pred_prices (optional): OHLC prices ``[B, n_tf, L, 4]``
        for ``mae_price``. Returns the interp baseline ``[B, n_tf, L, 6]`` (for plots).
        """
        truth = np.asarray(truth, dtype=np.float64)
        pred = np.asarray(pred, dtype=np.float64)
        self.n_windows += truth.shape[0]
        interp_all = np.empty_like(truth)
        composite_base: np.ndarray | None = None
        single = [all_baselines(truth[:, k], masks[:, k]) for k in range(len(self.timeframes))]
        bridges = np.stack([guesses["bridge"] for guesses in single], axis=1)
        agg, covered = baseline_agg(truth, masks, times, self.timeframes, bridges)
        classes = {
            **span_class_masks(masks, times, self.timeframes),
            **coverage_class_masks(masks, covered),
        }
        fresh = freshest_visible_close(truth[..., CLOSE], masks, times, self.timeframes)
        for k, tf in enumerate(self.timeframes):
            values, tf_masks = truth[:, k], masks[:, k]
            # On the base timeframe agg is the bridge; its errors are never reported there.
            guesses = {"model": pred[:, k], **single[k], "agg": agg[:, k]}
            interp_all[:, k] = guesses["interp"]
            self.n_spans_total[k] += count_spans(tf_masks)
            self._update_errors(k, values, guesses, {c: classes[c][:, k] for c in CLASSES}, fresh)
            self._update_scalars(k, values, guesses, tf_masks)
            if truth_prices is not None and pred_prices is not None:
                err = np.abs(pred_prices[:, k] - truth_prices[:, k])[tf_masks]
                self.price_abs_err[k] += err.sum()
                self.n_price_bars[k] += err.size
            composite = np.where(tf_masks, pred[:, k, :, CLOSE], values[..., CLOSE])
            if k == 0:
                composite_base = composite
            else:
                assert composite_base is not None
                tolerance = CONSISTENCY_TOLERANCE_STD * self.feature_std[k, CLOSE]
                self.consistency[k] += consistency_counts(
                    composite_base, times[:, 0], self.timeframes[0],
                    composite, times[:, k], tf_masks, tf, tolerance,
                )  # fmt: skip
        return interp_all

    def _update_errors(
        self,
        k: int,
        values: np.ndarray,
        guesses: Mapping[str, np.ndarray],
        classes: Mapping[str, np.ndarray],
        fresh: np.ndarray,
    ) -> None:
        """Absolute-error sums of timeframe ``k`` per source and span class, and the right-edge
        close errors of the model and of the last known price ``fresh`` ``[B]``."""
        hidden = classes["interior"] | classes["right_edge"]
        # Every class is a subset of the hidden bars: [C, n_hidden] 0/1 weights, one matmul per
        # source instead of one masked sum per (source, class).
        weights = np.stack([classes[name][hidden] for name in CLASSES]).astype(np.float64)
        self.n_bars[k] += weights.sum(axis=1).astype(np.int64)
        self.n_spans[k] += [count_spans(classes[name]) for name in CLASSES]
        for s, source in enumerate(SOURCES):
            self.abs_err[k, s] += weights @ np.abs(guesses[source][hidden] - values[hidden])
        right_edge = classes["right_edge"]
        true_close = values[..., CLOSE][right_edge]
        model_close = guesses["model"][..., CLOSE][right_edge]
        fresh_close = np.broadcast_to(fresh[:, None], right_edge.shape)[right_edge]
        model_err, fresh_err = np.abs(model_close - true_close), np.abs(fresh_close - true_close)
        self.fresh_abs_err[k] += [model_err.sum(), fresh_err.sum()]
        gain = fresh_err - model_err
        self.fresh_gain[k] += [gain.size, gain.sum(), gain @ gain]

    def _update_scalars(
        self, k: int, values: np.ndarray, guesses: Mapping[str, np.ndarray], masks: np.ndarray
    ) -> None:
        """Correlation and spectrum sums of timeframe ``k``."""
        model, interp = guesses["model"], guesses["interp"]
        self.corr_sums[k, 0] += pearson_sums(model[..., CLOSE][masks], values[..., CLOSE][masks])
        self.corr_sums[k, 1] += pearson_sums(
            model[..., DELTA_CLOSE][masks], values[..., DELTA_CLOSE][masks]
        )
        self.corr_sums[k, 2] += pearson_sums(interp[..., CLOSE][masks], values[..., CLOSE][masks])
        rows = masks.any(axis=1)
        if rows.any():
            true_close = values[rows][..., CLOSE]
            for s, guess in enumerate((model, interp)):
                composite = np.where(masks[rows], guess[rows][..., CLOSE], true_close)
                self.spectrum_sum[k, s] += log_spectrum_error(composite, true_close).sum()
            self.spectrum_rows[k] += int(rows.sum())

    def _block(self, k: int, class_ids: Sequence[int], n_spans: int) -> dict[str, Any]:
        """MAE and skills of timeframe ``k`` over the given classes of hidden bars, against every
        baseline that exists there (no ``agg`` on the base timeframe: None)."""
        n_bars = int(self.n_bars[k, list(class_ids)].sum())
        block: dict[str, Any] = {"n_hidden_bars": n_bars, "n_spans": n_spans}
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = self.abs_err[k][:, list(class_ids)].sum(axis=1) / n_bars  # [sources, F]
        mae = raw / self.feature_std[k]  # normalised units
        if k == 0:
            mae[SOURCES.index("agg")] = np.nan
        names = [name for name in BASELINE_NAMES if k > 0 or name != "agg"]
        baselines = mae[[SOURCES.index(name) for name in names]]
        best = baselines.min(axis=0) if n_bars else np.full(N_FEATURES, np.nan)
        price = list(PRICE_FEATURES)
        block["mae"] = _finite_or_none(mae[0, price].mean())
        for s, name in enumerate(BASELINE_NAMES, start=1):
            block[f"mae_{name}"] = _finite_or_none(mae[s, price].mean())
            block[f"skill_{name}"] = _finite_or_none(
                skill(mae[0, price].mean(), mae[s, price].mean())
            )
        block["skill_best"] = _finite_or_none(skill(mae[0, price].mean(), best[price].mean()))
        features: dict[str, Any] = {}
        for f, fname in enumerate(FEATURE_NAMES):
            entry: dict[str, Any] = {"mae": _finite_or_none(mae[0, f])}
            for s, name in enumerate(BASELINE_NAMES, start=1):
                entry[f"mae_{name}"] = _finite_or_none(mae[s, f])
                entry[f"skill_{name}"] = _finite_or_none(skill(mae[0, f], mae[s, f]))
            entry["skill_best"] = _finite_or_none(skill(mae[0, f], best[f]))
            entry["best_baseline"] = names[int(np.argmin(baselines[:, f]))] if n_bars else None
            features[fname] = entry
        block["features"] = features
        return block

    def result(self, pip: float | None = None) -> dict[str, Any]:
        """``{'per_tf': {tf: {...}}, 'mean': {...}, 'n_windows': int}``; None for undefined
        values (e.g. a timeframe with no hidden bar)."""
        per_tf: dict[str, Any] = {}
        for k, tf in enumerate(self.timeframes):
            entry = self._block(k, range(len(SPAN_CLASSES)), int(self.n_spans_total[k]))
            price = self.price_abs_err[k] / self.n_price_bars[k] if self.n_price_bars[k] else None
            entry["mae_price"] = _finite_or_none(price) if price is not None else None
            entry["mae_pips"] = _finite_or_none(price / pip) if price is not None and pip else None
            entry["corr_close"] = _finite_or_none(pearson_from_sums(self.corr_sums[k, 0]))
            entry["corr_delta"] = _finite_or_none(pearson_from_sums(self.corr_sums[k, 1]))
            entry["corr_close_interp"] = _finite_or_none(pearson_from_sums(self.corr_sums[k, 2]))
            rows = self.spectrum_rows[k]
            entry["spectrum_error"] = (
                _finite_or_none(self.spectrum_sum[k, 0] / rows) if rows else None
            )
            entry["spectrum_error_interp"] = (
                _finite_or_none(self.spectrum_sum[k, 1] / rows) if rows else None
            )
            agree, checked = self.consistency[k]
            entry["consistency_ratio"] = float(agree / checked) if checked else None
            entry["consistency_n"] = int(checked)
            for c, name in enumerate(CLASSES):
                if k > 0 or name in SPAN_CLASSES:
                    entry[name] = self._block(k, [c], int(self.n_spans[k, c]))
            model_err, fresh_err = self.fresh_abs_err[k]
            entry["right_edge"]["close_skill_fresh"] = _finite_or_none(skill(model_err, fresh_err))
            entry["right_edge"]["close_skill_fresh_t"] = _finite_or_none(gain_t(self.fresh_gain[k]))
            per_tf[tf] = entry
        return {"n_windows": self.n_windows, "per_tf": per_tf, "mean": mean_over_timeframes(per_tf)}


def mean_over_timeframes(per_tf: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Average every numeric leaf over timeframes (counts ``n_*`` are summed instead), skipping
    timeframes where it is undefined (None). Nested dicts are averaged leaf by leaf."""
    entries = list(per_tf.values())
    out: dict[str, Any] = {}
    if not entries:
        return out
    # Keys in first-seen order: a block absent on some timeframes (covered on the base one) is
    # averaged over the timeframes that have it.
    for key in dict.fromkeys(key for e in entries for key in e):
        values = [e.get(key) for e in entries]
        nested = [v for v in values if isinstance(v, Mapping)]
        if nested and all(v is None or isinstance(v, Mapping) for v in values):
            out[key] = mean_over_timeframes({str(i): v for i, v in enumerate(nested)})
            continue
        numbers = [
            float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if not numbers:
            if all(v is None or isinstance(v, int | float) for v in values):
                out[key] = None
            continue
        out[key] = int(sum(numbers)) if key.startswith("n_") else float(np.mean(numbers))
    return out
