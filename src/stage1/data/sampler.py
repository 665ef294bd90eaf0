"""MultiTFWindowSampler: leak-free multi-timeframe windows over int64 nanosecond times.

A window is anchored at the close time of a base (finest) timeframe bar. For every timeframe it
holds the ``seq_len`` newest bars that are complete at the anchor (``open + duration <= anchor``),
so no bar that closes after the anchor can enter any window. The sampler stores only the row of
each timeframe's newest bar per window (``end_rows``) plus the bars themselves as arrays; windows
are gathered on demand, a whole batch at a time.

Several instruments share one sampler: per timeframe their bars are concatenated in blocks (one
row space per timeframe, :class:`BarBlocks`), and every window's rows lie inside its own
instrument's block, so windows never mix instruments and ``gather`` does not care. Windows are
ordered by instrument, then by anchor time. The arrays may be memory-mapped ``.npy`` files (see
``stage1.data.instruments.load_bar_blocks``); the index is then written to its memory-mapped
cache file as it is built, so nothing proportional to the data is held in anonymous memory.

The bar arrays (:class:`BarBlocks` and their helpers) live in :mod:`stage1.data.bar_blocks`, the
train / val / test splits in :mod:`stage1.data.splits`; their public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from stage1.data.bar_blocks import (
    OHLC_COLUMNS,
    BarBlocks,
    FloatArray,
    IntArray,
    _newest_complete,
    _ohlc,
    _open_ns,
)

# Re-exported: the splits over a sampler's windows are imported from here too.
from stage1.data.splits import chronological_splits as chronological_splits
from stage1.data.splits import split_cut_times as split_cut_times
from stage1.data.timeframes import sort_timeframes, tf_minutes, tf_ns
from stage1.errors import DataValidationError
from stage1.utils import atomic_path

# Bump when the cached index's layout or meaning changes, so old cache files are never read.
CACHE_FORMAT_VERSION = 2
# Windows per step of the chunked passes over all windows (bounds their temporaries).
CHUNK_WINDOWS = 1 << 20


def _allocate_in_memory(shape: tuple[int, ...]) -> IntArray:
    return np.empty(shape, dtype=np.int64, order="F")


class MultiTFWindowSampler:
    """Index of every valid multi-timeframe window; gathers windows as arrays or DataFrames.

    ``tf_data`` maps timeframe names (``m1``, ``h4``, ...) to frames indexed by bar open time
    with columns ``open, high, low, close``. Timeframes are ordered finest → coarsest; the finest
    is the base. A window anchored at base bar ``i`` (anchor = its close time) is valid iff every
    timeframe has ``seq_len`` complete bars at the anchor and its newest complete bar closed no
    earlier than ``staleness_factor`` bar durations before the anchor (so windows right after a
    weekend stay invalid until each timeframe has a fresh bar again). Several instruments:
    :meth:`from_blocks`.

    With ``cache_dir`` the index is stored there under a blake2b key of every timeframe's open
    times (the index depends on nothing else in the data; or the blocks' ``content_key``),
    ``seq_len``, ``staleness_factor``, the timeframes, the instruments' blocks and a format
    version; a corrupt cache file is rebuilt with a warning.

    Attributes: ``timeframes``, ``base_tf``, ``seq_len``, ``instruments`` (names),
    ``end_rows`` int64 ``[n_windows, n_tf]`` (global row of each timeframe's newest bar),
    ``anchor_ns`` int64 ``[n_windows]``, ``window_starts`` int64 ``[n_instruments + 1]``
    (instrument ``i``'s windows are ids ``window_starts[i]`` to ``window_starts[i + 1]``),
    ``instrument_of(ids)`` (instrument of windows), ``_open_ns[k]`` / ``_ohlc[k]`` (the bars).
    """

    def __init__(
        self,
        tf_data: Mapping[str, pd.DataFrame],
        seq_len: int,
        staleness_factor: float = 1.0,
        cache_dir: str | Path | None = None,
        instrument: str = "",
    ) -> None:
        if not tf_data:
            raise DataValidationError("tf_data: no timeframes given")
        timeframes = sort_timeframes(list(tf_data))
        open_ns, ohlc = [], []
        for tf in timeframes:
            times = _open_ns(tf_data[tf], tf)
            steps = np.diff(times)
            if steps.size and steps.min() <= 0:
                row = int(np.argmax(steps <= 0)) + 1
                raise DataValidationError(
                    f"{tf}: row {row}: open times must be strictly increasing"
                )
            open_ns.append(times)
            ohlc.append(_ohlc(tf_data[tf], tf))
        starts = np.array([[0] * len(timeframes), [len(t) for t in open_ns]], dtype=np.int64)
        blocks = BarBlocks(timeframes, open_ns, ohlc, [instrument], starts)
        self._setup(blocks, seq_len, staleness_factor, cache_dir)

    @classmethod
    def from_blocks(
        cls,
        blocks: BarBlocks,
        seq_len: int,
        staleness_factor: float = 1.0,
        cache_dir: str | Path | None = None,
    ) -> MultiTFWindowSampler:
        """The sampler over the instruments of ``blocks`` (bars already validated)."""
        sampler = cls.__new__(cls)
        sampler._setup(blocks, seq_len, staleness_factor, cache_dir)
        return sampler

    def _setup(
        self,
        blocks: BarBlocks,
        seq_len: int,
        staleness_factor: float,
        cache_dir: str | Path | None,
    ) -> None:
        if seq_len < 1:
            raise DataValidationError(f"seq_len: must be >= 1, got {seq_len}")
        if staleness_factor <= 0:
            raise DataValidationError(f"staleness_factor: must be > 0, got {staleness_factor}")
        self.timeframes: list[str] = list(blocks.timeframes)
        self.base_tf: str = self.timeframes[0]
        self.seq_len = seq_len
        self.staleness_factor = float(staleness_factor)
        self.instruments: list[str] = list(blocks.instruments)
        self._blocks = blocks
        self._open_ns: list[IntArray] = blocks.open_ns
        self._ohlc: list[FloatArray] = blocks.ohlc
        for i, name in enumerate(self.instruments):
            for k, tf in enumerate(self.timeframes):
                rows = blocks.starts[i + 1, k] - blocks.starts[i, k]
                if rows < seq_len:
                    where = f"instrument {name}: {tf}" if name else tf
                    raise DataValidationError(
                        f"{where}: only {rows} bars, seq_len={seq_len} needs {seq_len}"
                    )
        self._offsets = np.arange(seq_len - 1, -1, -1, dtype=np.int64)  # oldest → newest
        self.cache_path: Path | None = None
        if cache_dir is None:
            self.end_rows = self._build_index(_allocate_in_memory)
            self.anchor_ns: IntArray = self._anchors(
                self.end_rows, np.empty(len(self.end_rows), np.int64)
            )
        else:
            self.cache_path = Path(cache_dir) / f"windows_{self._cache_key()}.npy"
            self.end_rows, self.anchor_ns = self._load_or_build(self.cache_path)
        base_rows = self.end_rows[:, 0]  # increasing: blocks in order, anchors in order
        self.window_starts: IntArray = np.searchsorted(base_rows, blocks.starts[:, 0]).astype(
            np.int64
        )

    # ----------------------------------------------------------------------------- index
    def _block_ends(self, i: int) -> tuple[npt.NDArray[np.bool_], list[npt.NDArray[np.int32]]]:
        """Instrument ``i``'s windows: valid flag per base bar, and each coarser timeframe's
        newest complete row per base bar (block-local)."""
        blocks, length = self._blocks, self.seq_len
        base = np.asarray(self._open_ns[0][blocks.rows(i, 0)])
        anchors = base + tf_ns(self.base_tf)
        valid = np.ones(len(anchors), dtype=bool)
        valid[: length - 1] = False
        ends: list[npt.NDArray[np.int32]] = []
        rejected = [f"{min(length - 1, len(anchors))} lack {length} {self.base_tf} bars of history"]
        for k, tf in enumerate(self.timeframes[1:], start=1):
            duration = tf_ns(tf)
            close_ns = np.asarray(self._open_ns[k][blocks.rows(i, k)]) + duration
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
        if not valid.any():
            reasons = "; ".join(r for r in rejected if not r.startswith("0 "))
            name = self.instruments[i]
            raise DataValidationError(
                f"{f'instrument {name}: ' if name else ''}0 valid windows out of "
                f"{len(anchors)} {self.base_tf} anchors: {reasons}"
            )
        return valid, ends

    def _build_index(self, allocate: Callable[[tuple[int, ...]], IntArray]) -> IntArray:
        """end_rows ``[n_windows, n_tf]``: global row of each timeframe's newest complete bar,
        in an array from ``allocate`` (RAM, or the cache file being written). Two passes over
        the instruments (count, then fill) keep the temporaries to one instrument's size."""
        n_blocks = len(self.instruments)
        valid = [self._block_ends(i)[0] for i in range(n_blocks)] if n_blocks > 1 else []
        counts = [int(v.sum()) for v in valid]
        first = 0
        end_rows: IntArray | None = None
        for i in range(n_blocks):
            valid_i, ends = self._block_ends(i)
            if end_rows is None:
                total = sum(counts) if counts else int(valid_i.sum())
                # Column-major: each timeframe's column is written (and cached) contiguously.
                end_rows = allocate((total, len(self.timeframes)))
            keep = np.flatnonzero(valid_i)
            out = slice(first, first + len(keep))
            end_rows[out, 0] = keep + self._blocks.starts[i, 0]  # base bar of anchor j is row j
            for k, end in enumerate(ends, start=1):
                end_rows[out, k] = end[keep] + self._blocks.starts[i, k]
            first += len(keep)
        assert end_rows is not None
        return end_rows

    def _anchors(self, end_rows: IntArray, out: IntArray) -> IntArray:
        """Anchor time of every window into ``out`` (chunked: no full-size temporaries)."""
        base_ns = tf_ns(self.base_tf)
        for start in range(0, len(end_rows), CHUNK_WINDOWS):
            rows = np.asarray(end_rows[start : start + CHUNK_WINDOWS, 0])
            out[start : start + len(rows)] = np.take(self._open_ns[0], rows) + base_ns
        return out

    def _cache_key(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        params = (
            f"v{CACHE_FORMAT_VERSION}|{self.seq_len}|{self.staleness_factor!r}|{self.timeframes}"
            f"|{self.instruments}|{self._blocks.starts.tolist()}"
        )
        digest.update(params.encode())
        if self._blocks.content_key is not None:
            digest.update(f"|bars:{self._blocks.content_key}".encode())
            return digest.hexdigest()
        for tf, open_ns in zip(self.timeframes, self._open_ns, strict=True):
            digest.update(f"|{tf}:{len(open_ns)}|".encode())
            digest.update(np.ascontiguousarray(open_ns).data)
        return digest.hexdigest()

    def _load_or_build(self, path: Path) -> tuple[IntArray, IntArray]:
        """The cache file holds ``[n_windows, n_tf + 1]`` int64, column-major: the end rows of
        every timeframe, then the anchor times (so both come back memory-mapped)."""
        if path.is_file():
            try:
                # Memory-mapped: no copy; pages are read on first use (written atomically, so
                # the file never changes under the mapping).
                return self._checked_cache(np.load(path, mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError, EOFError) as exc:
                warnings.warn(
                    f"sampler cache {path} is unreadable ({exc}); rebuilding it", stacklevel=3
                )
        n_tf = len(self.timeframes)
        # Built straight into the temporary cache file, then renamed into place.
        with atomic_path(path) as tmp:
            table: np.memmap | None = None

            def allocate(shape: tuple[int, ...]) -> IntArray:
                nonlocal table
                table = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.int64, shape=(shape[0], n_tf + 1), fortran_order=True
                )
                return table[:, :n_tf]

            end_rows = self._build_index(allocate)
            assert table is not None
            self._anchors(end_rows, table[:, n_tf])
            table.flush()
            del table, end_rows
        return self._checked_cache(np.load(path, mmap_mode="r", allow_pickle=False))

    def _checked_cache(self, table: np.ndarray) -> tuple[IntArray, IntArray]:
        """Reject a cache file whose content cannot be this data's index (cheaply: rows grow
        with the anchor, so the first and last window bound every row)."""
        n_tf = len(self.timeframes)
        n_rows = np.array([len(o) for o in self._open_ns])
        if table.ndim != 2 or table.shape[1] != n_tf + 1 or table.shape[0] == 0:
            raise ValueError(f"content does not fit the data (shape {table.shape})")
        end_rows, anchors = table[:, :n_tf], table[:, n_tf]
        if (
            table.dtype != np.int64
            or (end_rows[0] < self.seq_len - 1).any()
            or (end_rows[-1] >= n_rows).any()
            or anchors[-1] != self._open_ns[0][end_rows[-1, 0]] + tf_ns(self.base_tf)
        ):
            raise ValueError(f"content does not fit the data (shape {table.shape})")
        return end_rows, anchors

    # ----------------------------------------------------------------------------- instruments
    def instrument_of(self, window_ids: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Instrument index of each of ``window_ids``."""
        ids = np.asarray(window_ids, dtype=np.int64)
        return np.searchsorted(self.window_starts, ids, side="right").astype(np.int64) - 1

    def parent_rows(self) -> list[npt.NDArray[np.int32]] | None:
        """Each bar's row in the next coarser timeframe when the timeframes nest, else None
        (:meth:`BarBlocks.parent_rows`; ~0.3 s per 3 M base bars, not kept: the batch
        builder keeps its own table of them)."""
        return self._blocks.parent_rows()

    @property
    def block_starts(self) -> IntArray:
        """``[n_instruments + 1, n_tf]``: instrument ``i``'s rows of timeframe ``k`` are
        ``block_starts[i, k]`` to ``block_starts[i + 1, k]``."""
        return self._blocks.starts

    def base_block_end(self, window_ids: npt.ArrayLike) -> IntArray:
        """End (exclusive) of each window's instrument block in the base timeframe's rows: the
        rows from there on belong to the next instrument (what comes after an anchor stops
        there)."""
        return self._blocks.starts[self.instrument_of(window_ids) + 1, 0]

    def timeframe_bars(self, k: int) -> tuple[IntArray, FloatArray]:
        """Timeframe ``k``'s bars over all instruments: open times ``[rows]``, OHLC
        ``[rows, 4]`` (memory-mapped when the bars come from the cache)."""
        return self._open_ns[k], self._ohlc[k]

    def instrument_windows(self, i: int) -> slice:
        """Window ids of instrument ``i`` (contiguous, in anchor order)."""
        return slice(int(self.window_starts[i]), int(self.window_starts[i + 1]))

    # ----------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.end_rows)

    @property
    def anchor_times(self) -> pd.DatetimeIndex:
        """Anchor (window end) times, ``datetime64[ns, UTC]``, shape ``[n_windows]``."""
        return pd.DatetimeIndex(self.anchor_ns.view("datetime64[ns]")).tz_localize("UTC")

    def first_open_ns(self, window_ids: npt.ArrayLike | None = None) -> IntArray:
        """Open time of each window's oldest bar over all timeframes, int64 ``[n]``."""
        ids = np.arange(len(self)) if window_ids is None else np.asarray(window_ids)
        oldest = self.seq_len - 1
        first = np.empty(len(ids), dtype=np.int64)
        for start in range(0, len(ids), CHUNK_WINDOWS):
            rows = self.end_rows[ids[start : start + CHUNK_WINDOWS]]
            chunk = first[start : start + len(rows)]
            np.take(self._open_ns[0], rows[:, 0] - oldest, out=chunk)
            for k in range(1, len(self.timeframes)):
                np.minimum(chunk, np.take(self._open_ns[k], rows[:, k] - oldest), out=chunk)
        return first

    def period_ns(self, window_ids: npt.ArrayLike) -> tuple[int, int]:
        """``(oldest bar open, newest anchor)`` over ``window_ids`` (UTC ns). Increasing ids
        (a split) need only each instrument's first and last window (oldest open and anchor
        grow with the id inside an instrument); any others are scanned in chunks."""
        ids = np.asarray(window_ids)
        if len(ids) > 1 and bool(np.all(ids[1:] > ids[:-1])):
            bounds = np.searchsorted(ids, self.window_starts)
            ends = [(lo, hi) for lo, hi in itertools.pairwise(bounds.tolist()) if hi > lo]
            ids = np.array([ids[i] for lo, hi in ends for i in (lo, hi - 1)], dtype=np.int64)
        oldest, newest = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        for start in range(0, len(ids), CHUNK_WINDOWS):
            chunk = ids[start : start + CHUNK_WINDOWS]
            oldest = min(oldest, int(self.first_open_ns(chunk).min()))
            newest = max(newest, int(np.take(self.anchor_ns, chunk).max()))
        return oldest, newest

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
