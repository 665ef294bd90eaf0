"""Array-level measures of a reconstruction: per-feature MAE on hidden positions, skill against a
baseline, Pearson correlation (also from sums that add up over batches), log-power-spectrum
error, cross-timeframe consistency, and the t statistic of a per-bar gain.
:class:`~stage1.evaluation.metrics.MetricAccumulator` streams batches through them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stage1.data.timeframes import tf_ns

T_CAP = 1e6


def mae_on_hidden(pred: np.ndarray, truth: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-feature MAE over hidden positions; NaN where nothing is hidden.

    pred, truth: ``[..., L, F]``; masks: bool ``[..., L]``. Returns ``[F]``.
    """
    n_hidden = int(masks.sum())
    if n_hidden == 0:
        return np.full(pred.shape[-1], np.nan)
    return np.abs(pred - truth)[masks].sum(axis=0) / n_hidden


def skill(mae_model: float | np.ndarray, mae_baseline: float | np.ndarray) -> Any:
    """``1 - mae_model / mae_baseline``: 1 = perfect, 0 = as good as the baseline, < 0 worse.

    NaN where the baseline's error is 0 or undefined (nothing to beat)."""
    model = np.asarray(mae_model, dtype=np.float64)
    base = np.asarray(mae_baseline, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(base > 0, 1.0 - model / base, np.nan)
    return out if out.ndim else float(out)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; NaN if either is constant or they are empty."""
    sums = pearson_sums(x, y)
    return pearson_from_sums(sums)


def pearson_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sufficient statistics ``[n, Σx, Σy, Σx², Σy², Σxy]`` (float64), summable over batches."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    return np.array([x.size, x.sum(), y.sum(), x @ x, y @ y, x @ y])


def pearson_from_sums(sums: np.ndarray) -> float:
    """Pearson correlation from :func:`pearson_sums`."""
    n, sx, sy, sxx, syy, sxy = sums
    if n < 2:
        return math.nan
    cov = sxy - sx * sy / n
    var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
    if var_x <= 0 or var_y <= 0:
        return math.nan
    return float(cov / math.sqrt(var_x * var_y))


def log_spectrum_error(composite_close: np.ndarray, true_close: np.ndarray) -> np.ndarray:
    """Per row: mean over frequencies of ``|log10 P_hat - log10 P|``, where ``P`` is the power
    spectrum of the close's first differences (log returns) and ``P_hat`` that of the composite
    series (truth where visible, reconstruction where hidden). The zero frequency is skipped; a
    floor of 1e-6 × the mean true power keeps flat series finite.

    composite_close, true_close: ``[N, L]``. Returns ``[N]``.
    """
    power_hat = np.abs(np.fft.rfft(np.diff(composite_close, axis=1), axis=1))[:, 1:] ** 2
    power = np.abs(np.fft.rfft(np.diff(true_close, axis=1), axis=1))[:, 1:] ** 2
    floor = 1e-6 * power.mean(axis=1, keepdims=True) + 1e-30
    return np.abs(np.log10(power_hat + floor) - np.log10(power + floor)).mean(axis=1)


def consistency_counts(
    base_close: np.ndarray,
    base_times: np.ndarray,
    base_tf: str,
    tf_close: np.ndarray,
    tf_times: np.ndarray,
    tf_masks: np.ndarray,
    tf: str,
    tolerance: float,
) -> tuple[int, int]:
    """Cross-timeframe consistency of a reconstruction: ``(n_agree, n_checked)``.

    A hidden bar of the higher timeframe ``tf`` is checked when the base window covers its whole
    interval ``[open, open + duration)``; the aggregated base close is the (composite) close of
    the last base bar inside that interval. It agrees when ``|close_tf - close_agg| <= tolerance``
    (raw log units).

    base_close, base_times: ``[N, L]`` (composite close, open times in int64 ns);
    tf_close, tf_times, tf_masks: ``[N, L]`` for the higher timeframe.
    """
    tf_end = tf_times + tf_ns(tf)
    covered = (base_times[:, :1] <= tf_times) & (base_times[:, -1:] + tf_ns(base_tf) >= tf_end)
    # Row of the last base bar opened before the higher bar's end: [N, L_tf].
    last_inside = (base_times[:, None, :] < tf_end[:, :, None]).sum(axis=2) - 1
    last_inside = np.clip(last_inside, 0, base_times.shape[1] - 1)
    inside = np.take_along_axis(base_times, last_inside, axis=1) >= tf_times
    checked = tf_masks & covered & inside
    aggregated = np.take_along_axis(base_close, last_inside, axis=1)
    agree = checked & (np.abs(tf_close - aggregated) <= tolerance)
    return int(agree.sum()), int(checked.sum())


def gain_t(sums: np.ndarray) -> float:
    """t statistic of the mean per-bar gain from ``[count, sum, sum of squares]``; NaN below two
    bars (too few to judge), capped at +-1e6 (a constant gain has no spread)."""
    n, total, squares = (float(v) for v in sums)
    if n < 2:
        return math.nan
    mean = total / n
    var = max(squares / n - mean * mean, 0.0) * n / (n - 1)
    if var == 0.0:
        return math.copysign(T_CAP, mean) if mean else 0.0
    return max(-T_CAP, min(T_CAP, mean / math.sqrt(var / n)))
