"""Bars on disk: read a derived data directory, validate bars (SPEC §1), aggregate M1 to any timeframe.

A derived data directory holds one Parquet file per timeframe, ``{tf}.parquet`` or
``*_{tf}.parquet`` (the seed guide's ``simple_gap_aware_m30.parquet``). In memory a timeframe is
a DataFrame indexed by bar OPEN time (``datetime64[ns, UTC]``, named ``timestamp``) with float64
columns ``open, high, low, close``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stage1.data.timeframes import sort_timeframes, tf_ns
from stage1.errors import DataValidationError

logger = logging.getLogger(__name__)

OHLC = ("open", "high", "low", "close")
TIME_COLUMN = "timestamp"
EPOCH_HINT = (
    "the time looks like an integer row index read as nanoseconds since 1970; "
    "store the open time in a `timestamp` column or as a DatetimeIndex"
)
# No FX bar predates 1971: anything earlier is an integer mistaken for a time.
_EPOCH_LIMIT_NS = pd.Timestamp("1971-01-01", tz="UTC").value


def _fmt_time(value: pd.Timestamp) -> str:
    return "NaT" if pd.isna(value) else value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _row_label(pos: int, index: pd.Index, line_offset: int | None) -> str:
    """``row 12 (line 14, 2020-01-01 00:12:00 UTC)``: position in the frame, file line, time."""
    parts = [] if line_offset is None else [f"line {pos + line_offset}"]
    if isinstance(index, pd.DatetimeIndex):
        parts.append(_fmt_time(index[pos]))
    return f"row {pos}" + (f" ({', '.join(parts)})" if parts else "")


def _dst_error(naive: pd.DatetimeIndex, tz: str, source: str) -> DataValidationError:
    """Name the first label that does not exist, or is ambiguous without an order, in ``tz``."""
    marked = naive.tz_localize(tz, ambiguous="NaT", nonexistent="NaT")
    bad = np.flatnonzero(np.asarray(marked.isna()) & ~np.asarray(naive.isna()))
    pos = int(bad[0]) if len(bad) else 0
    label = naive[pos]
    single = pd.DatetimeIndex([label]).tz_localize(tz, ambiguous="NaT", nonexistent="shift_forward")
    if single.isna()[0]:
        why = (
            f"occurs twice in {tz} (DST fall-back) and the rows around it do not show "
            "which pass is meant"
        )
    else:
        why = f"does not exist in {tz} (skipped by the DST spring-forward change)"
    return DataValidationError(
        f"{source}: row {pos}: time label {label} {why}; FX is closed at DST changes, so "
        f"the labels are probably not {tz} time: check --tz"
    )


def to_utc_index(times: pd.Index | pd.Series, source: str, tz: str = "UTC") -> pd.DatetimeIndex:
    """Bar open times as a ``datetime64[ns, UTC]`` index named ``timestamp``.

    Tz-aware times are converted; naive times are labels in ``tz``. A label that DST makes
    ambiguous is resolved by order (the repeated hour's first pass is summer time, pandas'
    ``ambiguous='infer'``); a label that cannot be resolved, or that DST skips, is an error.
    Integer times are read as nanoseconds since 1970, so a row index shows up as 1970 and is
    reported with :data:`EPOCH_HINT`.
    """
    values = pd.Index(times)
    if not isinstance(values, pd.DatetimeIndex):
        try:
            if pd.api.types.is_numeric_dtype(values.dtype):
                values = pd.DatetimeIndex(pd.to_datetime(values, unit="ns"))
            else:
                values = pd.DatetimeIndex(pd.to_datetime(values, format="ISO8601"))
        except (ValueError, TypeError, OverflowError) as exc:
            reason = str(exc).splitlines()[0]
            raise DataValidationError(f"{source}: timestamps are not times ({reason})") from exc
    missing = np.flatnonzero(np.asarray(values.isna()))
    if len(missing):
        pos = int(missing[0])
        raise DataValidationError(
            f"{source}: row {pos}: timestamp is missing (rule: every bar needs an open time; "
            f"{len(missing)} rows lack one)"
        )
    if values.tz is not None and tz != "UTC":
        logger.warning("%s: times carry their own zone (%s); ignoring tz=%s", source, values.tz, tz)
    if values.tz is None:
        try:
            values = values.tz_localize(tz, ambiguous="infer", nonexistent="raise")
        except ValueError as exc:  # pandas raises ValueError for nonexistent/uninferable labels
            raise _dst_error(values, tz, source) from exc
    index = values.tz_convert("UTC").as_unit("ns").rename(TIME_COLUMN)
    if len(index) and int(index.asi8.min()) < _EPOCH_LIMIT_NS:
        pos = int(np.argmin(index.asi8))
        raise DataValidationError(
            f"{source}: row {pos}: timestamp {_fmt_time(index[pos])} is in 1970: {EPOCH_HINT}"
        )
    return index


def _as_float(column: pd.Series, name: str, source: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    numbers = pd.to_numeric(column, errors="coerce")
    bad = np.flatnonzero(np.asarray(numbers.isna()) & np.asarray(column.notna()))
    if len(bad):
        pos = int(bad[0])
        raise DataValidationError(
            f"{source}: row {pos}: {name} value {column.iloc[pos]!r} is not a number "
            "(rule: prices must be numbers)"
        )
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan)


def bars_from_frame(df: pd.DataFrame, source: str, tz: str = "UTC") -> pd.DataFrame:
    """Normalise a frame to the bar layout (UTC open-time index, float64 OHLC; other columns dropped).

    The time is the ``timestamp`` column if there is one (column names are case-insensitive),
    else the index when it is a ``DatetimeIndex``. Does not validate: see :func:`validate_bars`.
    """
    columns: dict[str, str] = {}
    for col in df.columns:
        columns.setdefault(str(col).strip().lower(), col)
    missing = [name for name in OHLC if name not in columns]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {', '.join(missing)} (found: "
            f"{', '.join(map(str, df.columns)) or 'none'}); rule: bars need open, high, low, close"
        )
    if TIME_COLUMN in columns:
        times: pd.Index | pd.Series = df[columns[TIME_COLUMN]]
    elif isinstance(df.index, pd.DatetimeIndex):
        times = df.index
    elif pd.api.types.is_integer_dtype(df.index.dtype):
        preview = ", ".join(map(str, df.index[:3]))
        raise DataValidationError(
            f"{source}: no `timestamp` column, and the index holds integers ({preview}, ...), "
            f"not times; read as times they would be 1970 dates: {EPOCH_HINT}"
        )
    else:
        raise DataValidationError(
            f"{source}: no `timestamp` column and the index is not a DatetimeIndex "
            f"(columns: {', '.join(map(str, df.columns))})"
        )
    index = to_utc_index(times, source, tz)
    data = {name: _as_float(df[columns[name]], name, source) for name in OHLC}
    return pd.DataFrame(data, index=index, copy=False)


def validate_bars(df: pd.DataFrame, source: str, line_offset: int | None = None) -> None:
    """Check the data contract (SPEC §1); raise :class:`DataValidationError` naming file, row, rule.

    Rules, in this order: columns present, at least one row, timestamps unique and increasing,
    prices finite and positive, ``high >= low``, ``high >= max(open, close)``,
    ``low <= min(open, close)``. Rows are 0-based positions; ``line_offset`` (file line of row 0)
    adds the line number for text files. Vectorised: millions of rows take milliseconds.
    """
    missing = [name for name in OHLC if name not in df.columns]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {', '.join(missing)} (rule: bars need open, high, low, close)"
        )
    if len(df) == 0:
        raise DataValidationError(f"{source}: no bars (the data has no rows)")
    index = df.index
    if not isinstance(index, pd.DatetimeIndex):
        raise DataValidationError(f"{source}: bars must be indexed by open time (a DatetimeIndex)")

    def fail(rows: np.ndarray, detail: str, rule: str) -> NoReturn:
        count = f"; {len(rows)} rows break it" if len(rows) > 1 else ""
        raise DataValidationError(
            f"{source}: {_row_label(int(rows[0]), index, line_offset)}: {detail} (rule: {rule}{count})"
        )

    step = np.diff(index.as_unit("ns").asi8)
    if (step <= 0).any():
        pos = int(np.argmax(step <= 0)) + 1
        if step[pos - 1] == 0:
            fail(
                np.flatnonzero(step == 0) + 1,
                f"duplicate timestamp (same as row {pos - 1})",
                "timestamps are unique",
            )
        fail(
            np.flatnonzero(step < 0) + 1,
            f"timestamp is earlier than row {pos - 1}'s ({_fmt_time(index[pos - 1])})",
            "timestamps increase",
        )

    prices = [df[name].to_numpy(dtype=np.float64) for name in OHLC]
    for rule, broken in (
        ("prices are finite numbers", lambda x: ~np.isfinite(x)),
        ("prices > 0", lambda x: ~(x > 0)),
    ):
        masks = [broken(column) for column in prices]
        rows = np.flatnonzero(masks[0] | masks[1] | masks[2] | masks[3])
        if len(rows):
            col = next(i for i, mask in enumerate(masks) if mask[rows[0]])
            fail(rows, f"{OHLC[col]} is {prices[col][rows[0]]}", rule)

    o, h, lo, c = prices
    for bad, rule in (
        (h < lo, "high >= low"),
        (h < np.maximum(o, c), "high >= max(open, close)"),
        (lo > np.minimum(o, c), "low <= min(open, close)"),
    ):
        rows = np.flatnonzero(bad)
        if len(rows):
            fail(
                rows,
                ", ".join(f"{n}={v[rows[0]]:g}" for n, v in zip(OHLC, prices, strict=True)),
                rule,
            )


def aggregate_bars(m1: pd.DataFrame, tf: str) -> pd.DataFrame:
    """Aggregate sorted bars to ``tf``: OHLC first/max/min/last, labelled by bin OPEN time.

    Bins are left-closed ``[t, t + tf)`` and aligned to the Unix epoch, so days start at 00:00
    UTC and every timeframe that divides a day starts on the day. Bins without input bars are
    dropped (gaps stay gaps). Equals ``resample(rule, label='left', closed='left',
    origin='epoch')`` with empty bins removed, at a fraction of its cost.
    """
    index = pd.DatetimeIndex(m1.index)
    if not index.is_monotonic_increasing:
        raise ValueError("aggregate_bars needs bars sorted by time (run validate_bars first)")
    ns = index.as_unit("ns").asi8
    bins = ns - np.mod(ns, tf_ns(tf))
    starts = np.flatnonzero(np.concatenate(([True], bins[1:] != bins[:-1])))[: len(ns)]
    ends = np.concatenate((starts[1:], [len(ns)]))[: len(starts)].astype(np.int64) - 1
    high, low = (m1[name].to_numpy(dtype=np.float64) for name in ("high", "low"))
    data = {
        "open": m1["open"].to_numpy(dtype=np.float64)[starts],
        "high": np.maximum.reduceat(high, starts) if len(ns) else high,
        "low": np.minimum.reduceat(low, starts) if len(ns) else low,
        "close": m1["close"].to_numpy(dtype=np.float64)[ends],
    }
    out_index = pd.DatetimeIndex(pd.to_datetime(bins[starts], unit="ns", utc=True))
    return pd.DataFrame(data, index=out_index.as_unit("ns").rename(TIME_COLUMN), copy=False)


def find_tf_file(data_dir: str | Path, tf: str) -> Path:
    """The one file for ``tf`` in ``data_dir``: ``{tf}.parquet`` or ``*_{tf}.parquet``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataValidationError(f"{data_dir}: data directory not found (see `stage1 prepare`)")
    tf = tf.lower()
    parquet = sorted(p for p in data_dir.iterdir() if p.suffix.lower() == ".parquet")
    matches = [
        p
        for p in parquet
        if not p.name.startswith(".")
        and (p.name.lower() == f"{tf}.parquet" or p.name.lower().endswith(f"_{tf}.parquet"))
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        found = ", ".join(p.name for p in parquet) or "no .parquet files"
        raise DataValidationError(
            f"{data_dir}: no file for timeframe {tf} (expected {tf}.parquet or *_{tf}.parquet; "
            f"found: {found})"
        )
    raise DataValidationError(
        f"{data_dir}: {len(matches)} files match timeframe {tf} "
        f"({', '.join(p.name for p in matches)}); keep exactly one"
    )


def read_bars(path: str | Path, tz: str = "UTC") -> pd.DataFrame:
    """Read one Parquet file of bars into the bar layout (not validated)."""
    return bars_from_frame(read_parquet_frame(path), str(path), tz)


def read_parquet_frame(path: str | Path) -> pd.DataFrame:
    """``pd.read_parquet`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: file not found")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataValidationError(f"{path}: not a readable Parquet file ({reason})") from exc


def load_tf_data(data_dir: str | Path, timeframes: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Read and validate one frame per timeframe, finest first (see the module docstring)."""
    frames: dict[str, pd.DataFrame] = {}
    for tf in sort_timeframes(timeframes):
        path = find_tf_file(data_dir, tf)
        bars = read_bars(path)
        validate_bars(bars, str(path))
        frames[tf] = bars
    return frames


def write_bars(bars: pd.DataFrame, path: str | Path) -> None:
    """Write bars as Parquet (zstd): a ``timestamp`` column (``timestamp[ns, UTC]``) + float64 OHLC."""
    index = pd.DatetimeIndex(bars.index).tz_convert("UTC").as_unit("ns")
    arrays = [pa.array(index, type=pa.timestamp("ns", tz="UTC"))]
    arrays += [pa.array(bars[name].to_numpy(dtype=np.float64)) for name in OHLC]
    table = pa.Table.from_arrays(arrays, names=[TIME_COLUMN, *OHLC])
    pq.write_table(table, path, compression="zstd")


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
