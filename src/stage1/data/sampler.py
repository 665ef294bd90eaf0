"""MultiTFWindowSampler: leak-free multi-timeframe windows over int64 nanosecond times.

A window is anchored at the close time of a base (finest) timeframe bar. For every timeframe it
holds the ``seq_len`` newest bars that are complete at the anchor (``open + duration <= anchor``),
so no bar that closes after the anchor can enter any window. The sampler stores only the row of
each timeframe's newest bar per window (``end_rows``) plus the bars themselves as arrays; windows
are gathered on demand, a whole batch at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from stage1.data.timeframes import sort_timeframes, tf_minutes, tf_ns
from stage1.errors import DataValidationError
from stage1.utils import atomic_path

OHLC_COLUMNS = ("open", "high", "low", "close")
# Bump when the cached index's layout or meaning changes, so old cache files are never read.
CACHE_FORMAT_VERSION = 1

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


class MultiTFWindowSampler:
    """Index of every valid multi-timeframe window; gathers windows as arrays or DataFrames.

    ``tf_data`` maps timeframe names (``m1``, ``h4``, ...) to frames indexed by bar open time
    with columns ``open, high, low, close``. Timeframes are ordered finest → coarsest; the finest
    is the base. A window anchored at base bar ``i`` (anchor = its close time) is valid iff every
    timeframe has ``seq_len`` complete bars at the anchor and its newest complete bar closed no
    earlier than ``staleness_factor`` bar durations before the anchor (so windows right after a
    weekend stay invalid until each timeframe has a fresh bar again).

    With ``cache_dir`` the index is stored there under a blake2b key of every timeframe's open
    times (the index depends on nothing else in the data), ``seq_len``, ``staleness_factor``,
    the timeframes and a format version; a corrupt cache file is rebuilt with a warning.
    """

    def __init__(
        self,
        tf_data: Mapping[str, pd.DataFrame],
        seq_len: int,
        staleness_factor: float = 1.0,
        cache_dir: str | Path | None = None,
    ) -> None:
        if not tf_data:
            raise DataValidationError("tf_data: no timeframes given")
        if seq_len < 1:
            raise DataValidationError(f"seq_len: must be >= 1, got {seq_len}")
        if staleness_factor <= 0:
            raise DataValidationError(f"staleness_factor: must be > 0, got {staleness_factor}")
        self.timeframes: list[str] = sort_timeframes(list(tf_data))
        self.base_tf: str = self.timeframes[0]
        self.seq_len = seq_len
        self.staleness_factor = float(staleness_factor)
        self._open_ns: list[IntArray] = []
        self._ohlc: list[FloatArray] = []
        for tf in self.timeframes:
            open_ns = _open_ns(tf_data[tf], tf)
            if len(open_ns) < seq_len:
                raise DataValidationError(
                    f"{tf}: only {len(open_ns)} bars, seq_len={seq_len} needs {seq_len}"
                )
            steps = np.diff(open_ns)
            if steps.size and steps.min() <= 0:
                row = int(np.argmax(steps <= 0)) + 1
                raise DataValidationError(
                    f"{tf}: row {row}: open times must be strictly increasing"
                )
            self._open_ns.append(open_ns)
            self._ohlc.append(_ohlc(tf_data[tf], tf))
        self._offsets = np.arange(seq_len - 1, -1, -1, dtype=np.int64)  # oldest → newest
        self.cache_path: Path | None = None
        if cache_dir is None:
            self.end_rows = self._build_index()
        else:
            self.cache_path = Path(cache_dir) / f"windows_{self._cache_key()}.npy"
            self.end_rows = self._load_or_build(self.cache_path)
        self.anchor_ns: IntArray = self._open_ns[0][self.end_rows[:, 0]] + tf_ns(self.base_tf)

    # ----------------------------------------------------------------------------- index
    def _build_index(self) -> IntArray:
        """end_rows ``[n_windows, n_tf]``: row of each timeframe's newest complete bar."""
        length = self.seq_len
        anchors = self._open_ns[0] + tf_ns(self.base_tf)
        valid = np.ones(len(anchors), dtype=bool)
        valid[: length - 1] = False
        ends: list[npt.NDArray[np.int32]] = []
        rejected = [f"{min(length - 1, len(anchors))} lack {length} {self.base_tf} bars of history"]
        for k, tf in enumerate(self.timeframes[1:], start=1):
            duration = tf_ns(tf)
            close_ns = self._open_ns[k] + duration
            end = _newest_complete(close_ns, anchors)
            # `end` grows with the anchor, so the anchors short of history form a prefix.
            n_short = int(np.searchsorted(anchors, close_ns[length - 1], side="left"))
            valid[:n_short] = False
            max_age = min(round(self.staleness_factor * duration), 2**62)  # int64-safe
            bound = anchors[n_short:] - max_age
            stale = close_ns[end[n_short:]] < bound
            valid[n_short:] &= ~stale
            ends.append(end)
            rejected.append(f"{n_short} lack {length} {tf} bars of history")
            rejected.append(
                f"{int(stale.sum())} have a stale {tf} bar (newest closed more than "
                f"{self.staleness_factor:g} x {tf_minutes(tf)} min before the anchor)"
            )
        keep = np.flatnonzero(valid)
        if len(keep) == 0:
            reasons = "; ".join(r for r in rejected if not r.startswith("0 "))
            raise DataValidationError(
                f"0 valid windows out of {len(anchors)} {self.base_tf} anchors: {reasons}"
            )
        # Column-major: each timeframe's column is written (and cached) contiguously.
        end_rows = np.empty((len(keep), len(self.timeframes)), dtype=np.int64, order="F")
        end_rows[:, 0] = keep  # the base bar of anchor i is row i
        for k, end in enumerate(ends, start=1):
            end_rows[:, k] = end[keep]
        return end_rows

    def _cache_key(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        params = (
            f"v{CACHE_FORMAT_VERSION}|{self.seq_len}|{self.staleness_factor!r}|{self.timeframes}"
        )
        digest.update(params.encode())
        for tf, open_ns in zip(self.timeframes, self._open_ns, strict=True):
            digest.update(f"|{tf}:{len(open_ns)}|".encode())
            digest.update(open_ns.data)
        return digest.hexdigest()

    def _load_or_build(self, path: Path) -> IntArray:
        if path.is_file():
            try:
                # Memory-mapped: no copy; pages are read on first use (written atomically, so
                # the file never changes under the mapping).
                mapped = np.load(path, mmap_mode="r", allow_pickle=False)
                return self._checked_cache(np.asarray(mapped))
            except (OSError, ValueError, EOFError) as exc:
                warnings.warn(
                    f"sampler cache {path} is unreadable ({exc}); rebuilding it", stacklevel=3
                )
        end_rows = self._build_index()
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.save(fh, end_rows)
        return end_rows

    def _checked_cache(self, end_rows: np.ndarray) -> IntArray:
        """Reject a cache file whose content cannot be this data's index (cheaply: rows grow
        with the anchor, so the first and last window bound every row)."""
        n_rows = np.array([len(o) for o in self._open_ns])
        if (
            end_rows.ndim != 2
            or end_rows.shape[1] != len(self.timeframes)
            or end_rows.shape[0] == 0
            or end_rows.dtype != np.int64
            or (end_rows[0] < self.seq_len - 1).any()
            or (end_rows[-1] >= n_rows).any()
        ):
            raise ValueError(f"content does not fit the data (shape {end_rows.shape})")
        return end_rows

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.end_rows)

    @property
    def anchor_times(self) -> pd.DatetimeIndex:
        """Anchor (window end) times, ``datetime64[ns, UTC]``, shape ``[n_windows]``."""
        return pd.DatetimeIndex(self.anchor_ns.view("datetime64[ns]")).tz_localize("UTC")

    def first_open_ns(self, window_ids: npt.ArrayLike | None = None) -> IntArray:
        """Open time of each window's oldest bar over all timeframes, int64 ``[n]``."""
        rows = self.end_rows if window_ids is None else self.end_rows[np.asarray(window_ids)]
        oldest = self.seq_len - 1
        first = np.take(self._open_ns[0], rows[:, 0] - oldest)
        for k in range(1, len(self.timeframes)):
            np.minimum(first, np.take(self._open_ns[k], rows[:, k] - oldest), out=first)
        return first

    def gather(self, window_ids: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
        """Raw bars of a batch of windows, oldest → newest along the last time axis.

        Returns ``ohlc`` float64 ``[B, n_tf, seq_len, 4]`` and open ``times`` int64
        ``[B, n_tf, seq_len]`` (UTC ns).
        """
        ids = np.asarray(window_ids, dtype=np.int64)
        rows = self.end_rows[ids]  # [B, n_tf]
        n_tf, length = len(self.timeframes), self.seq_len
        ohlc = np.empty((len(ids), n_tf, length, 4), dtype=np.float64)
        times = np.empty((len(ids), n_tf, length), dtype=np.int64)
        for k in range(n_tf):
            idx = rows[:, k, None] - self._offsets  # [B, L]
            # np.take is several times faster than fancy indexing for row gathers.
            ohlc[:, k] = np.take(self._ohlc[k], idx, axis=0)
            times[:, k] = np.take(self._open_ns[k], idx)
        return ohlc, times

    def get_window(self, i: int) -> dict[str, pd.DataFrame]:
        """Window ``i`` as ``{tf: DataFrame of seq_len bars indexed by open time (UTC)}``."""
        ohlc, times = self.gather([i])
        window = {}
        for k, tf in enumerate(self.timeframes):
            index = pd.DatetimeIndex(times[0, k].view("datetime64[ns]"), name="timestamp")
            window[tf] = pd.DataFrame(
                ohlc[0, k], index=index.tz_localize("UTC"), columns=list(OHLC_COLUMNS)
            )
        return window


def chronological_splits(
    sampler: MultiTFWindowSampler, train_frac: float, val_frac: float, embargo_ns: int
) -> dict[str, IntArray]:
    """Window ids of ``train``, ``val`` and ``test``, cut by anchor time with an embargo.

    Windows are cut in anchor order into fractions ``train_frac``, ``val_frac`` and the rest. A
    val window is kept only if its oldest bar (over ALL timeframes) opens at or after the last
    train anchor + ``embargo_ns``; likewise a test window against the last anchor of the val cut
    (or of train when ``val_frac`` is 0). Rows of every timeframe used by different splits are
    then checked to be disjoint (raises ``AssertionError`` otherwise, which would be a bug).
    """
    n = len(sampler)
    n_train = int(n * train_frac)
    n_val = int(n * val_frac)
    if n_train == 0:
        raise DataValidationError(
            f"train split: {n} windows x train_frac={train_frac} leaves no train window"
        )
    first_open = sampler.first_open_ns()
    ids = np.arange(n, dtype=np.int64)
    cuts = {"train": ids[:n_train], "val": ids[n_train : n_train + n_val]}
    cuts["test"] = ids[n_train + n_val :]
    splits = {"train": cuts["train"]}
    previous_end = int(sampler.anchor_ns[n_train - 1])
    for name in ("val", "test"):
        cut = cuts[name]
        splits[name] = cut[first_open[cut] >= previous_end + embargo_ns]
        if len(cut) and len(splits[name]) == 0:
            raise DataValidationError(
                f"{name} split: all {len(cut)} windows start within the embargo of "
                f"{embargo_ns / 60e9:g} min after the previous split; use more data or a "
                "smaller seq_len / data.embargo_minutes"
            )
        if len(cut):
            previous_end = int(sampler.anchor_ns[cut[-1]])
    _assert_no_shared_bars(sampler, splits)
    return splits


def _assert_no_shared_bars(sampler: MultiTFWindowSampler, splits: dict[str, IntArray]) -> None:
    """Every timeframe's row ranges of consecutive splits must not overlap."""
    order = [name for name in ("train", "val", "test") if len(splits[name])]
    for earlier, later in itertools.pairwise(order):
        last_row = sampler.end_rows[splits[earlier]].max(axis=0)
        first_row = sampler.end_rows[splits[later]].min(axis=0) - (sampler.seq_len - 1)
        shared = last_row >= first_row
        if shared.any():
            tfs = [tf for tf, s in zip(sampler.timeframes, shared, strict=True) if s]
            raise AssertionError(f"splits {earlier} and {later} share bars of {tfs}")
