"""Naive baselines for masked reconstruction (SPEC §6): ``last``, ``interp`` and ``bridge``
(and the names of all four; the cross-timeframe ``agg`` lives in :mod:`stage1.evaluation.agg`).

All functions here work on ONE timeframe at a time, in RAW feature space (log price relative to the
window's reference price, as produced by ``FeatureEngineer`` before normalisation):

* ``values``: float ``[N, L, 6]`` with features ``open, high, low, close, delta_close, body_ratio``;
* ``masks``: bool ``[N, L]``, True = hidden.

They return a full ``[N, L, 6]`` array equal to ``values`` at visible positions and to the
baseline's guess at hidden positions, so a caller can score hidden positions and build composite
series (truth where visible, guess where hidden). A baseline only ever reads visible values.

A hidden *span* is a maximal run of hidden positions. Its neighbours are the last visible bar
before it (``prev``) and the first visible bar after it (``next``) in the same timeframe. A span
with no ``next`` ends at the newest bar of its timeframe and is extrapolated (carried forward); a
span with no ``prev`` starts at position 0 (possible on coarse timeframes only: the base
timeframe's position 0 is never hidden).
"""

from __future__ import annotations

import numpy as np

from stage1.data.features import BODY_RATIO, CLOSE, DELTA_CLOSE, HIGH, LOW, OPEN

PRICE_FEATURES = (OPEN, HIGH, LOW, CLOSE)
SINGLE_TF_BASELINES = ("last", "interp", "bridge")
# agg needs every timeframe of a window and does not exist on the base timeframe.
BASELINE_NAMES = (*SINGLE_TF_BASELINES, "agg")


def neighbour_indices(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the last visible position at or before each position, and of the first
    visible position at or after it.

    masks: bool ``[N, L]``. Returns int64 ``(prev, next)``, each ``[N, L]``; ``prev`` is -1 where
    no visible position precedes, ``next`` is ``L`` where none follows. At a visible position both
    equal the position itself.
    """
    n_rows, seq_len = masks.shape
    positions = np.broadcast_to(np.arange(seq_len), (n_rows, seq_len))
    prev = np.maximum.accumulate(np.where(masks, -1, positions), axis=1)
    next_ = np.minimum.accumulate(np.where(masks, seq_len, positions)[:, ::-1], axis=1)[:, ::-1]
    return prev.astype(np.int64), np.ascontiguousarray(next_).astype(np.int64)


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[n, index[n, t], :]`` for every ``(n, t)``; ``index`` is clipped into range."""
    clipped = np.clip(index, 0, values.shape[1] - 1)
    return np.take_along_axis(values, clipped[..., None], axis=1)


def _derive_delta_and_body(guess: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Fill ``delta_close`` and ``body_ratio`` of hidden bars from the guessed OHLC.

    ``delta_close[t] = close[t] - close[t-1]`` uses the composite close (truth where visible);
    ``delta_close[0] = close[0] - open[0]``. ``body_ratio = (C - O) / (H - L)`` in price space, 0
    for a flat bar, clipped to [-1, 1] because independently guessed OHLC may be inconsistent.
    """
    close = guess[..., CLOSE]
    delta = np.empty_like(close)
    delta[:, 1:] = close[:, 1:] - close[:, :-1]
    delta[:, 0] = close[:, 0] - guess[:, 0, OPEN]
    prices = np.exp(guess[..., list(PRICE_FEATURES)])
    p_open, p_high, p_low, p_close = (prices[..., i] for i in range(4))
    span = p_high - p_low
    body = np.divide(p_close - p_open, span, out=np.zeros_like(span), where=span > 0)
    guess[..., DELTA_CLOSE] = np.where(masks, delta, guess[..., DELTA_CLOSE])
    guess[..., BODY_RATIO] = np.where(masks, np.clip(body, -1.0, 1.0), guess[..., BODY_RATIO])
    return guess


def baseline_last(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Each price feature of the last visible bar carried forward across the span.

    A span at position 0 takes the first visible bar after it; a row with no visible bar gets 0
    (the reference price). ``[N, L, 6]`` → ``[N, L, 6]``.
    """
    prev, next_ = neighbour_indices(masks)
    source = np.where(prev >= 0, prev, next_)
    filled = np.where((source < masks.shape[1])[..., None], _take(values, source), 0.0)
    guess = np.where(masks[..., None], filled, values)
    return _derive_delta_and_body(guess, masks)


def baseline_interp(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Linear interpolation of each price feature between the span's visible neighbours.

    Right-edge spans carry the last visible value forward (there is no right neighbour); spans at
    position 0 carry the first visible value backward. ``[N, L, 6]`` → ``[N, L, 6]``.
    """
    seq_len = masks.shape[1]
    prev, next_ = neighbour_indices(masks)
    has_prev, has_next = prev >= 0, next_ < seq_len
    left, right = _take(values, prev), _take(values, next_)
    positions = np.arange(seq_len)[None, :]
    gap = np.maximum(next_ - prev, 1)
    weight = np.where(has_prev & has_next, (positions - prev) / gap, 0.0)[..., None]
    interior = left + (right - left) * weight
    filled = np.where(has_prev[..., None], interior, np.where(has_next[..., None], right, 0.0))
    guess = np.where(masks[..., None], filled, values)
    return _derive_delta_and_body(guess, masks)


def median_wicks(values: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median upper wick ``high - max(open, close)`` and lower wick ``min(open, close) - low``
    over each row's visible bars (log units). ``[N, L, 6]`` → two ``[N]`` arrays (0 if no
    visible bar)."""
    body_top = np.maximum(values[..., OPEN], values[..., CLOSE])
    body_bottom = np.minimum(values[..., OPEN], values[..., CLOSE])
    upper = np.where(masks, np.nan, values[..., HIGH] - body_top)
    lower = np.where(masks, np.nan, body_bottom - values[..., LOW])
    any_visible: np.ndarray = np.any(~masks, axis=1)
    # nanmedian warns on all-NaN rows; those rows are replaced by 0 below.
    with np.errstate(all="ignore"):
        safe_upper = np.where(any_visible[:, None], upper, 0.0)
        safe_lower = np.where(any_visible[:, None], lower, 0.0)
        return np.nanmedian(safe_upper, axis=1), np.nanmedian(safe_lower, axis=1)


def baseline_bridge(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The bar-aware bridge of SPEC §6.

    Hidden closes run linearly from the last visible close to the OPEN of the first visible bar
    after the span (that open is within a fraction of a pip of the last hidden close), so the
    last hidden close equals that open; each hidden open is the previous close; highs and lows are
    ``max/min(open, close)`` plus/minus the median visible wick of the row. Right-edge spans carry
    the last close forward (there is no next open); spans at position 0 sit flat at the next open.
    ``[N, L, 6]`` → ``[N, L, 6]``.
    """
    seq_len = masks.shape[1]
    prev, next_ = neighbour_indices(masks)
    has_prev, has_next = prev >= 0, next_ < seq_len
    last_close = _take(values, prev)[..., CLOSE]
    next_open = _take(values, next_)[..., OPEN]
    positions = np.arange(seq_len)[None, :]
    n_hidden = np.maximum(next_ - prev - 1, 1)
    weight = np.where(has_next, (positions - prev) / n_hidden, 0.0)
    bridged = last_close + (next_open - last_close) * weight
    close = np.where(has_prev, bridged, np.where(has_next, next_open, 0.0))
    close = np.where(masks, close, values[..., CLOSE])
    # Open of a hidden bar = composite close of the bar before it; at a left-edge span the
    # bars are flat at the next open, which the close already holds.
    prev_close = np.concatenate([close[:, :1], close[:, :-1]], axis=1)
    open_ = np.where(has_prev, prev_close, close)
    upper, lower = median_wicks(values, masks)
    guess = values.copy()
    guess[..., OPEN] = np.where(masks, open_, values[..., OPEN])
    guess[..., CLOSE] = close
    top, bottom = np.maximum(open_, close), np.minimum(open_, close)
    guess[..., HIGH] = np.where(masks, top + upper[:, None], values[..., HIGH])
    guess[..., LOW] = np.where(masks, bottom - lower[:, None], values[..., LOW])
    return _derive_delta_and_body(guess, masks)


def all_baselines(values: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """``{name: guess [N, L, 6]}`` for the three single-timeframe baselines, in
    ``SINGLE_TF_BASELINES`` order."""
    return {
        "last": baseline_last(values, masks),
        "interp": baseline_interp(values, masks),
        "bridge": baseline_bridge(values, masks),
    }
