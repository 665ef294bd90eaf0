"""DeviceBatchBuilder: whole batches of windows built on the training device.

The sampler's bars move to the device once, as per-bar tables; a batch of window ids then
becomes gather → features → normalise in a few torch ops on that device, with no loop over
windows and no host round trip. Training (``Stage1DataModule``), evaluation
(``Stage1Dataset.get_batch``) and encoding (``Stage1InferenceEngine``) all build batches here.
The math is ``stage1.data.features`` (``bar_table``, ``window_features``), which
``FeatureEngineer.process_batch`` also uses for raw price windows (the guide's
``process_window``, live RL windows): one implementation, two ways to get the bars.

Why per-bar tables: every feature is a per-bar quantity except ``log(p / ref)`` (ref = open
of the base bar at position 0) and the first bar's ``delta_close`` (its own open stands in
for the previous close). So the tables hold, per bar and in float64, ``log`` of the four
prices, ``delta_close``, ``body_ratio`` and ``log(close / open)``; a window costs a gather,
a subtraction of its ``log ref`` and the z-score, and no logarithm (each M1 bar is in 48
windows). ``log p - log ref`` is a difference of float64 logs, exact to ~1e-15 even for
nearby prices; the z-score is formed in float64 too and rounded to float32 once.

Rows of several instruments may share one row space per timeframe (windows never cross an
instrument block): the only cross-row quantity, ``delta_close``, is replaced at a window's
first bar, so a block boundary never enters a window's features.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from stage1.data.features import (
    CLOSE,
    N_FEATURES,
    OPEN,
    bar_table,
    float64_stats,
    price_window_features,
    window_features,
)
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.targets import gathered_targets, horizon_rows, horizon_targets
from stage1.data.timeframes import tf_ns

Batch = dict[str, torch.Tensor]

# Windows per step of a gathered (not resident) batch: ~2.4 MB of float64 prices, so a chunk's
# passes run in the cache (measured per 1 024 windows on the 2-core CPU, 1 thread: 11.1 / 11.5 /
# 12.8 ms for chunks of 128 / 256 / 512, 13.3 ms for the batch at once).
GATHER_CHUNK = 256


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array`` without a copy where possible. A read-only (memory-mapped)
    array is wrapped as is: nothing here writes to it, so torch's warning does not apply."""
    array = np.asarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _take_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for a ``[N]`` or ``[N, C]`` table and int64 ``rows`` of any shape."""
    if table.device.type == "cpu":
        # np.take is 2-3x faster than torch's CPU row gather (index_select / advanced indexing).
        return torch.from_numpy(np.take(table.numpy(), rows.numpy(), axis=0))
    return table[rows]


class DeviceBatchBuilder:
    """The bars of ``sampler`` on ``device``; builds normalised batches of its windows there.

    Reads only the sampler's arrays (``_ohlc[k]`` float64 ``[rows, 4]``, ``_open_ns[k]``
    int64 ``[rows]``, ``end_rows`` int64 ``[n_windows, n_tf]``), each once. All timeframes'
    rows are stacked into one row space (timeframe ``k`` starts at ``row_offsets[k]``), so a
    batch is one gather. Device memory: 64 bytes per bar (table, log(close/open), open time),
    8 more per base bar (its open) and 8 per window and timeframe (about 450 MB for 3.1 M M1
    rows and six timeframes).

    Without a ``normalizer`` (or with ``normalize=False``) features are raw, as the
    normaliser's fit needs them; ``set_normalizer`` binds the statistics later. The statistics
    live on the device, so building a batch copies nothing from the host but the ids.

    ``resident`` (default: True on an accelerator, False on the CPU) chooses where the bars
    live. Off, nothing is copied: a batch gathers its windows' prices from the sampler's own
    (possibly memory-mapped) arrays and computes the same per-bar quantities for them only
    (:func:`~stage1.data.features.price_window_features`, equal to the tables' values), in
    chunks of ``GATHER_CHUNK`` windows that stay in the cache. On the CPU that is as fast as
    the tables (each bar's log is taken per window, but a table row is 1.5x a price row to
    read; measured 12.4 vs 14.0 ms per 1 024 windows, 1 thread) and keeps memory bounded by the
    sampler's arrays, which several instruments' memory-mapped bars need.
    """

    def __init__(
        self,
        sampler: MultiTFWindowSampler,
        normalizer: TFNormalizer | None = None,
        device: str | torch.device = "cpu",
        resident: bool | None = None,
        horizons: Sequence[int] = (),
    ) -> None:
        self.device = torch.device(device)
        self.timeframes = list(sampler.timeframes)
        self.seq_len = int(sampler.seq_len)
        self.horizons = [int(h) for h in horizons]
        self.bar_ns = tf_ns(sampler.base_tf)
        self.resident = self.device.type != "cpu" if resident is None else bool(resident)
        self.sampler = sampler
        self.offsets = torch.arange(self.seq_len - 1, -1, -1, device=self.device)  # old → new
        if not self.resident:
            self.set_normalizer(normalizer)
            return
        n_tf = len(self.timeframes)
        tables, intrabars, times = [], [], []
        for k in range(n_tf):
            ohlc = _host_tensor(sampler._ohlc[k]).to(self.device, torch.float64)
            table, intrabar = bar_table(ohlc)
            tables.append(table)
            intrabars.append(intrabar)
            times.append(_host_tensor(sampler._open_ns[k]).to(self.device))
        counts = [len(t) for t in tables]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.row_offsets = torch.from_numpy(offsets).to(self.device)
        self.table = torch.cat(tables)  # [rows, 6] float64
        self.intrabar = torch.cat(intrabars)  # [rows] float64, log(close / open)
        self.open_ns = torch.cat(times)  # [rows] int64
        self.base_open = _host_tensor(sampler._ohlc[0][:, OPEN]).to(self.device, torch.float64)
        end_rows = _host_tensor(sampler.end_rows).to(self.device, torch.int64)
        # Row-major (the sampler's index is column-major): a batch reads whole rows of it.
        self.end_rows = (end_rows + self.row_offsets).contiguous()  # [n_windows, n_tf], global
        self.base_end_rows = end_rows[:, 0].contiguous()  # rows of the base timeframe itself
        # Where each instrument's windows end, and its base rows (the forecast labels' bound).
        self.window_ends = _host_tensor(sampler.window_starts[1:]).to(self.device, torch.int64)
        self.block_end = _host_tensor(sampler.block_starts[1:, 0]).to(self.device, torch.int64)
        self.set_normalizer(normalizer)

    def future(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels of the forecast objective for windows ``ids`` (``horizons``, see
        :mod:`stage1.data.targets`): log realised volatility float32 ``[B, H]`` of the next
        ``h`` base bars after each anchor, and whether it is defined, bool ``[B, H]``."""
        if not self.resident:
            ids_host = ids.cpu().numpy()
            base_open, base_ohlc = self.sampler.timeframe_bars(0)
            end_rows = self.sampler.end_rows[ids_host, 0]
            block_end = self.sampler.base_block_end(ids_host)
            log_vol, _, valid = gathered_targets(
                base_ohlc[:, CLOSE], base_open, end_rows, block_end, self.horizons, self.bar_ns
            )
            return log_vol.float().to(self.device), valid.to(self.device)
        # On the device: the same rule on the resident tables (base rows come first).
        row_end = self.block_end[torch.searchsorted(self.window_ends, ids, right=True)]
        end = self.base_end_rows[ids]
        rows = horizon_rows(end, row_end, max(self.horizons))
        log_vol, _, valid = horizon_targets(
            _take_rows(self.table[:, CLOSE], rows),
            _take_rows(self.open_ns, rows),
            row_end - 1 - end,
            self.horizons,
            self.bar_ns,
        )
        return log_vol.float(), valid

    def set_normalizer(self, normalizer: TFNormalizer | None) -> None:
        """Use ``normalizer``'s statistics from now on (``None``: raw features)."""
        self.normalizer = normalizer
        shape = (len(self.timeframes), N_FEATURES)
        if normalizer is None:
            mean, std = torch.zeros(shape), torch.ones(shape)
        else:
            if list(normalizer.timeframes) != self.timeframes:
                raise ValueError(
                    f"normalizer is for timeframes {normalizer.timeframes}, the sampler has "
                    f"{self.timeframes}"
                )
            mean, std = normalizer.mean, normalizer.std
        self._stats = float64_stats(mean, std, self.device)

    def _as_ids(self, window_ids: npt.ArrayLike | torch.Tensor) -> torch.Tensor:
        if isinstance(window_ids, torch.Tensor):
            return window_ids.to(self.device, torch.int64)
        return torch.as_tensor(np.asarray(window_ids, dtype=np.int64), device=self.device)

    def rows(self, window_ids: npt.ArrayLike | torch.Tensor) -> torch.Tensor:
        """Global rows of every window's bars, int64 ``[B, n_tf, seq_len]`` (oldest → newest);
        resident builders only."""
        ids = self._as_ids(window_ids)
        return self.end_rows[ids][..., None] - self.offsets

    def _stats_for(self, normalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._stats if normalize and self.normalizer is not None else None

    def _gathered(
        self, ids: torch.Tensor, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, open times and reference prices of ``ids`` from the sampler's own arrays
        (not resident), on the device.

        Built ``GATHER_CHUNK`` windows at a time: a chunk's prices and intermediates stay in
        the CPU's cache through every pass over them (a whole batch's do not), ~15 % faster
        there; the values are the same as building the batch in one go."""
        ids_host = ids.cpu().numpy()
        n_tf, length = len(self.timeframes), self.seq_len
        features = torch.empty(len(ids_host), n_tf, length, N_FEATURES)
        times = torch.empty(len(ids_host), n_tf, length, dtype=torch.int64)
        ref_price = torch.empty(len(ids_host), dtype=torch.float64)
        stats = self._stats_for(normalize)
        if stats is not None:
            stats = (stats[0].cpu(), stats[1].cpu())
        for start in range(0, len(ids_host), GATHER_CHUNK):
            part = slice(start, start + GATHER_CHUNK)
            ohlc, open_ns = self.sampler.gather(ids_host[part])
            prices = torch.from_numpy(ohlc)
            price_window_features(prices, stats, out=features[part])
            ref_price[part] = prices[:, 0, 0, OPEN]
            times[part] = torch.from_numpy(open_ns)
        return features.to(self.device), times.to(self.device), ref_price.to(self.device)

    def features(
        self, window_ids: npt.ArrayLike | torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Features float32 ``[B, n_tf, seq_len, 6]``: z-scores, or raw with ``normalize=False``
        (the normaliser's fit) or without a normaliser."""
        if not self.resident:
            return self._gathered(self._as_ids(window_ids), normalize)[0]
        return self._features(self.rows(window_ids), normalize)

    def _features(self, rows: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        bars = _take_rows(self.table, rows)  # [B, n_tf, L, 6] float64
        first_intrabar = _take_rows(self.intrabar, rows[:, :, 0])
        return window_features(bars, first_intrabar, self._stats_for(normalize))

    def batch(self, window_ids: npt.ArrayLike | torch.Tensor) -> Batch:
        """The training batch of ``window_ids`` (see :mod:`stage1.data.dataset`): ``features``
        and ``targets`` float32 ``[B, n_tf, seq_len, 6]``, ``times`` int64 ``[B, n_tf,
        seq_len]``, ``ref_price`` float64 ``[B]``, ``window_ids`` int64 ``[B]``, on the device;
        with ``horizons`` also the forecast labels ``future_log_vol``/``future_valid`` ``[B, H]``
        (:meth:`future`; labels only, never model input)."""
        ids = self._as_ids(window_ids)
        if self.resident:
            rows = self.rows(ids)
            features = self._features(rows)
            times = _take_rows(self.open_ns, rows)
            first_base_row = self.base_end_rows[ids] - (self.seq_len - 1)
            ref_price = _take_rows(self.base_open, first_base_row)
        else:
            features, times, ref_price = self._gathered(ids)
        batch = {
            "features": features,
            "targets": features.clone(),
            "times": times,
            "ref_price": ref_price,
            "window_ids": ids,
        }
        if self.horizons:
            batch["future_log_vol"], batch["future_valid"] = self.future(ids)
        return batch
