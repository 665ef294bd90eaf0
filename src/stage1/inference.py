"""Stage1InferenceEngine and ``stage1 encode``: encoder embeddings for the Stage 2 RL agent.

Windows are built by exactly the training code: :class:`MultiTFWindowSampler` (same
``seq_len`` and staleness rule, no look-ahead) and :class:`DeviceBatchBuilder` on the engine's
device (gather, features, the checkpoint's ``TFNormalizer``); the model then runs without
masks. So an anchor time gets the same embedding here as the ``encoded`` output training computes for that window.

An embedding is keyed by its anchor: the CLOSE time of the newest base-timeframe bar in the
window, i.e. the moment it becomes available to a live agent. Shapes:

* unpooled: ``[n_tf, latent_len, d_model]`` per anchor;
* ``pool='mean'``: mean over the latent steps, timeframes concatenated: ``[n_tf * d_model]``;
* ``pool='last'``: the newest latent step of each timeframe, concatenated: ``[n_tf * d_model]``;
* ``pool='flatten'``: every value, C order of ``[n_tf, latent_len, d_model]``:
  ``[n_tf * latent_len * d_model]``.

Memory: the engine never materialises all windows; it gathers one batch at a time. ``encode``
returns the whole result, which for many anchors without pooling is necessarily large
(1 M anchors x 6 x 12 x 128 float32 = 37 GB); use ``iter_encode`` or ``stage1 encode`` (which
streams chunks to disk) for such ranges.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from stage1.checkpoint import load_checkpoint
from stage1.data.device_batch import DeviceBatchBuilder
from stage1.data.features import FeatureEngineer
from stage1.data.instruments import Instrument, find_instruments
from stage1.data.io import bars_from_frame, load_tf_data, validate_bars
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.timeframes import sort_timeframes
from stage1.errors import CheckpointError, ConfigError, DataValidationError
from stage1.model.model import POOLS, pool_embeddings
from stage1.utils import atomic_path

# Windows per model call when batch_size is None. On a CPU small batches keep the activations in
# cache (bench_encode.py: 128 runs ~1.5x faster than 1024); a GPU wants big ones.
DEFAULT_BATCH_SIZE = {"cpu": 128, "cuda": 4096}
# Parquet row groups of about this many bytes: big enough for fast scans, small enough that
# the write buffer stays bounded whatever the number of anchors.
PARQUET_ROW_GROUP_BYTES = 32 << 20

TimeLike = str | datetime | np.datetime64 | pd.Timestamp | None
Embeddings = npt.NDArray[np.float32]


def to_utc_ns(value: TimeLike, name: str) -> int | None:
    """A time bound as int64 UTC nanoseconds (naive = UTC); ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{name}: {value!r} is not a time (use e.g. 2019-06-01 or 2019-06-01T12:30Z)"
        ) from exc
    if pd.isna(stamp):
        raise ConfigError(f"{name}: {value!r} is not a time")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.as_unit("ns").value)


def _utc_index(anchor_ns: npt.NDArray[np.int64]) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(anchor_ns.view("datetime64[ns]"), name="timestamp").tz_localize("UTC")


class Stage1InferenceEngine:
    """Trained encoder + the training pipeline's window code, loaded from ONE checkpoint.

    ``checkpoint_path``: the ``stage1_best.pth`` export or a Lightning ``.ckpt`` (see
    :mod:`stage1.checkpoint`); a missing, corrupt or incompatible file raises
    :class:`CheckpointError`. ``device``: ``'cpu'``, ``'cuda'``, ... (``None``: CUDA if available).
    Attributes: ``model`` (eval mode, on ``device``), ``config`` (resolved), ``normalizer``,
    ``feature_engineer``, ``timeframes`` (finest first), ``seq_len``, ``latent_len``, ``d_model``,
    ``meta`` (checkpoint source, epoch, versions).

    Input data everywhere is ``{tf: DataFrame}`` in the layout ``load_tf_data`` returns (UTC
    open-time index, ``open, high, low, close``); a ``timestamp`` column instead of the index and
    naive (= UTC) times are accepted. Bars must be closed bars: an unfinished base bar would be
    taken as complete.
    """

    def __init__(self, checkpoint_path: str | Path, device: str | torch.device | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(
                f"device: {device!r} is not a torch device (cpu, cuda, cuda:1)"
            ) from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested, but CUDA is not available here")
        self.checkpoint_path = Path(checkpoint_path)
        self.model, self.config, stats, self.meta = load_checkpoint(
            checkpoint_path, map_location=self.device
        )
        self.timeframes = sort_timeframes(list(self.config.data.timeframes))
        try:
            self.normalizer = TFNormalizer.from_dict(stats)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{checkpoint_path}: normalizer statistics are invalid ({exc})"
            ) from exc
        if self.normalizer.timeframes != self.timeframes:
            raise CheckpointError(
                f"{checkpoint_path}: normalizer is for timeframes {self.normalizer.timeframes}, "
                f"the model for {self.timeframes}"
            )
        self.feature_engineer = FeatureEngineer(self.config)
        self.seq_len = int(self.config.data.seq_len)
        self.latent_len = int(self.model.latent_len)
        self.d_model = int(self.model.d_model)
        self._builder: tuple[MultiTFWindowSampler, DeviceBatchBuilder] | None = None

    # ------------------------------------------------------------------------ windows
    def embedding_shape(self, pool: str | None = None) -> tuple[int, ...]:
        """Shape of one anchor's embedding for ``pool`` (see the module docstring)."""
        n_tf = len(self.timeframes)
        shapes = {
            None: (n_tf, self.latent_len, self.d_model),
            "mean": (n_tf * self.d_model,),
            "last": (n_tf * self.d_model,),
            "flatten": (n_tf * self.latent_len * self.d_model,),
        }
        if pool not in shapes:
            raise ConfigError(f"pool: {pool!r} is not one of {POOLS}")
        return shapes[pool]

    def bars(self, multi_tf_data: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The model's timeframes from ``multi_tf_data``, normalised to the bar layout and
        validated (SPEC §1 rules, errors naming ``multi_tf_data['tf']`` and the row)."""
        missing = [tf for tf in self.timeframes if tf not in multi_tf_data]
        if missing:
            raise DataValidationError(
                f"multi_tf_data: missing timeframe(s) {missing}; the model needs {self.timeframes}"
            )
        frames = {}
        for tf in self.timeframes:
            source = f"multi_tf_data[{tf!r}]"
            bars = bars_from_frame(multi_tf_data[tf], source)
            validate_bars(bars, source)
            frames[tf] = bars
        return frames

    def build_sampler(
        self, multi_tf_data: Mapping[str, pd.DataFrame], validated: bool = False
    ) -> MultiTFWindowSampler:
        """The training sampler over ``multi_tf_data`` (same ``seq_len`` and staleness rule; no
        disk cache: live data changes with every call). ``validated``: the frames are already
        in the bar layout and validated (``LiveEncoder`` validates each bar once, on arrival)."""
        return MultiTFWindowSampler(
            multi_tf_data if validated else self.bars(multi_tf_data),
            self.seq_len,
            staleness_factor=float(self.config.data.staleness_factor),
            cache_dir=None,
        )

    def select_windows(
        self, sampler: MultiTFWindowSampler, start: TimeLike = None, end: TimeLike = None
    ) -> npt.NDArray[np.int64]:
        """Ids of the windows whose anchor lies in ``[start, end]`` (UTC, both inclusive)."""
        start_ns, end_ns = to_utc_ns(start, "start"), to_utc_ns(end, "end")
        if start_ns is not None and end_ns is not None and start_ns > end_ns:
            raise ConfigError(f"start: {start} is after end {end}")
        anchors = sampler.anchor_ns  # increasing: one anchor per base bar
        first = 0 if start_ns is None else int(np.searchsorted(anchors, start_ns, side="left"))
        stop = len(anchors) if end_ns is None else int(np.searchsorted(anchors, end_ns, "right"))
        if first >= stop:
            oldest, newest = _utc_index(anchors[[0, -1]])
            raise DataValidationError(
                f"no valid window has its anchor in [{start}, {end}]; the data's "
                f"{len(anchors)} valid anchors span {oldest} .. {newest}"
            )
        return np.arange(first, stop, dtype=np.int64)

    def window_features(self, ohlc: npt.NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        """Model input of raw windows: ``ohlc [B, n_tf, seq_len, 4]`` float64 prices →
        normalised features float32 ``[B, n_tf, seq_len, 6]`` on CPU (``process_batch`` with the
        checkpoint's normaliser: the math of training batches)."""
        return self.feature_engineer.process_batch(torch.as_tensor(ohlc).cpu(), self.normalizer)[0]

    def batch_builder(self, sampler: MultiTFWindowSampler) -> DeviceBatchBuilder:
        """``sampler``'s batch builder on the engine's device (kept for the last sampler)."""
        if self._builder is None or self._builder[0] is not sampler:
            builder = DeviceBatchBuilder(sampler, self.normalizer, self.device)
            self._builder = (sampler, builder)
        return self._builder[1]

    def embed_windows(
        self,
        sampler: MultiTFWindowSampler,
        window_ids: npt.ArrayLike,
        pool: str | None = None,
    ) -> torch.Tensor:
        """Embeddings of ``sampler``'s windows, float32 on CPU: ``[B, n_tf, latent_len,
        d_model]`` or pooled ``[B, D]``. Features exactly as training builds them
        (:class:`DeviceBatchBuilder`, here on the engine's device), then ``model.encode`` (with
        the bar open times, for a model with ``model.time_features``)."""
        batch = self.batch_builder(sampler).batch(window_ids)
        with torch.inference_mode():
            encoded = self.model.encode(batch["features"], times=batch["times"])
            embeddings = pool_embeddings(encoded, pool).float().cpu()
        # A clone made outside inference mode is an ordinary tensor, so an agent may feed it
        # to a network it trains (inference tensors refuse to be saved for backward).
        return embeddings.clone()

    def _iter_chunks(
        self,
        sampler: MultiTFWindowSampler,
        window_ids: npt.NDArray[np.int64],
        batch_size: int | None,
        pool: str | None,
    ) -> Iterator[tuple[pd.DatetimeIndex, Embeddings]]:
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE.get(self.device.type, DEFAULT_BATCH_SIZE["cuda"])
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        for first in range(0, len(window_ids), batch_size):
            ids = window_ids[first : first + batch_size]
            embeddings = self.embed_windows(sampler, ids, pool).numpy()
            yield _utc_index(sampler.anchor_ns[ids]), embeddings

    # ------------------------------------------------------------------------ public API
    def extract_features(self, multi_tf_data: Mapping[str, pd.DataFrame]) -> torch.Tensor:
        """Embedding of the newest valid window in the data: ``[1, n_tf, latent_len,
        d_model]`` float32 on CPU (the guide's API)."""
        sampler = self.build_sampler(multi_tf_data)
        return self.embed_windows(sampler, [len(sampler) - 1])

    def iter_encode(
        self,
        multi_tf_data: Mapping[str, pd.DataFrame],
        start: TimeLike = None,
        end: TimeLike = None,
        batch_size: int | None = None,
        pool: str | None = None,
    ) -> Iterator[tuple[pd.DatetimeIndex, Embeddings]]:
        """Like :meth:`encode`, as chunks of at most ``batch_size`` anchors (bounded memory)."""
        self.embedding_shape(pool)  # reject a bad pool before any work
        sampler = self.build_sampler(multi_tf_data)
        yield from self._iter_chunks(
            sampler, self.select_windows(sampler, start, end), batch_size, pool
        )

    def encode(
        self,
        multi_tf_data: Mapping[str, pd.DataFrame],
        start: TimeLike = None,
        end: TimeLike = None,
        batch_size: int | None = None,
        pool: str | None = None,
    ) -> tuple[pd.DatetimeIndex, Embeddings]:
        """Embeddings of every valid window anchored in ``[start, end]`` (UTC, inclusive).

        Returns ``(timestamps, embeddings)``: anchor times (``DatetimeIndex``,
        ``datetime64[ns, UTC]``, increasing) and float32 ``[N, n_tf, latent_len, d_model]``, or
        ``[N, D]`` when pooled. Windows are gathered ``batch_size`` at a time (None: 128 on CPU,
        4096 on a GPU); only the result grows with ``N`` (see the module docstring for big
        ranges).
        """
        shape = self.embedding_shape(pool)
        sampler = self.build_sampler(multi_tf_data)
        window_ids = self.select_windows(sampler, start, end)
        embeddings = np.empty((len(window_ids), *shape), dtype=np.float32)
        filled = 0
        for _, chunk in self._iter_chunks(sampler, window_ids, batch_size, pool):
            embeddings[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return _utc_index(sampler.anchor_ns[window_ids]), embeddings

    def stream(
        self,
        history: Mapping[str, pd.DataFrame] | None = None,
        pool: str | None = None,
        keep_bars: int | None = None,
    ) -> LiveEncoder:
        """A :class:`LiveEncoder` for a live agent, primed with ``history`` if given (its newest
        embedding is then in ``latest``)."""
        live = LiveEncoder(self, pool=pool, keep_bars=keep_bars)
        if history is not None:
            live.update(history)
        return live


class LiveEncoder:
    """Incremental encoding for a live agent: append bars, get the newest embedding.

    Only the newest ``keep_bars`` bars of each timeframe are kept (default ``2 * seq_len``: a
    window needs ``seq_len`` complete bars, the rest is slack for a coarse bar still running at
    the newest anchor), so each update costs one small index and one batch-of-one forward
    pass, however long the agent runs. The embedding equals ``encode()``'s for the same anchor:
    a window that is valid in the kept tail holds exactly the bars the full data's window holds
    (the tail is a contiguous suffix, and a window reaching past it is rejected as short).

    Contract: base-timeframe bars must be closed (the newest one defines the anchor). Coarser
    timeframes may include their running bar; it enters no window before it closes, and a bar
    sent again (same open time) replaces the held copy, so its final values win. Each update
    must bring every timeframe up to the same moment: a coarse bar that closed at or before the
    newest base bar's close but arrives only in a LATER update would be missing from that
    anchor's window, unlike ``encode()`` with hindsight.
    """

    def __init__(
        self, engine: Stage1InferenceEngine, pool: str | None = None, keep_bars: int | None = None
    ) -> None:
        engine.embedding_shape(pool)
        self.engine = engine
        self.pool = pool
        self.keep_bars = 2 * engine.seq_len if keep_bars is None else int(keep_bars)
        if self.keep_bars < engine.seq_len:
            raise ConfigError(
                f"keep_bars: must be >= seq_len ({engine.seq_len}), got {self.keep_bars}"
            )
        self._bars: dict[str, pd.DataFrame] = {}
        # The last (anchor_time, embedding) returned, e.g. the newest one of the priming history.
        self.latest: tuple[pd.Timestamp, Embeddings] | None = None

    @property
    def last_anchor(self) -> pd.Timestamp | None:
        """Anchor time of the last embedding returned (``None`` before the first)."""
        return None if self.latest is None else self.latest[0]

    def _append(self, tf: str, frame: pd.DataFrame) -> None:
        source = f"new_bars[{tf!r}]"
        bars = bars_from_frame(frame, source)
        validate_bars(bars, source)
        held = self._bars.get(tf)
        if held is not None:
            # A bar sent again (e.g. a running bar, then its final version) replaces the held one.
            bars = pd.concat([held, bars])
            bars = bars[~bars.index.duplicated(keep="last")].sort_index()
        self._bars[tf] = bars.iloc[-self.keep_bars :]

    def update(
        self, new_bars: Mapping[str, pd.DataFrame]
    ) -> tuple[pd.Timestamp, Embeddings] | None:
        """Append ``new_bars`` (``{tf: DataFrame}``, any subset of the timeframes; see the class
        contract) and return ``(anchor_time, embedding)`` for the newest valid window if its anchor
        is newer than the last one returned; ``None`` otherwise (not enough history yet, the
        newest window is stale, e.g. right after the weekend, or nothing new). ``embedding`` is
        float32 ``[n_tf, latent_len, d_model]`` or pooled ``[D]``, as one row of ``encode()``.
        When several base bars arrive at once only the newest anchor is encoded; use
        ``encode()`` for backfills."""
        unknown = [tf for tf in new_bars if tf not in self.engine.timeframes]
        if unknown:
            raise DataValidationError(
                f"new_bars: unknown timeframe(s) {unknown}; the model uses {self.engine.timeframes}"
            )
        for tf, frame in new_bars.items():
            self._append(tf, frame)
        if any(len(self._bars.get(tf, ())) < self.engine.seq_len for tf in self.engine.timeframes):
            return None
        try:
            sampler = self.engine.build_sampler(self._bars, validated=True)
        except DataValidationError:
            return None  # inputs are validated, so this is "no valid window in the tail yet"
        anchor = pd.Timestamp(int(sampler.anchor_ns[-1]), tz="UTC")
        if self.last_anchor is not None and anchor <= self.last_anchor:
            return None
        embedding = self.engine.embed_windows(sampler, [len(sampler) - 1], self.pool).numpy()[0]
        self.latest = (anchor, embedding)
        return self.latest


# ---------------------------------------------------------------------------- stage1 encode
class _NpyWriter:
    """Streams ``[N, *shape]`` float32 rows into ``.npy`` (header first: ``N`` is known), and
    writes the anchor times to ``<stem>_timestamps.npy`` (``datetime64[ns]``, UTC) at the end."""

    def __init__(self, path: Path, ts_path: Path, n_rows: int, shape: tuple[int, ...]) -> None:
        self.handle: BinaryIO = path.open("wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": (n_rows, *shape),
        }
        np.lib.format.write_array_header_2_0(self.handle, header)
        self.ts_path = ts_path
        self.times = np.empty(n_rows, dtype="datetime64[ns]")
        self.filled = 0

    def write(self, timestamps: pd.DatetimeIndex, embeddings: Embeddings) -> None:
        self.handle.write(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
        self.times[self.filled : self.filled + len(timestamps)] = timestamps.asi8.view(
            "datetime64[ns]"
        )
        self.filled += len(timestamps)

    def close(self) -> None:
        self.handle.close()
        with self.ts_path.open("wb") as handle:
            np.save(handle, self.times)


class _ParquetWriter:
    """Streams rows to Parquet: ``timestamp`` (``timestamp[ns, UTC]``) and one float32 column per
    embedding dimension ``e0 .. e{D-1}``, in row groups of about 32 MB; the file's key-value
    metadata ``stage1`` (JSON) records pool, shape and timeframes."""

    def __init__(self, path: Path, dim: int, metadata: dict[str, Any]) -> None:
        self.names = [f"e{j}" for j in range(dim)]
        fields = [pa.field("timestamp", pa.timestamp("ns", tz="UTC"))]
        fields += [pa.field(name, pa.float32()) for name in self.names]
        schema = pa.schema(fields, metadata={"stage1": json.dumps(metadata)})
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.group_rows = max(1, PARQUET_ROW_GROUP_BYTES // (4 * dim))
        self.pending: list[tuple[pd.DatetimeIndex, Embeddings]] = []
        self.pending_rows = 0

    def write(self, timestamps: pd.DatetimeIndex, embeddings: Embeddings) -> None:
        self.pending.append((timestamps, embeddings))
        self.pending_rows += len(timestamps)
        if self.pending_rows >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        times = np.concatenate([t.asi8 for t, _ in self.pending])
        values = np.concatenate([e for _, e in self.pending])
        columns = [pa.array(times, type=pa.timestamp("ns", tz="UTC"))]
        columns += [pa.array(values[:, j]) for j in range(values.shape[1])]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.writer.schema))
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


def timestamps_path(out: Path) -> Path:
    """Where ``stage1 encode`` writes the anchor times beside an ``.npy`` output."""
    return out.with_name(f"{out.stem}_timestamps.npy")


def run_encode(args: argparse.Namespace) -> None:
    """``stage1 encode``: embeddings of every valid anchor in ``[--start, --end]`` to disk.

    ``--out x.parquet``: columns ``timestamp`` + ``e0..e{D-1}`` (one vector per anchor; without
    ``--pool`` the flattened embedding). ``--out x.npy``: float32 ``[N, n_tf, latent_len,
    d_model]`` (or ``[N, D]`` pooled) plus ``x_timestamps.npy``. Streamed in chunks (bounded
    memory) and written atomically: an interrupted run leaves no partial file. A data root of
    several instruments gives one file per instrument, ``x_<INSTRUMENT>.parquet`` (or ``.npy``).
    """
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".npy"):
        raise ConfigError(f"--out: {out} must end in .parquet or .npy")
    pool = args.pool
    if suffix == ".parquet" and pool is None:
        pool = "flatten"
        print("stage1 encode: Parquet holds one vector per anchor; no --pool given, so flatten")
    engine = Stage1InferenceEngine(args.ckpt, device=args.device)
    instruments = find_instruments(args.data_dir, engine.timeframes)
    for instrument in instruments:
        target = (
            out
            if len(instruments) == 1
            else out.with_name(f"{out.stem}_{instrument.name}{out.suffix}")
        )
        encode_to_file(engine, instrument, target, args.start, args.end, pool, args.batch_size)


def encode_to_file(
    engine: Stage1InferenceEngine,
    instrument: Instrument,
    out: Path,
    start: TimeLike,
    end: TimeLike,
    pool: str | None,
    batch_size: int | None,
) -> None:
    """Encode one instrument's windows into ``out`` (see :func:`run_encode`) and print a line."""
    started = time.perf_counter()
    suffix = out.suffix.lower()
    sampler = engine.build_sampler(load_tf_data(instrument.path, engine.timeframes))
    window_ids = engine.select_windows(sampler, start, end)
    shape = engine.embedding_shape(pool)
    metadata = {
        "pool": pool,
        "shape": list(shape),
        "timeframes": engine.timeframes,
        "seq_len": engine.seq_len,
        "latent_len": engine.latent_len,
        "d_model": engine.d_model,
        "checkpoint": str(engine.checkpoint_path),
        "instrument": instrument.name,
    }
    writer: _NpyWriter | _ParquetWriter
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out))
        if suffix == ".parquet":
            writer = _ParquetWriter(tmp, shape[0], metadata)
        else:
            ts_tmp = stack.enter_context(atomic_path(timestamps_path(out)))
            writer = _NpyWriter(tmp, ts_tmp, len(window_ids), shape)
        # Closed before the temp files are renamed (or, on failure, deleted).
        stack.callback(writer.close)
        progress = stack.enter_context(
            tqdm(total=len(window_ids), unit="win", desc=f"encode {instrument.name}", disable=None)
        )
        loop_started = time.perf_counter()
        for timestamps, embeddings in engine._iter_chunks(sampler, window_ids, batch_size, pool):
            writer.write(timestamps, embeddings)
            progress.update(len(timestamps))
        loop_s = time.perf_counter() - loop_started
    seconds = time.perf_counter() - started
    first, last = _utc_index(sampler.anchor_ns[window_ids[[0, -1]]])
    extra = "" if suffix == ".parquet" else f" (+ {timestamps_path(out).name})"
    print(
        f"stage1 encode: {len(window_ids)} anchors of {instrument.name} {first} .. {last}, "
        f"embedding {list(shape)} float32 (pool={pool}) on {engine.device} -> {out}{extra} "
        f"in {seconds:.1f} s ({len(window_ids) / seconds:,.0f} windows/s; encoding loop "
        f"{len(window_ids) / max(loop_s, 1e-9):,.0f} windows/s after {seconds - loop_s:.1f} s "
        "of loading)"
    )
