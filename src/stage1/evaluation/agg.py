"""The cross-timeframe baseline ``agg``: hidden coarse bars rebuilt from the visible finer bars.

With synchronised masks, hiding a base span hides the coarse bars that overlap it, but the finer
bars around the span stay visible and give most of those coarse bars' OHLC away. A coarse
timeframe's own baselines cannot read them, a model can; ``agg`` is the naive rule that does, so
aggregation earns the model no credit.

Rule, for a hidden bar of timeframe ``k`` with period ``P = [open, open + duration_k)`` (a finer
bar is *inside* ``P`` when its open lies in ``P``; timeframes nest, so it also closes in ``P``):

1. *Covered* bars have at least one VISIBLE bar of some finer timeframe inside ``P``; the others
   are *uncovered* and get the ``bridge`` of timeframe ``k``.
2. The *source* is the finest finer timeframe that has a visible bar inside ``P`` and whose
   window starts at or before ``P``'s open (so it holds every one of its bars inside ``P``);
   if none does, the finest finer timeframe with a visible bar inside ``P``.
3. The source's *composite* bars inside ``P`` (truth where visible, the source timeframe's own
   ``bridge`` where hidden; the bridge reads visible bars only) are aggregated: open of the
   first, max high, min low, close of the last.
4. When the source's window starts after ``P``'s open, ``[open, first source bar)`` is not
   covered and is completed by the bridge of timeframe ``k``: the open is that bridge's open,
   the high ``max(aggregated high, bridge high)``, the low ``min(aggregated low, bridge low)``.
5. ``delta_close`` and ``body_ratio`` are derived from the guessed OHLC as for every baseline.

So ``agg`` reads visible bars only, and equals the true OHLC of a hidden coarse bar whose bars of
the source timeframe are all visible. The base timeframe has no finer timeframe: no ``agg``.
Every window's timeframes hold their newest bars complete at one anchor, so a finer window always
reaches the close of a coarse bar; only its start can fall inside one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stage1.data.features import CLOSE, HIGH, LOW, OPEN
from stage1.data.timeframes import tf_ns
from stage1.evaluation.baselines import _derive_delta_and_body, baseline_bridge


def baseline_agg(
    values: np.ndarray,
    masks: np.ndarray,
    times: np.ndarray,
    timeframes: Sequence[str],
    bridges: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``agg`` guess of every timeframe and which hidden bars are covered.

    values: raw features ``[N, n_tf, L, 6]``; masks: bool ``[N, n_tf, L]`` (True = hidden);
    times: bar open times, int64 ns ``[N, n_tf, L]``; timeframes: finest first; bridges: the
    ``bridge`` guess of each timeframe ``[N, n_tf, L, 6]`` (computed when not given). Returns ``(guess [N, n_tf, L, 6],
    covered bool [N, n_tf, L])``: the guess equals ``values`` at visible bars and the bridge on
    the base timeframe and on uncovered bars; ``covered`` is False on the base timeframe.
    """
    if bridges is None:
        bridges = np.stack(
            [baseline_bridge(values[:, k], masks[:, k]) for k in range(len(timeframes))], axis=1
        )
    guess = bridges.copy()
    covered = np.zeros(masks.shape, dtype=bool)
    visible_before = np.concatenate(
        [np.zeros((*masks.shape[:2], 1), dtype=np.int64), np.cumsum(~masks, axis=2)], axis=2
    )  # visible bars before each position: [N, n_tf, L + 1]
    positions = np.arange(masks.shape[2])
    for k in range(1, len(timeframes)):
        rows, cols = np.nonzero(masks[:, k])
        if rows.size == 0:
            continue
        start = times[rows, k, cols]
        end = start + tf_ns(timeframes[k])
        # Per hidden bar and finer timeframe: bars inside P are positions [lo, hi).
        finer_open = times[rows, :k]  # [M, k, L]
        lo = (finer_open < start[:, None, None]).sum(axis=2)
        hi = (finer_open < end[:, None, None]).sum(axis=2)
        tf_index = np.arange(k)[None, :]
        n_visible = (
            visible_before[rows[:, None], tf_index, hi]
            - visible_before[rows[:, None], tf_index, lo]
        )  # [M, k]
        has_visible = n_visible > 0
        spans_start = has_visible & (finer_open[..., 0] <= start[:, None])
        # First True along the (finest first) timeframe axis; argmax of all-False rows is 0.
        source = np.where(
            spans_start.any(axis=1), spans_start.argmax(axis=1), has_visible.argmax(axis=1)
        )
        is_covered = has_visible.any(axis=1)
        pick = np.arange(rows.size)
        lo_s, hi_s = lo[pick, source], hi[pick, source]
        # The source's composite is its bridge guess (truth where visible).
        inside = (positions[None, :] >= lo_s[:, None]) & (positions[None, :] < hi_s[:, None])
        first, last = np.clip(lo_s, 0, positions.size - 1), np.clip(hi_s - 1, 0, None)
        agg_open = bridges[rows, source, first, OPEN]
        agg_close = bridges[rows, source, last, CLOSE]
        agg_high = np.where(inside, bridges[rows, source, :, HIGH], -np.inf).max(axis=1)
        agg_low = np.where(inside, bridges[rows, source, :, LOW], np.inf).min(axis=1)
        bridge = bridges[rows, k, cols]  # [M, 6]
        partial = ~spans_start[pick, source]
        agg_open = np.where(partial, bridge[:, OPEN], agg_open)
        agg_high = np.where(partial, np.maximum(agg_high, bridge[:, HIGH]), agg_high)
        agg_low = np.where(partial, np.minimum(agg_low, bridge[:, LOW]), agg_low)
        aggregated = {OPEN: agg_open, HIGH: agg_high, LOW: agg_low, CLOSE: agg_close}
        for feature, value in aggregated.items():
            guess[rows, k, cols, feature] = np.where(is_covered, value, bridge[:, feature])
        covered[rows, k, cols] = is_covered
        guess[:, k] = _derive_delta_and_body(guess[:, k], masks[:, k])
    return guess, covered
