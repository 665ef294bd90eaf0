"""Bars as arrays: one row space per timeframe shared by several instruments (:class:`BarBlocks`).

Also the conversion of a timeframe's frame to those arrays (open times as int64 UTC nanoseconds,
OHLC as float64) and the search the window index is built from: the row of the newest bar that
is complete at each anchor. :class:`stage1.data.sampler.MultiTFWindowSampler` indexes the
windows over these arrays; ``stage1.data.instruments.load_bar_blocks`` builds them (in RAM or
memory-mapped) for several instruments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from stage1.data.timeframes import tf_ns
from stage1.errors import DataValidationError

OHLC_COLUMNS = ("open", "high", "low", "close")

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def _open_ns(df: pd.DataFrame, tf: str) -> IntArray:
    """Bar open times of ``df`` as int64 UTC nanoseconds (naive index = UTC)."""
    index = df.index
    if not isinstance(index, pd.DatetimeIndex):
        raise DataValidationError(
            f"{tf}: bars must be indexed by a DatetimeIndex of open times, got "
            f"{type(index).__name__} (load them with stage1.data.io.load_tf_data)"
        )
    index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    # pandas 3 may store microseconds; asi8 is only nanoseconds after an explicit unit change.
    return np.asarray(index.as_unit("ns").asi8, dtype=np.int64)


def _ohlc(df: pd.DataFrame, tf: str) -> FloatArray:
    missing = [c for c in OHLC_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(f"{tf}: missing column(s) {missing}; need {list(OHLC_COLUMNS)}")
    return np.ascontiguousarray(df[list(OHLC_COLUMNS)].to_numpy(dtype=np.float64))


def _newest_complete(close_ns: IntArray, anchors: IntArray) -> npt.NDArray[np.int32]:
    """Row of the newest bar with ``close <= anchor`` for every (sorted) anchor; -1 if none.

    Same as ``searchsorted(close_ns, anchors, "right") - 1``, but searches the (usually far
    fewer) bar closes among the anchors and counts them, which is several times faster.
    """
    first_anchor = np.searchsorted(anchors, close_ns, side="left")  # first anchor >= close
    closed = np.bincount(first_anchor, minlength=len(anchors) + 1)[: len(anchors)]
    # int32 halves the memory of the per-timeframe temporaries (row counts are far below 2**31).
    return np.cumsum(closed, dtype=np.int32) - 1


@dataclass
class BarBlocks:
    """Bars of one or several instruments in one row space per timeframe.

    ``open_ns[k]`` int64 ``[rows]`` and ``ohlc[k]`` float64 ``[rows, 4]`` hold timeframe ``k``'s
    bars, instrument after instrument: instrument ``i``'s block is rows ``starts[i, k]`` to
    ``starts[i + 1, k]`` (``starts`` int64 ``[n_instruments + 1, n_tf]``), open times strictly
    increasing inside a block. ``content_key``: a digest of the bars when the caller knows one
    (the bar cache's key); None: the index cache hashes the open times itself.
    """

    timeframes: list[str]
    open_ns: list[IntArray]
    ohlc: list[FloatArray]
    instruments: list[str]
    starts: IntArray
    content_key: str | None = None

    def rows(self, i: int, k: int) -> slice:
        return slice(int(self.starts[i, k]), int(self.starts[i + 1, k]))

    def parent_rows(self) -> list[npt.NDArray[np.int32]] | None:
        """Each bar's containing bar in the next coarser timeframe, when the timeframes nest:
        ``parents[k]`` int32 ``[rows of k]`` holds rows of timeframe ``k + 1``, for ``k <
        n_tf - 1``; None when they do not. They nest when, in every block, a timeframe's bars
        are disjoint (opens at least one duration apart), each lies inside one bar of the next
        coarser timeframe, and each of those holds at least one: as timeframes resampled from
        the same M1 bars on aligned boundaries do (``stage1 prepare``'s). The masks' sync then
        hides a hidden bar's parent (:class:`~stage1.data.masking.MaskingStrategy`)."""
        durations = [tf_ns(tf) for tf in self.timeframes]
        parents = [np.empty(len(times), np.int32) for times in self.open_ns[:-1]]
        for i in range(len(self.instruments)):
            opens = [np.asarray(times[self.rows(i, k)]) for k, times in enumerate(self.open_ns)]
            if any((np.diff(o) < d).any() for o, d in zip(opens, durations, strict=True)):
                return None
            for k in range(len(self.timeframes) - 1):
                fine, coarse = opens[k], opens[k + 1]
                if not len(fine) or not len(coarse):
                    return None
                parent = np.searchsorted(coarse, fine, side="right") - 1  # nondecreasing
                if parent[0] != 0 or parent[-1] != len(coarse) - 1 or (np.diff(parent) > 1).any():
                    return None  # a fine bar before every coarse one, or an empty coarse bar
                if (fine + durations[k] > coarse[parent] + durations[k + 1]).any():
                    return None  # a fine bar reaches past its coarse bar's close
                parents[k][self.rows(i, k)] = parent + self.starts[i, k + 1]
        return parents
