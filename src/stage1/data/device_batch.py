"""DeviceBatchBuilder: whole batches of windows built on the training device.

The sampler's bars become per-bar tables on the device once; a batch of window ids then
becomes gather → features in a few torch ops on that device, with no loop over windows and
no host round trip. Training (``Stage1DataModule``), evaluation (``Stage1Dataset.get_batch``)
and encoding (``Stage1InferenceEngine``) all build batches here. The math is
``stage1.data.features`` (``scaled_bars``, ``scaled_windows``), which
``FeatureEngineer.process_batch`` also uses for raw price windows (the guide's
``process_window``, live RL windows): one implementation, the same bits.

Why per-bar tables: every feature is a per-bar quantity except ``log(p / ref)`` (ref = open
of the base bar at position 0) and the first bar's ``delta_close`` (its own open stands in
for the previous close), and the z-score is affine. So the tables hold, per bar and in
float64, ``log p / std - mean / std`` for the four prices, the z-scores of ``delta_close``
and ``body_ratio``, and the ``delta_close`` z-score of ``log(close / open)``; a window costs
a gather and one pass, ``table - log ref / std`` rounded to float32, and no logarithm (each
M1 bar is in 48 windows). The two terms are large and nearly equal (~5 000 for a yen pair),
their float64 difference is exact to ~1e-12 z units, even for nearby prices.

Rows of several instruments may share one row space per timeframe (windows never cross an
instrument block): the only cross-row quantity, ``delta_close``, is replaced at a window's
first bar, so a block boundary never enters a window's features.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from stage1.data.features import (
    CLOSE,
    N_FEATURES,
    OPEN,
    _log,
    float64_stats,
    price_scale,
    price_window_features,
    scaled_bars,
    scaled_windows,
)
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.targets import horizon_rows, horizon_targets
from stage1.data.timeframes import tf_ns

Batch = dict[str, torch.Tensor]

# Windows per step of a batch on the CPU: ~3.5 MB of gathered float64 table rows, so a chunk's
# passes run in the cache (measured per 1 024 windows on the 2-core CPU, 1 thread: 5.5 / 5.6 /
# 5.8 ms for chunks of 128 / 256 / 512). Accelerators take the batch at once.
GATHER_CHUNK = 256

# Rows per step of building a table (bounds the float64 temporaries: ~50 MB).
TABLE_CHUNK_ROWS = 1 << 20


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array`` without a copy where possible. A read-only (memory-mapped)
    array is wrapped as is: nothing here writes to it, so torch's warning does not apply."""
    array = np.asarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _file_backed(shape: tuple[int, ...], dtype: npt.DTypeLike, directory: Path) -> torch.Tensor:
    """A zeroed CPU tensor over an unlinked temporary file in ``directory``, memory-mapped: its
    pages belong to the page cache (evictable, shared) instead of the process's anonymous
    memory, which many instruments' per-bar tables would otherwise fill."""
    fd, name = tempfile.mkstemp(prefix="stage1-batch-tables-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1))
        array = np.memmap(name, dtype=dtype, mode="r+", shape=shape)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):  # the mapping stays; Windows keeps the file
            os.unlink(name)
    return torch.from_numpy(array)


def _take_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for a ``[N]`` or ``[N, C]`` table and int64 ``rows`` of any shape."""
    if table.device.type == "cpu":
        # np.take is 2-3x faster than torch's CPU row gather (index_select / advanced indexing).
        return torch.from_numpy(np.take(table.numpy(), rows.numpy(), axis=0))
    return table[rows]


class DeviceBatchBuilder:
    """The bars of ``sampler`` on ``device``; builds normalised batches of its windows there.

    Reads the sampler's arrays (``_ohlc[k]`` float64 ``[rows, 4]``, ``_open_ns[k]`` int64
    ``[rows]``, ``end_rows`` int64 ``[n_windows, n_tf]``). All timeframes' rows are stacked
    into one row space (timeframe ``k`` starts at ``row_offsets[k]``), so a batch is one
    gather. Memory on the device: 64 bytes per bar (the table, the first-bar term, the open
    time), 4 more with ``parents`` (the parent table, on the first batch), 8 more per base bar
    (its open), on an accelerator 8 per window and timeframe (the index; the CPU reads the
    sampler's own): about 310 MB on the CPU for 3.1 M M1 rows and six timeframes. When the
    sampler's bars come from a cache (``data.cache_dir``, many instruments) these arrays are
    file-backed on the CPU, in unlinked files there (page cache, not anonymous memory).

    The table depends on the statistics: it is built on the first batch after
    ``set_normalizer`` (about 0.3 s per 4 M bars on the CPU). Without a ``normalizer``
    batches hold raw features. Raw ``features`` (``normalize=False`` or no normaliser: the
    normaliser's fit) need no table: they come from the windows' gathered prices
    (:func:`~stage1.data.features.price_window_features`, the same values).
    """

    def __init__(
        self,
        sampler: MultiTFWindowSampler,
        normalizer: TFNormalizer | None = None,
        device: str | torch.device = "cpu",
        horizons: Sequence[int] = (),
        with_parents: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.with_parents = with_parents
        self.timeframes = list(sampler.timeframes)
        self.seq_len = int(sampler.seq_len)
        self.horizons = [int(h) for h in horizons]
        self.bar_ns = tf_ns(sampler.base_tf)
        self.sampler = sampler
        self.offsets = torch.arange(self.seq_len - 1, -1, -1, device=self.device)  # old → new
        counts = [len(times) for times in sampler._open_ns]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._first_row = [int(o) for o in offsets]  # host ints: the table build reads none back
        self.row_offsets = torch.from_numpy(offsets).to(self.device)
        # With the bars memory-mapped from a cache (``data.cache_dir``), the CPU's per-bar
        # arrays are file-backed there too (see _file_backed).
        cache = sampler.cache_path
        self._spill = cache.parent if cache is not None and self.device.type == "cpu" else None
        self.open_ns = self._empty(sum(counts), torch.int64)
        for k, times in enumerate(sampler._open_ns):
            self.open_ns[self._first_row[k] : self._first_row[k] + len(times)] = _host_tensor(times)
        self.base_open = self._empty(counts[0], torch.float64)
        self.base_open.copy_(_host_tensor(sampler._ohlc[0][:, OPEN]))
        # [n_tf, n_windows]: the sampler's column-major index, transposed (a view on the CPU).
        self.end_rows = _host_tensor(sampler.end_rows.T).to(self.device).contiguous()
        # Where each instrument's windows end, and its base rows (the forecast labels' bound).
        self.window_ends = _host_tensor(sampler.window_starts[1:]).to(self.device, torch.int64)
        self.block_end = _host_tensor(sampler.block_starts[1:, 0]).to(self.device, torch.int64)
        self._base_log_close: torch.Tensor | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._parents: torch.Tensor | None = None
        self._parents_found = False  # parent_rows() asked (None: the timeframes do not nest)
        self._scratch = threading.local()  # per thread: the gathered rows of a chunk
        self.set_normalizer(normalizer)

    def set_normalizer(self, normalizer: TFNormalizer | None) -> None:
        """Use ``normalizer``'s statistics from now on (``None``: raw features); the table is
        rebuilt for them on the next batch."""
        self.normalizer = normalizer
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        if normalizer is not None:
            if list(normalizer.timeframes) != self.timeframes:
                raise ValueError(
                    f"normalizer is for timeframes {normalizer.timeframes}, the sampler has "
                    f"{self.timeframes}"
                )
            self._stats = float64_stats(normalizer.mean, normalizer.std, self.device)
        self._scale = price_scale(self._stats, len(self.timeframes), self.seq_len, self.device)
        self._tables = None

    def _empty(self, n: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A per-bar array on the device: file-backed on the CPU when the bars come from a
        cache (:func:`_file_backed`), else ordinary memory."""
        shape = (n,) if isinstance(n, int) else n
        if self._spill is not None:
            try:
                return _file_backed(shape, torch.empty(0, dtype=dtype).numpy().dtype, self._spill)
            except OSError as error:  # e.g. a read-only cache: memory, as without a cache
                warnings.warn(
                    f"{self._spill}: cannot hold the batch builder's per-bar arrays there "
                    f"({error}); keeping them in memory",
                    stacklevel=2,
                )
                self._spill = None
        return torch.empty(shape, dtype=dtype, device=self.device)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-bar table float64 ``[rows, 6]`` and first-bar term ``[rows]`` of every
        timeframe (see the module doc), built for the current statistics on first use."""
        if self._tables is None:
            table = self._empty((len(self.open_ns), N_FEATURES), torch.float64)
            first_delta = self._empty(len(self.open_ns), torch.float64)
            for k, ohlc in enumerate(self.sampler._ohlc):
                stats = (
                    None if self._stats is None else (self._stats[0][k, 0], self._stats[1][k, 0])
                )
                base = self._first_row[k]
                for start in range(0, len(ohlc), TABLE_CHUNK_ROWS):
                    # One row of overlap: a chunk's first delta_close needs the previous close.
                    lo, hi = max(start - 1, 0), min(start + TABLE_CHUNK_ROWS, len(ohlc))
                    prices = _host_tensor(ohlc[lo:hi]).to(self.device, torch.float64)
                    bars, first = scaled_bars(prices, stats)
                    rows = slice(base + start, base + hi)
                    table[rows], first_delta[rows] = bars[start - lo :], first[start - lo :]
            self._tables = table, first_delta
        return self._tables

    def future(
        self, ids: torch.Tensor, starts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels of the forecast objective for windows ``ids`` (``horizons``, see
        :mod:`stage1.data.targets`): log realised volatility float32 ``[B, H]`` of the next
        ``h`` base bars after each anchor, and whether it is defined, bool ``[B, H]``.
        ``starts``: the windows' oldest rows (:meth:`_first_rows`), when already at hand."""
        if starts is None:
            starts = self._first_rows(ids)
        if self._base_log_close is None:
            log_close = self._empty(len(self.base_open), torch.float64)
            for start in range(0, len(log_close), TABLE_CHUNK_ROWS):
                part = slice(start, start + TABLE_CHUNK_ROWS)
                close = _host_tensor(self.sampler._ohlc[0][part, CLOSE]).to(self.device)
                log_close[part] = _log(close.contiguous())
            self._base_log_close = log_close
        row_end = self.block_end[torch.searchsorted(self.window_ends, ids, right=True)]
        end = starts[:, 0] + (self.seq_len - 1)  # base rows come first in the row space
        rows = horizon_rows(end, row_end, max(self.horizons))
        log_vol, _, valid = horizon_targets(
            _take_rows(self._base_log_close, rows),
            _take_rows(self.open_ns, rows),
            row_end - 1 - end,
            self.horizons,
            self.bar_ns,
        )
        return log_vol.float(), valid

    def parents(self, starts: torch.Tensor) -> torch.Tensor | None:
        """Where each bar's containing bar sits in the next coarser timeframe's window, int64
        ``[B, n_tf - 1, seq_len]`` (``seq_len``: not in that window, not closed by the anchor
        yet; never older than it, see ``MaskingStrategy``), for the windows whose oldest bars
        are at global rows ``starts``; None when the timeframes do not nest
        (:meth:`MultiTFWindowSampler.parent_rows`). What the masks' sync hides."""
        if not self._parents_found:  # global parent rows, one int32 per bar (the last unused)
            self._parents_found = True
            found = self.sampler.parent_rows()
            if found is not None:
                table = self._empty(len(self.open_ns), torch.int32)
                for k, parent_rows in enumerate(found):
                    first = self._first_row[k]
                    rows = _host_tensor(parent_rows + np.int32(self._first_row[k + 1]))
                    table[first : first + len(parent_rows)] = rows
                self._parents = table
        if self._parents is None:
            return None
        length = self.seq_len
        rows = torch.index_select(self._runs(self._parents), 0, starts[:, :-1].reshape(-1))
        # In int32 (the broadcast subtraction is ~6x faster than in int64 on the CPU), then
        # int64 once: scatter indices must be.
        positions = rows.view(len(starts), -1, length) - starts[:, 1:, None].int()
        return positions.clamp_(max=length).long()

    def _runs(self, per_bar: torch.Tensor) -> torch.Tensor:
        """A view of a per-bar ``[rows]`` or ``[rows, C]`` tensor whose item ``i`` is the
        ``seq_len`` rows from row ``i`` on: a window's bars are consecutive rows, so a gather
        of it takes one index per window and timeframe and copies whole runs of rows."""
        length, row = self.seq_len, per_bar.stride(0)
        shape = (max(len(per_bar) - length + 1, 0), length, *per_bar.shape[1:])
        return per_bar.as_strided(shape, (row, row, *per_bar.stride()[1:]))

    def _as_ids(self, window_ids: npt.ArrayLike | torch.Tensor) -> torch.Tensor:
        if isinstance(window_ids, torch.Tensor):
            return window_ids.to(self.device, torch.int64)
        return torch.as_tensor(np.asarray(window_ids, dtype=np.int64), device=self.device)

    def _end_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Global rows of every window's newest bar, int64 ``[B, n_tf]``."""
        if self.device.type == "cpu":  # np.take: ~10x torch's advanced indexing here
            rows = torch.from_numpy(np.take(self.end_rows.numpy(), ids.numpy(), axis=1))
        else:
            rows = self.end_rows[:, ids]
        return rows.T + self.row_offsets

    def _first_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Global rows of every window's oldest bar, int64 ``[B, n_tf]``."""
        return self._end_rows(ids) - (self.seq_len - 1)

    def rows(self, window_ids: npt.ArrayLike | torch.Tensor) -> torch.Tensor:
        """Global rows of every window's bars, int64 ``[B, n_tf, seq_len]`` (oldest → newest)."""
        return self._end_rows(self._as_ids(window_ids))[..., None] - self.offsets

    def _raw_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Raw features of ``ids`` from their gathered prices, ``GATHER_CHUNK`` at a time."""
        ids_host = ids.cpu().numpy()
        features = torch.empty(len(ids_host), len(self.timeframes), self.seq_len, N_FEATURES)
        for start in range(0, len(ids_host), GATHER_CHUNK):
            part = slice(start, start + GATHER_CHUNK)
            ohlc, _ = self.sampler.gather(ids_host[part])
            price_window_features(torch.from_numpy(ohlc), out=features[part])
        return features.to(self.device)

    def features(
        self, window_ids: npt.ArrayLike | torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Features float32 ``[B, n_tf, seq_len, 6]``: z-scores, or raw with ``normalize=False``
        (the normaliser's fit) or without a normaliser."""
        ids = self._as_ids(window_ids)
        if not normalize or self.normalizer is None:  # raw: no table needed (the fit)
            return self._raw_features(ids)
        return self._features_and_times(self._first_rows(ids))[0]

    def _features_and_times(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and open times of the windows whose oldest bars are at global rows
        ``starts`` ``[B, n_tf]``, from the tables; on the CPU ``GATHER_CHUNK``
        windows at a time, so a chunk's rows stay in the cache through the passes over them
        (~15 % faster there than the batch at once).

        The gathers index runs of rows (:meth:`_runs`; ~2x np.take of every row on the CPU)."""
        table, first_delta = self.tables()
        batch = len(starts)
        n_tf, length = len(self.timeframes), self.seq_len
        table_runs, time_runs = self._runs(table), self._runs(self.open_ns)
        features = torch.empty(batch, n_tf, length, N_FEATURES, device=self.device)
        times = torch.empty(batch, n_tf, length, dtype=torch.int64, device=self.device)
        step = GATHER_CHUNK if self.device.type == "cpu" else max(batch, 1)
        for start in range(0, batch, step):
            part = slice(start, start + step)
            first_rows = starts[part]
            flat = first_rows.reshape(-1)
            bars = torch.index_select(table_runs, 0, flat, out=self._rows_buffer(len(flat)))
            bars = bars.view(-1, n_tf, length, N_FEATURES)
            log_ref = _log(_take_rows(self.base_open, first_rows[:, 0]))  # base rows first
            first = _take_rows(first_delta, first_rows)
            scaled_windows(bars, first, log_ref, self._scale, out=features[part])
            torch.index_select(time_runs, 0, flat, out=times[part].view(-1, length))
        return features, times

    def _rows_buffer(self, n: int) -> torch.Tensor:
        """float64 ``[n, seq_len, 6]`` scratch for a chunk's gathered rows, reused: a fresh
        3.5 MB per chunk costs page faults and cache misses on the CPU (the training sequence,
        batch then masks: 5-8 % more windows/s in an A/B). Per thread, so builders stay safe to
        share between threads."""
        buffer = getattr(self._scratch, "rows", None)
        if buffer is None or len(buffer) < n:
            buffer = torch.empty(
                n, self.seq_len, N_FEATURES, dtype=torch.float64, device=self.device
            )
            self._scratch.rows = buffer
        return buffer[:n]

    def batch(self, window_ids: npt.ArrayLike | torch.Tensor) -> Batch:
        """The training batch of ``window_ids`` (see :mod:`stage1.data.dataset`): ``features``
        and ``targets`` float32 ``[B, n_tf, seq_len, 6]``, ``times`` int64 ``[B, n_tf,
        seq_len]``, ``ref_price`` float64 ``[B]``, ``window_ids`` int64 ``[B]``, on the device;
        with ``horizons`` also the forecast labels ``future_log_vol``/``future_valid`` ``[B, H]``
        (:meth:`future`; labels only, never model input); when the timeframes nest also
        ``parents`` (:meth:`parents`, for the masks' sync; not with ``with_parents=False``, as
        for encoding, which draws no masks). ``targets`` is the ``features`` tensor itself: both
        are the unmasked features, and the model masks a copy
        (:func:`~stage1.data.masking.mask_model_input`), so no consumer writes to them; a
        second 7 MB tensor per batch of 1 024 cost ~10 % of the build on the CPU."""
        ids = self._as_ids(window_ids)
        starts = self._first_rows(ids)
        features, times = self._features_and_times(starts)
        batch = {
            "features": features,
            "targets": features,
            "times": times,
            "ref_price": _take_rows(self.base_open, starts[:, 0]),  # base rows come first
            "window_ids": ids,
        }
        if self.horizons:
            batch["future_log_vol"], batch["future_valid"] = self.future(ids, starts)
        parents = self.parents(starts) if self.with_parents else None
        if parents is not None:
            batch["parents"] = parents
        return batch
