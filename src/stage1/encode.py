"""``stage1 encode``: the embedding of every valid anchor in a time range, written to disk.

:func:`run_encode` (the command) runs :func:`encode_to_file` per instrument, which streams the
engine's chunks into ``.parquet`` (:class:`_ParquetWriter`) or ``.npy`` + ``<stem>_timestamps.npy``
(:class:`_NpyWriter`, :func:`timestamps_path`), atomically. The public names are also importable
from :mod:`stage1.inference`.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from stage1.data.instruments import Instrument, find_instruments
from stage1.data.io import load_tf_data
from stage1.errors import ConfigError
from stage1.inference import Embeddings, Stage1InferenceEngine, TimeLike, _utc_index
from stage1.utils import atomic_path

# Parquet row groups of about this many bytes: big enough for fast scans, small enough that
# the write buffer stays bounded whatever the number of anchors.
PARQUET_ROW_GROUP_BYTES = 32 << 20


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
