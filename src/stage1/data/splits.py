"""Chronological train / val / test splits of a :class:`MultiTFWindowSampler`'s windows.

The cut times are anchor times shared by every instrument (:func:`split_cut_times`); the windows
after a cut are kept only once their oldest bar opens an embargo after it
(:func:`chronological_splits`), and the splits are checked to share no bar
(:func:`_assert_no_shared_bars`). Also importable from :mod:`stage1.data.sampler`.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from stage1.data.bar_blocks import IntArray
from stage1.errors import DataValidationError

if TYPE_CHECKING:
    from stage1.data.sampler import MultiTFWindowSampler


def _kth_anchor(sampler: MultiTFWindowSampler, k: int) -> int:
    """The ``k``-th smallest anchor time (1-based) over the windows of every instrument, found
    by bisecting on time (each instrument's anchors are sorted), without sorting them all."""
    blocks = [
        sampler.anchor_ns[sampler.instrument_windows(i)] for i in range(len(sampler.instruments))
    ]
    if len(blocks) == 1:
        return int(blocks[0][k - 1])
    low = min(int(b[0]) for b in blocks if len(b))
    high = max(int(b[-1]) for b in blocks if len(b))
    while low < high:  # smallest t with count(anchor <= t) >= k: an anchor itself
        mid = low + (high - low) // 2
        if sum(int(np.searchsorted(b, mid, side="right")) for b in blocks) >= k:
            high = mid
        else:
            low = mid + 1
    return low


def _first_opening_at(sampler: MultiTFWindowSampler, lo: int, hi: int, bound_ns: int) -> int:
    """The first window id in ``[lo, hi)`` (one instrument's) whose oldest bar opens at or after
    ``bound_ns``, else ``hi``. Inside an instrument every timeframe's end row grows with the
    window id, so the oldest open does too: bisection finds it."""
    while lo < hi:
        mid = (lo + hi) // 2
        if sampler.first_open_ns([mid])[0] >= bound_ns:
            hi = mid
        else:
            lo = mid + 1
    return lo


def split_cut_times(
    sampler: MultiTFWindowSampler, train_frac: float, val_frac: float
) -> tuple[int, int]:
    """``(train_end, val_end)``: the anchor times (UTC ns) that close the train and the val cut,
    the same calendar times for every instrument. Train takes the windows anchored at or before
    ``train_end`` (the ``train_frac`` share of all windows, pooled over instruments), val those
    after it up to ``val_end`` (``val_end == train_end`` when val is empty), test the rest."""
    n = len(sampler)
    n_train, n_val = int(n * train_frac), int(n * val_frac)
    if n_train == 0:
        raise DataValidationError(
            f"train split: {n} windows x train_frac={train_frac} leaves no train window"
        )
    train_end = _kth_anchor(sampler, n_train)
    return train_end, _kth_anchor(sampler, n_train + n_val) if n_val else train_end


def chronological_splits(
    sampler: MultiTFWindowSampler, train_frac: float, val_frac: float, embargo_ns: int
) -> dict[str, IntArray]:
    """Window ids of ``train``, ``val`` and ``test``, cut by anchor time with an embargo.

    The cut times come from :func:`split_cut_times` and are the same for every instrument
    (correlated pairs would otherwise leak across splits). A val window is kept only if its
    oldest bar (over ALL timeframes) opens at or after the train cut + ``embargo_ns``; likewise a
    test window against the val cut. Rows of every timeframe used by different splits are then
    checked to be disjoint, instrument by instrument (``AssertionError`` otherwise: a bug).
    """
    train_end, val_end = split_cut_times(sampler, train_frac, val_frac)
    parts: dict[str, list[IntArray]] = {"val": [], "test": []}
    train_ranges = []
    cut_sizes = {"val": 0, "test": 0}
    for i in range(len(sampler.instruments)):
        window = sampler.instrument_windows(i)
        anchors = sampler.anchor_ns[window]
        first, stop_train, stop_val, stop = (
            window.start,
            window.start + int(np.searchsorted(anchors, train_end, side="right")),
            window.start + int(np.searchsorted(anchors, val_end, side="right")),
            window.stop,
        )
        train_ranges.append((first, stop_train))
        for name, (lo, hi), bound in (
            ("val", (stop_train, stop_val), train_end),
            ("test", (stop_val, stop), val_end),
        ):
            cut_sizes[name] += hi - lo
            kept = _first_opening_at(sampler, lo, hi, bound + embargo_ns)
            parts[name].append(np.arange(kept, hi, dtype=np.int64))
    # Filled in place: the train ids are most of the windows (no concatenated copy).
    train = np.empty(sum(hi - lo for lo, hi in train_ranges), dtype=np.int64)
    filled = 0
    for lo, hi in train_ranges:
        train[filled : filled + hi - lo] = np.arange(lo, hi)
        filled += hi - lo
    splits = {"train": train, **{name: np.concatenate(ids) for name, ids in parts.items()}}
    for name, size in cut_sizes.items():
        if size and len(splits[name]) == 0:
            raise DataValidationError(
                f"{name} split: all {size} windows start within the embargo of "
                f"{embargo_ns / 60e9:g} min after the previous split; use more data or a "
                "smaller seq_len / data.embargo_minutes"
            )
    _assert_no_shared_bars(sampler, splits)
    return splits


def _assert_no_shared_bars(sampler: MultiTFWindowSampler, splits: dict[str, IntArray]) -> None:
    """Per instrument, every timeframe's row ranges of consecutive splits must not overlap.

    A split's ids are increasing and an instrument's end rows grow with the window id (the
    index is built in anchor order), so a split's rows within an instrument span from its first
    window's oldest row to its last window's newest row."""
    order = [name for name in ("train", "val", "test") if len(splits[name])]
    for i, instrument in enumerate(sampler.instruments):
        spans = {}
        for name in order:
            lo, hi = np.searchsorted(splits[name], sampler.window_starts[i : i + 2])
            if hi > lo:
                ids = splits[name][lo:hi]
                spans[name] = (
                    sampler.end_rows[ids[0]] - (sampler.seq_len - 1),
                    sampler.end_rows[ids[-1]],
                )
        names = list(spans)
        for earlier, later in itertools.pairwise(names):
            shared = spans[earlier][1] >= spans[later][0]
            if shared.any():
                tfs = [tf for tf, s in zip(sampler.timeframes, shared, strict=True) if s]
                where = f" of instrument {instrument}" if instrument else ""
                raise AssertionError(f"splits {earlier} and {later} share bars{where} of {tfs}")
