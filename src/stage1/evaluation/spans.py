"""Hidden spans and the classes of hidden bars that the metrics report separately.

* ``interior`` / ``right_edge`` (all timeframes): is anything visible after the bar?
  (:func:`span_class_masks`);
* ``covered`` / ``uncovered`` (coarser timeframes only): does a visible finer bar lie inside the
  bar's period? (:func:`coverage_class_masks`; the base timeframe has no finer one).

masks: bool ``[N, n_tf, L]``, True = hidden; times: bar open times, int64 ns ``[N, n_tf, L]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stage1.data.timeframes import tf_ns

SPAN_CLASSES = ("interior", "right_edge")
COVERAGE_CLASSES = ("covered", "uncovered")


def find_spans(mask_row: np.ndarray) -> list[tuple[int, int]]:
    """Hidden spans of one mask row as ``(start, stop)`` pairs, ``stop`` exclusive.

    mask_row: bool ``[L]``, True = hidden.
    """
    padded = np.concatenate([[False], np.asarray(mask_row, dtype=bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def span_class_masks(
    masks: np.ndarray, times: np.ndarray, timeframes: Sequence[str]
) -> dict[str, np.ndarray]:
    """Split hidden bars into ``right_edge`` and ``interior``, all timeframes of a window at once.

    A hidden bar is at the right edge when no visible bar of ANY timeframe closes at or after
    its close: nothing later is known, so its close is a martingale step from the last known
    price and no honest model beats "carry the last close" there. On the base timeframe these
    are exactly the spans that end at the newest bar. On a coarser timeframe a hidden newest bar
    whose close a visible finer bar gives away (a finer bar closing at the same time, or later)
    counts as interior: it is bridged, not extrapolated.

    masks: bool ``[N, n_tf, L]``; times: bar open times, int64 ns ``[N, n_tf, L]``.
    Returns ``{'interior', 'right_edge'}``, each bool ``[N, n_tf, L]``.
    """
    durations = np.array([tf_ns(tf) for tf in timeframes], dtype=np.int64)
    closes = times + durations[None, :, None]
    last_visible_close = np.where(masks, np.iinfo(np.int64).min, closes).max(axis=(1, 2))
    right_edge = masks & (closes > last_visible_close[:, None, None])
    return {"interior": masks & ~right_edge, "right_edge": right_edge}


def freshest_visible_close(
    close: np.ndarray, masks: np.ndarray, times: np.ndarray, timeframes: Sequence[str]
) -> np.ndarray:
    """The last known price of each window: the close of the visible bar, over all timeframes,
    that closes last. The best guess for any close after it (a martingale step).

    close: raw close ``[N, n_tf, L]``; masks, times: ``[N, n_tf, L]``. Returns ``[N]``.
    """
    durations = np.array([tf_ns(tf) for tf in timeframes], dtype=np.int64)
    close_times = np.where(masks, np.iinfo(np.int64).min, times + durations[None, :, None])
    newest = close_times.reshape(len(close), -1).argmax(axis=1)
    return close.reshape(len(close), -1)[np.arange(len(close)), newest]


def count_spans(masks: np.ndarray) -> int:
    """Number of hidden spans in ``masks`` (bool ``[..., L]``)."""
    starts = masks.copy()
    starts[..., 1:] &= ~masks[..., :-1]
    return int(starts.sum())


def coverage_class_masks(masks: np.ndarray, covered: np.ndarray) -> dict[str, np.ndarray]:
    """Split the hidden bars of every coarser timeframe into ``covered`` (at least one visible
    bar of a finer timeframe opens inside the bar's period, see :mod:`stage1.evaluation.agg`)
    and ``uncovered``. The base timeframe has neither: both are False there.

    masks, covered: bool ``[N, n_tf, L]``. Returns ``{'covered', 'uncovered'}``, each bool
    ``[N, n_tf, L]``.
    """
    coarse = np.zeros(masks.shape[1], dtype=bool)
    coarse[1:] = True
    hidden = masks & coarse[None, :, None]
    return {"covered": hidden & covered, "uncovered": hidden & ~covered}
