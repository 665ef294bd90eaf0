"""Linear probes: is anything linearly readable from a window's representation about the NEXT
horizon's realised volatility and return sign?

Numpy (the targets' rule, :mod:`stage1.data.targets`, is shared with training). Features are
standardised with train statistics; ridge regression (closed form) gives the volatility R², L2
logistic regression (Newton / IRLS) gives the sign accuracy and AUC. The regularisation strength
is chosen on the chronologically last part of the train set, then the
probe is refitted on the whole train set and scored once on the evaluated split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stage1.data.features import DELTA_CLOSE, HIGH, LOW
from stage1.data.targets import gathered_targets

LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
VALIDATION_FRAC = 0.2
TARGET_CHUNK = 65_536  # anchors per gather of their horizon bars (bounded memory)


def probe_targets(
    close: np.ndarray,
    open_ns: np.ndarray,
    end_rows: np.ndarray,
    horizon_bars: int,
    bar_ns: int,
    row_end: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-horizon targets for anchors at base-timeframe rows ``end_rows``.

    close, open_ns: the base timeframe's closes and open times (int64 ns), ``[n_rows]``.
    Targets (:mod:`stage1.data.targets`, the rule the forecast objective trains on too): log
    realised volatility ``log sqrt(Σ r²)`` of the ``horizon_bars`` log close returns after the
    anchor bar, and the sign (1 = up) of their sum. These future bars are labels only; they
    never enter a window. ``row_end`` (optional, ``[n]``): the end of each anchor's instrument
    block in the rows (several instruments share one row space); a horizon must end before it.

    Returns ``(log_vol [n], sign [n] int64, valid [n] bool)``; targets of invalid anchors are 0.
    """
    end_rows = np.asarray(end_rows, dtype=np.int64)
    row_end = np.full_like(end_rows, len(close)) if row_end is None else np.asarray(row_end)
    log_vol = np.zeros(len(end_rows))
    sign = np.zeros(len(end_rows), dtype=np.int64)
    valid = np.zeros(len(end_rows), dtype=bool)
    for start in range(0, len(end_rows), TARGET_CHUNK):
        part = slice(start, start + TARGET_CHUNK)
        vol, ret, ok = gathered_targets(
            close, open_ns, end_rows[part], row_end[part], [horizon_bars], bar_ns
        )
        log_vol[part], valid[part] = vol[:, 0].numpy(), ok[:, 0].numpy()
        sign[part] = (ret[:, 0] > 0).numpy()
    return log_vol, sign, valid


def window_summary_features(raw: np.ndarray, normalized: np.ndarray) -> np.ndarray:
    """Hand-made per-window features (the "raw" probe), per timeframe: the newest bar's six
    normalised features, the window's log realised volatility ``log sqrt(Σ delta_close²)`` and
    its log range ``log(max high / min low)``.

    raw: raw features ``[B, n_tf, L, 6]``; normalized: the same, z-scored. Returns
    ``[B, n_tf * 8]`` float64.
    """
    raw = np.asarray(raw, dtype=np.float64)
    last = np.asarray(normalized, dtype=np.float64)[:, :, -1, :]
    realised = np.sqrt((raw[..., 1:, DELTA_CLOSE] ** 2).sum(axis=-1))
    price_range = raw[..., HIGH].max(axis=-1) - raw[..., LOW].min(axis=-1)
    tiny = 1e-12  # a perfectly flat window would give log(0)
    logs = np.stack([np.log(realised + tiny), np.log(price_range + tiny)], axis=-1)
    return np.concatenate([last, logs], axis=-1).reshape(raw.shape[0], -1)


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both with the train mean/std (constant columns keep std 1)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def ridge_path(
    x: np.ndarray, y: np.ndarray, lambdas: Sequence[float]
) -> list[tuple[np.ndarray, float]]:
    """Closed-form ridge for several strengths, sharing one Gram matrix: ``[(weights [d],
    intercept)]``. x: ``[n, d]``, y: ``[n]``; the penalty ``lam * n * |w|²`` spares the
    intercept (data are centred)."""
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc = x - x_mean
    gram, rhs = xc.T @ xc, xc.T @ (y - y_mean)
    out = []
    for lam in lambdas:
        weights = np.linalg.solve(gram + lam * x.shape[0] * np.eye(x.shape[1]), rhs)
        out.append((weights, float(y_mean - x_mean @ weights)))
    return out


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Closed-form ridge with one strength (see :func:`ridge_path`)."""
    return ridge_path(x, y, [lam])[0]


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination ``1 - SSE / SST`` (SST about ``y_true``'s own mean)."""
    sst = float(((y_true - y_true.mean()) ** 2).sum())
    if sst <= 0:
        return float("nan")
    return 1.0 - float(((y_true - y_pred) ** 2).sum()) / sst


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # tanh form: no overflow for large |z|


def logistic_fit(
    x: np.ndarray,
    y: np.ndarray,
    lam: float,
    init: tuple[np.ndarray, float] | None = None,
    n_iter: int = 50,
) -> tuple[np.ndarray, float]:
    """L2 logistic regression by Newton steps (IRLS): ``(weights [d], intercept)``.

    x: ``[n, d]``, y: ``[n]`` in {0, 1}; the penalty ``lam * n / 2 * |w|²`` spares the
    intercept. ``init`` warm-starts from another fit (e.g. the next stronger penalty).
    """
    n, d = x.shape
    design = np.concatenate([x, np.ones((n, 1))], axis=1)
    penalty = lam * n * np.eye(d + 1)
    penalty[d, d] = 0.0
    theta = np.zeros(d + 1) if init is None else np.append(init[0], init[1])
    for _ in range(n_iter):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (p - y) + penalty @ theta
        hessian = (design.T * (p * (1 - p))) @ design + penalty + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-7:
            break
    return theta[:d], float(theta[d])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties given their average rank.

    NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank per group of equal scores: 1-based ranks first..last, midpoint assigned.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    stops = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + stops + 1) / 2.0, stops - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _choose_lambda(x: np.ndarray, y: np.ndarray, classify: bool) -> float:
    """Lambda with the best validation score on the last ``VALIDATION_FRAC`` of train (rows are
    in time order, so this is a chronological hold-out)."""
    n_fit = round(len(y) * (1 - VALIDATION_FRAC))
    if n_fit < 2 or len(y) - n_fit < 2:
        return 1.0
    x_fit, x_val = standardize(x[:n_fit], x[n_fit:])
    y_fit, y_val = y[:n_fit], y[n_fit:]
    if not classify:
        fits = ridge_path(x_fit, y_fit, LAMBDAS)
        losses = [float(((x_val @ w + b - y_val) ** 2).mean()) for w, b in fits]
        return LAMBDAS[int(np.argmin(losses))]
    # Strong to weak penalty, each fit warm-started from the previous one: few Newton steps.
    scores: dict[float, float] = {}
    fit: tuple[np.ndarray, float] | None = None
    for lam in sorted(LAMBDAS, reverse=True):
        fit = logistic_fit(x_fit, y_fit, lam, init=fit)
        scores[lam] = _log_loss(y_val, _sigmoid(x_val @ fit[0] + fit[1]))
    return min(scores, key=scores.__getitem__)


def run_probe(
    x_train: np.ndarray,
    vol_train: np.ndarray,
    sign_train: np.ndarray,
    x_test: np.ndarray,
    vol_test: np.ndarray,
    sign_test: np.ndarray,
) -> dict[str, Any]:
    """Fit both probes on train (rows in time order) and score them on test.

    x_*: ``[n, d]`` pooled features; vol_*: log realised volatility ``[n]``; sign_*: {0, 1}
    ``[n]``. Returns ``{vol_r2, sign_acc, sign_auc, n_train, n_test, ridge_lambda,
    logistic_lambda}`` (None where undefined, e.g. too few windows).
    """
    out: dict[str, Any] = {"n_train": len(vol_train), "n_test": len(vol_test)}
    if len(vol_train) < 10 or len(vol_test) < 2:
        return out | {"vol_r2": None, "sign_acc": None, "sign_auc": None}
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    ridge_lambda = _choose_lambda(x_train, vol_train, classify=False)
    logistic_lambda = _choose_lambda(x_train, sign_train, classify=True)
    z_train, z_test = standardize(x_train, x_test)
    w, b = ridge_fit(z_train, vol_train, ridge_lambda)
    vol_r2 = r2_score(vol_test, z_test @ w + b)
    w, b = logistic_fit(z_train, sign_train.astype(np.float64), logistic_lambda)
    scores = z_test @ w + b
    sign_acc = float(((scores > 0).astype(np.int64) == sign_test).mean())
    sign_auc = roc_auc(scores, sign_test)
    return out | {
        "vol_r2": vol_r2 if np.isfinite(vol_r2) else None,
        "sign_acc": sign_acc,
        "sign_auc": sign_auc if np.isfinite(sign_auc) else None,
        "ridge_lambda": ridge_lambda,
        "logistic_lambda": logistic_lambda,
    }
