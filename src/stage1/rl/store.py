"""EmbeddingStore: point-in-time embeddings, one per anchor, looked up "as of" a time.

An anchor is the close time of a window's newest base bar: the moment its embedding becomes
known. ``asof(ts)`` returns the embedding of the newest anchor at or before ``ts``, never a
later one. A time before the first anchor, or more than ``max_staleness`` after the newest
anchor at or before it (a data gap, a weekend, the end of the store), has no embedding: that
is :class:`EmbeddingUnavailableError` (or a NaN row, if asked for), never a silently stale value.

All times are int64 UTC nanoseconds inside; inputs are converted explicitly (``as_unit('ns')``),
since pandas 3 may store other units.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stage1.data.io import file_sha256, load_tf_data
from stage1.data.timeframes import tf_ns
from stage1.encode import _ParquetWriter
from stage1.errors import ConfigError, Stage1Error
from stage1.inference import Stage1InferenceEngine, TimeLike, _utc_index, to_utc_ns
from stage1.utils import atomic_path

STORE_FORMAT = "stage1-embedding-store-v1"
# Default staleness limit in base bars: a few missing minutes are tolerated, a weekend is not.
DEFAULT_STALENESS_BARS = 5

Times = pd.DatetimeIndex | Sequence[TimeLike] | npt.NDArray[Any] | pd.Series


class EmbeddingUnavailableError(Stage1Error):
    """No embedding may be used at the asked time (before the first anchor, or stale)."""


def times_to_ns(timestamps: Times, name: str = "timestamps") -> npt.NDArray[np.int64]:
    """Times as int64 UTC nanoseconds: datetimes (naive = UTC, any unit) or integers, which are
    taken as nanoseconds since the epoch."""
    values: Any = pd.Index(timestamps) if isinstance(timestamps, pd.Series) else timestamps
    if isinstance(values, pd.DatetimeIndex):
        index = values  # np.asarray of a tz-aware index would box every value: slow
    else:
        array = np.asarray(values)
        if array.ndim != 1:
            raise ConfigError(f"{name}: expected a 1-D sequence of times, got shape {array.shape}")
        if np.issubdtype(array.dtype, np.integer):
            return array.astype(np.int64)
        try:
            index = pd.DatetimeIndex(array)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: not times ({exc})") from exc
    if index.hasnans:
        raise ConfigError(f"{name}: position {int(np.argmax(index.isna()))} is not a time (NaT)")
    index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    return np.asarray(index.as_unit("ns").asi8, dtype=np.int64)


def staleness_ns(value: str | pd.Timedelta | None, default_ns: int | None) -> int | None:
    """``max_staleness`` as int64 ns: ``'default'`` → ``default_ns``; None → no limit; else a
    ``pd.Timedelta``-like value (``'10min'``) >= 0."""
    if isinstance(value, str) and value == "default":
        return default_ns
    if value is None:
        return None
    try:
        delta = pd.Timedelta(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"max_staleness: {value!r} is not a duration (e.g. '10min')") from exc
    if pd.isna(delta) or delta < pd.Timedelta(0):
        raise ConfigError(f"max_staleness: must be a duration >= 0, got {value!r}")
    return int(delta.as_unit("ns").value)


def _fmt(ns: int) -> str:
    return str(pd.Timestamp(int(ns), tz="UTC"))


def asof_positions(
    anchor_ns: npt.NDArray[np.int64], times_ns: npt.NDArray[np.int64], max_staleness_ns: int | None
) -> npt.NDArray[np.int64]:
    """Row of the newest anchor ``<= t`` for each time, or -1 when none may be used (``t``
    before the first anchor, or more than ``max_staleness_ns`` after that anchor)."""
    rows = np.searchsorted(anchor_ns, times_ns, side="right").astype(np.int64) - 1
    if max_staleness_ns is not None:
        age = times_ns - anchor_ns[np.maximum(rows, 0)]
        rows[age > max_staleness_ns] = -1
    return rows


def unavailable_reason(
    anchor_ns: npt.NDArray[np.int64], t_ns: int, max_staleness_ns: int | None
) -> str:
    """Why time ``t_ns`` has no usable anchor (for error messages)."""
    row = int(np.searchsorted(anchor_ns, t_ns, side="right")) - 1
    if len(anchor_ns) == 0 or row < 0:
        first = _fmt(anchor_ns[0]) if len(anchor_ns) else "none"
        return f"{_fmt(t_ns)} is before the first anchor ({first})"
    age_min = (t_ns - int(anchor_ns[row])) / 60e9
    limit_min = (max_staleness_ns or 0) / 60e9
    return (
        f"{_fmt(t_ns)}: the newest anchor at or before it ({_fmt(anchor_ns[row])}) is "
        f"{age_min:g} min old, more than max_staleness ({limit_min:g} min)"
    )


class EmbeddingStore:
    """Embeddings ``[N, dim]`` float32 keyed by increasing anchor times (int64 UTC ns).

    ``metadata``: ``format``, ``checkpoint`` (path), ``checkpoint_sha256``, ``timeframes``,
    ``pool``, ``dim``, ``seq_len``, ``normalizer_train_period`` (``[oldest open, newest anchor]``
    of the checkpoint's train split, ISO UTC, or None for checkpoints that predate it),
    ``max_staleness_ns``. ``max_staleness``: a ``pd.Timedelta``-like limit (default
    ``DEFAULT_STALENESS_BARS`` base bars), or None for no limit.
    """

    def __init__(
        self,
        anchor_ns: npt.ArrayLike,
        embeddings: npt.ArrayLike,
        metadata: Mapping[str, Any],
        max_staleness: str | pd.Timedelta | None = "default",
    ) -> None:
        self.anchor_ns = np.ascontiguousarray(anchor_ns, dtype=np.int64)
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.anchor_ns):
            raise ConfigError(
                f"embeddings: expected [{len(self.anchor_ns)}, dim] (one row per anchor), "
                f"got {self.embeddings.shape}"
            )
        if len(self.anchor_ns) == 0:
            raise ConfigError("anchor_ns: an embedding store needs at least one anchor")
        steps = np.diff(self.anchor_ns)
        if steps.size and steps.min() <= 0:
            row = int(np.argmax(steps <= 0)) + 1
            raise ConfigError(
                f"anchor_ns: row {row} ({_fmt(self.anchor_ns[row])}) is not after "
                "the previous anchor; anchors must be strictly increasing"
            )
        self.metadata = dict(metadata)
        self.metadata["dim"] = int(self.embeddings.shape[1])
        stored = self.metadata.get("max_staleness_ns", "default")
        if stored == "default":
            base_tf = str(self.metadata.get("timeframes", ["m1"])[0])
            stored = DEFAULT_STALENESS_BARS * tf_ns(base_tf)
        self.max_staleness_ns = staleness_ns(max_staleness, stored)
        self.metadata["max_staleness_ns"] = self.max_staleness_ns

    # ------------------------------------------------------------------------ build / io
    @classmethod
    def build(
        cls,
        checkpoint: str | Path,
        data: str | Path | Mapping[str, pd.DataFrame],
        start: TimeLike = None,
        end: TimeLike = None,
        pool: str = "mean",
        batch_size: int | None = None,
        device: str | None = None,
        max_staleness: str | pd.Timedelta | None = "default",
        stride: int = 1,
    ) -> EmbeddingStore:
        """Encode every valid anchor in ``[start, end]`` of ``data`` (a data dir or ``{tf:
        DataFrame}``), or every ``stride``-th of them, with the engine's batched encode (the
        windows, batches and pooling of ``Stage1InferenceEngine.encode``).

        With ``stride > 1`` times between kept anchors are served only within ``max_staleness``
        of the older one: an agent deciding every ``stride`` bars asks at the kept anchors."""
        if pool is None:
            raise ConfigError("pool: a store holds one vector per anchor; use mean, last, flatten")
        if stride < 1:
            raise ConfigError(f"stride: must be >= 1, got {stride}")
        engine = Stage1InferenceEngine(checkpoint, device=device)
        shape = engine.embedding_shape(pool)  # rejects a bad pool before any work
        frames = load_tf_data(data, engine.timeframes) if isinstance(data, str | Path) else data
        sampler = engine.build_sampler(frames)
        window_ids = engine.select_windows(sampler, start, end)[::stride]
        embeddings = np.empty((len(window_ids), *shape), dtype=np.float32)
        filled = 0
        for _, chunk in engine._iter_chunks(sampler, window_ids, batch_size, pool):
            embeddings[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        metadata = {
            "format": STORE_FORMAT,
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint),
            "timeframes": list(engine.timeframes),
            "pool": pool,
            "seq_len": engine.seq_len,
            "stride": stride,
            "normalizer_train_period": (
                None
                if engine.normalizer.train_period is None
                else list(engine.normalizer.train_period)
            ),
        }
        return cls(sampler.anchor_ns[window_ids], embeddings, metadata, max_staleness)

    def save(self, path: str | Path) -> Path:
        """Parquet (``timestamp`` + ``e0..e{dim-1}`` float32, as ``stage1 encode`` writes) with
        the metadata as JSON under the key ``stage1``; written atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            writer = _ParquetWriter(tmp, self.dim, self.metadata)
            try:
                for first in range(0, len(self), writer.group_rows):
                    rows = slice(first, first + writer.group_rows)
                    writer.write(_utc_index(self.anchor_ns[rows]), self.embeddings[rows])
            finally:
                writer.close()
        return path

    @classmethod
    def load(
        cls, path: str | Path, max_staleness: str | pd.Timedelta | None = "default"
    ) -> EmbeddingStore:
        """Read :meth:`save` output (or a ``stage1 encode`` Parquet file)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: embedding store file not found")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(f"{path}: not a readable Parquet file ({exc})") from exc
        raw_meta = (table.schema.metadata or {}).get(b"stage1")
        if raw_meta is None or "timestamp" not in table.column_names:
            raise ConfigError(
                f"{path}: not an embedding store (needs a `timestamp` column and `stage1` metadata)"
            )
        metadata = json.loads(raw_meta)
        names = [name for name in table.column_names if name != "timestamp"]
        times = table.column("timestamp").cast(pa.timestamp("ns", tz="UTC"))
        anchor_ns = times.to_numpy().view(np.int64)
        embeddings = np.empty((table.num_rows, len(names)), dtype=np.float32)
        for j, name in enumerate(names):
            embeddings[:, j] = table.column(name).to_numpy()
        return cls(anchor_ns, embeddings, metadata, max_staleness)

    # ------------------------------------------------------------------------ lookups
    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.anchor_ns)

    @property
    def index(self) -> pd.DatetimeIndex:
        """Anchor times, ``datetime64[ns, UTC]``."""
        return _utc_index(self.anchor_ns)

    def to_frame(self) -> pd.DataFrame:
        """``[N, dim]`` frame indexed by anchor time, columns ``e0..e{dim-1}``."""
        columns = [f"e{j}" for j in range(self.dim)]
        return pd.DataFrame(self.embeddings, index=self.index, columns=columns)

    def positions(self, timestamps: Times) -> npt.NDArray[np.int64]:
        """Row of the newest usable anchor at or before each time; -1 where none is usable."""
        return asof_positions(self.anchor_ns, times_to_ns(timestamps), self.max_staleness_ns)

    def _row(self, ts: TimeLike) -> int:
        t_ns = to_utc_ns(ts, "ts")
        if t_ns is None:
            raise ConfigError("ts: a time is required")
        row = int(asof_positions(self.anchor_ns, np.array([t_ns]), self.max_staleness_ns)[0])
        if row < 0:
            raise EmbeddingUnavailableError(
                "no embedding at " + unavailable_reason(self.anchor_ns, t_ns, self.max_staleness_ns)
            )
        return row

    def asof(self, ts: TimeLike) -> npt.NDArray[np.float32]:
        """Embedding ``[dim]`` of the newest anchor at or before ``ts`` (see the module
        docstring for when there is none)."""
        return self.embeddings[self._row(ts)].copy()

    def anchor_asof(self, ts: TimeLike) -> pd.Timestamp:
        """The anchor time :meth:`asof` uses for ``ts``."""
        return pd.Timestamp(int(self.anchor_ns[self._row(ts)]), tz="UTC")

    def asof_many(self, timestamps: Times, missing: str = "raise") -> npt.NDArray[np.float32]:
        """``[len(timestamps), dim]``, row i as ``asof(timestamps[i])``. ``missing='raise'``:
        an unavailable time is an error naming the first one; ``'nan'``: its row is NaN."""
        if missing not in ("raise", "nan"):
            raise ConfigError(f"missing: {missing!r} is not one of 'raise', 'nan'")
        times_ns = times_to_ns(timestamps)
        rows = asof_positions(self.anchor_ns, times_ns, self.max_staleness_ns)
        bad = rows < 0
        if missing == "raise" and bad.any():
            first = int(np.argmax(bad))
            raise EmbeddingUnavailableError(
                f"timestamps[{first}]: no embedding at "
                + unavailable_reason(self.anchor_ns, int(times_ns[first]), self.max_staleness_ns)
                + f" ({int(bad.sum())} of {len(rows)} times unavailable; missing='nan' marks them)"
            )
        out = self.embeddings[np.maximum(rows, 0)]
        out[bad] = np.nan
        return out

    def window(self, ts: TimeLike, n: int) -> npt.NDArray[np.float32]:
        """The ``n`` newest embeddings at or before ``ts``, oldest first: ``[n, dim]``."""
        if n < 1:
            raise ConfigError(f"n: must be >= 1, got {n}")
        row = self._row(ts)
        if row + 1 < n:
            raise EmbeddingUnavailableError(
                f"window({ts}, n={n}): only {row + 1} anchors at or before it "
                f"(the store starts at {_fmt(self.anchor_ns[0])})"
            )
        return self.embeddings[row + 1 - n : row + 1].copy()
