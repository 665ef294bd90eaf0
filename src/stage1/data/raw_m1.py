"""Reading one raw M1 file for ``stage1 prepare``: layout detection, time parsing, validation.

Layouts read (``--format auto`` picks one from the file's first line):

* ``generic``: CSV or Parquet with a time column (``timestamp``, ``time``, ``datetime``, or
  ``date`` + ``time``) or a DatetimeIndex, plus open/high/low/close[/volume]; headers are
  case-insensitive; a headerless CSV ``2019-01-02 00:00:00,o,h,l,c[,v]`` also works.
* ``histdata``: HistData Generic ASCII, ``YYYYMMDD HHMMSS;open;high;low;close;volume``, no header.
* ``mt``: MetaTrader exports: ``Date,Time,Open,High,Low,Close,Volume`` (or ``<DATE>\\t<TIME>...``)
  with a header, or ``2019.01.02,00:00,o,h,l,c,v`` without one.

Labels are converted from ``--tz`` to UTC. A label that a DST change makes ambiguous is resolved
by its order in the file (the repeated hour's first pass is summer time); a label that DST skips,
or an ambiguous one whose order does not tell, is an error. :func:`read_m1` validates the bars
(SPEC §1) and checks that they are M1 bars (whole minutes, mostly one minute apart).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stage1.data.io import OHLC, TIME_COLUMN, bars_from_frame, read_parquet_frame, validate_bars
from stage1.data.timeframes import NS_PER_MINUTE
from stage1.data.weekly_open import _WEEK_MINUTES
from stage1.errors import DataValidationError, Stage1Error

FORMATS = ("auto", "generic", "histdata", "mt")

_TIME_ALIASES = ("timestamp", "datetime", "date_time", "date time", "time", "gmt time", "date")
_HISTDATA_RE = re.compile(r"^\d{8} \d{6}$")
_DATE_RE = re.compile(r"^(\d{4})([.\-/])\d{2}\2\d{2}$")
_CLOCK_RE = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?$")
_DATETIME_RE = re.compile(r"^\d{4}[.\-/]\d{2}[.\-/]\d{2}[ T]\d{1,2}:\d{2}")
_DATETIME_FULL_RE = re.compile(r"^(\d{4}([.\-/])\d{2}\2\d{2})([ T])(\d{1,2}:\d{2}(?::\d{2})?)$")


@dataclass(frozen=True)
class _TextLayout:
    """How to read one text file: separator, header, and which columns hold the time."""

    fmt: str  # generic | histdata | mt
    sep: str
    header: bool
    names: list[str] | None  # column names for headerless files
    time_columns: tuple[str, ...]  # one column, or (date, time)
    time_format: str  # strptime format or "ISO8601"


def _text_head(path: Path, n_lines: int = 5) -> list[str]:
    with open(path, "rb") as handle:
        raw = handle.read(64 * 1024)
    if b"\x00" in raw:
        raise DataValidationError(
            f"{path}: not a price file (binary content; expected CSV/text or Parquet)"
        )
    text = raw.decode("utf-8-sig", errors="replace")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()][:n_lines]


def _split(line: str) -> tuple[str, list[str]]:
    sep = max((";", "\t", ","), key=line.count)
    return sep, [field.strip() for field in line.split(sep)]


def _clean_name(name: object) -> str:
    return str(name).strip().strip("<>").strip().lower()


def _date_format(date: str) -> str:
    match = _DATE_RE.match(date)
    sep = match.group(2) if match else "-"
    return f"%Y{sep}%m{sep}%d"


def _clock_format(clock: str) -> str:
    return "%H:%M:%S" if clock.count(":") == 2 else "%H:%M"


def _datetime_format(sample: str) -> str:
    """An exact strptime format for common one-field times (fast to parse), else ISO8601."""
    if _HISTDATA_RE.match(sample):
        return "%Y%m%d %H%M%S"
    match = _DATETIME_FULL_RE.match(sample)
    if match is None:
        return "ISO8601"
    date, _, sep, clock = match.groups()
    return f"{_date_format(date)}{sep}{_clock_format(clock)}"


def _detect_text_layout(path: Path, head: list[str]) -> _TextLayout:
    sep, fields = _split(head[0])
    shown = head[0][:80]
    if len(fields) < 5:
        raise DataValidationError(
            f"{path}: not a price file: first line {shown!r} is not M1 bars "
            "(expected time + open, high, low, close separated by ',', ';' or tab)"
        )
    extra = [f"extra_{i}" for i in range(len(fields))]
    if _HISTDATA_RE.match(fields[0]):
        names = ["datetime", *OHLC, *extra[5:]]
        return _TextLayout("histdata", sep, False, names, ("datetime",), "%Y%m%d %H%M%S")
    if _DATE_RE.match(fields[0]) and _CLOCK_RE.match(fields[1]) and len(fields) >= 6:
        names = ["date", "time", *OHLC, *extra[6:]]
        time_format = f"{_date_format(fields[0])} {_clock_format(fields[1])}"
        return _TextLayout("mt", sep, False, names, ("date", "time"), time_format)
    if _DATETIME_RE.match(fields[0]):
        names = ["timestamp", *OHLC, *extra[5:]]
        return _TextLayout(
            "generic", sep, False, names, ("timestamp",), _datetime_format(fields[0])
        )
    columns = [_clean_name(field) for field in fields]
    missing = [name for name in OHLC if name not in columns]
    if any(ch.isdigit() for ch in fields[0][:1]) or missing:
        raise DataValidationError(
            f"{path}: not a price file: first line {shown!r} is neither a header with "
            "open, high, low, close nor an M1 bar in a known layout (generic CSV, HistData "
            "'YYYYMMDD HHMMSS;o;h;l;c;v', MetaTrader 'YYYY.MM.DD,HH:MM,o,h,l,c,v')"
        )
    bracketed = fields[0].startswith("<")
    second = [field.strip() for field in head[1].split(sep)] if len(head) > 1 else []
    sample = dict(zip(columns, second, strict=False))  # column -> first data row's value
    if "date" in columns and "time" in columns:
        date, clock = sample.get("date", ""), sample.get("time", "")
        if _DATE_RE.match(date) and _CLOCK_RE.match(clock):
            time_format = f"{_date_format(date)} {_clock_format(clock)}"
        else:
            time_format = "ISO8601"
        # Date + Time columns are MetaTrader's export and a common generic layout alike.
        looks_mt = bracketed or _date_format(date) == "%Y.%m.%d"
        fmt = "mt" if looks_mt else "generic"
        return _TextLayout(fmt, sep, True, None, ("date", "time"), time_format)
    time_column = next((name for name in _TIME_ALIASES if name in columns), None)
    if time_column is None:
        raise DataValidationError(
            f"{path}: no time column (found: {', '.join(columns)}); name it timestamp, time, "
            "datetime, or give date and time columns"
        )
    time_format = _datetime_format(sample.get(time_column, ""))
    return _TextLayout(
        "mt" if bracketed else "generic", sep, True, None, (time_column,), time_format
    )


def _where(pos: int, line_offset: int) -> str:
    """``row 5 (line 7)`` for text files (line_offset = file line of row 0), ``row 5`` otherwise."""
    return f"row {pos} (line {pos + line_offset})" if line_offset else f"row {pos}"


def _parse_times(
    strings: pd.Series, time_format: str, source: str, line_offset: int
) -> pd.DatetimeIndex:
    if time_format == "ISO8601":
        sample = str(strings.iloc[0]) if len(strings) else ""
        has_offset = bool(re.search(r"(Z|[+-]\d{2}:?\d{2})$", sample))
        parsed = pd.to_datetime(strings, format="ISO8601", errors="coerce", utc=has_offset)
    else:  # Arrow's strptime is ~30x faster than pandas' for non-ISO formats
        array = pa.array(strings, type=pa.string(), from_pandas=True)
        parsed = pc.strptime(array, format=time_format, unit="ns", error_is_null=True).to_pandas()
    bad = np.flatnonzero(np.asarray(parsed.isna()))
    if len(bad):
        pos = int(bad[0])
        raise DataValidationError(
            f"{source}: {_where(pos, line_offset)}: time {strings.iloc[pos]!r} "
            f"does not parse as {time_format} (rule: every bar needs a valid open time)"
        )
    return pd.DatetimeIndex(parsed)


def _read_text(path: Path, fmt: str, tz: str) -> tuple[pd.DataFrame, str, int]:
    """Read a text file of M1 bars: (bars, detected format, file line of data row 0)."""
    if path.stat().st_size == 0:
        raise DataValidationError(f"{path}: file is empty (no bars)")
    head = _text_head(path)
    if not head:
        raise DataValidationError(f"{path}: file is empty (only blank lines)")
    layout = _detect_text_layout(path, head)
    fits = {layout.fmt} | ({"generic", "mt"} if len(layout.time_columns) == 2 else set())
    if fmt not in {"auto", *fits}:
        raise DataValidationError(
            f"{path}: --format {fmt} does not fit the first line {head[0][:80]!r}, which looks "
            f"like the {layout.fmt} layout (use --format auto)"
        )
    line_offset = 2 if layout.header else 1
    try:
        raw = pd.read_csv(
            path,
            sep=layout.sep,
            header=0 if layout.header else None,
            names=layout.names,
            index_col=False,
            dtype=dict.fromkeys(layout.time_columns, str) if layout.names else None,
            skipinitialspace=True,
            encoding="utf-8-sig",
            engine="c",
        )
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataValidationError(f"{path}: cannot read as {layout.fmt} CSV ({reason})") from exc
    if layout.header:
        raw.columns = [_clean_name(name) for name in raw.columns]
    if len(raw) == 0:
        raise DataValidationError(f"{path}: no bars (the file has a header but no data rows)")
    strings = raw[layout.time_columns[0]].astype(str)
    if len(layout.time_columns) == 2:
        strings = strings + " " + raw[layout.time_columns[1]].astype(str)
    times = _parse_times(strings, layout.time_format, str(path), line_offset)
    frame = raw[list(OHLC)].set_axis(times, axis=0)
    detected = layout.fmt if fmt == "auto" else fmt
    return bars_from_frame(frame, str(path), tz), detected, line_offset


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def _read_parquet(path: Path, tz: str) -> pd.DataFrame:
    """Generic Parquet: the bar layout of :func:`read_bars`, with the time-column aliases of CSV."""
    df = read_parquet_frame(path)
    columns = [_clean_name(name) for name in df.columns]
    if TIME_COLUMN not in columns and not isinstance(df.index, pd.DatetimeIndex):
        df = df.set_axis(columns, axis=1)
        if "date" in columns and "time" in columns:
            strings = df["date"].astype(str) + " " + df["time"].astype(str)
            df[TIME_COLUMN] = _parse_times(strings, "ISO8601", str(path), line_offset=0)
        else:
            alias = next((name for name in _TIME_ALIASES if name in columns), None)
            if alias is not None:
                df = df.rename(columns={alias: TIME_COLUMN})
    return bars_from_frame(df, str(path), tz)


def read_m1(path: str | Path, fmt: str = "auto", tz: str = "UTC") -> tuple[pd.DataFrame, str, int]:
    """Read and validate raw M1 bars: (bars in UTC, detected format, file line of row 0)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "input file not found"
        raise DataValidationError(f"{path}: {what}")
    if fmt not in FORMATS:
        raise Stage1Error(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if _is_parquet(path):
        if fmt not in ("auto", "generic"):
            raise DataValidationError(f"{path}: --format {fmt} reads text files; this is Parquet")
        bars = _read_parquet(path, tz)
        detected, line_offset = "generic", 0
    else:
        bars, detected, line_offset = _read_text(path, fmt, tz)
    validate_bars(bars, str(path), line_offset=line_offset or None)
    _check_minute_bars(bars, str(path), line_offset)
    return bars, detected, line_offset


def _check_minute_bars(bars: pd.DataFrame, source: str, line_offset: int) -> None:
    """Timestamps on whole minutes, spaced mostly one minute apart: M1, not ticks or M5."""
    ns = pd.DatetimeIndex(bars.index).asi8
    off = np.flatnonzero(ns % NS_PER_MINUTE)
    if len(off):
        pos = int(off[0])
        raise DataValidationError(
            f"{source}: {_where(pos, line_offset)}: timestamp {bars.index[pos]} is not on a "
            "whole minute (rule: M1 bars are labelled by their opening minute)"
        )
    if len(ns) > 1:
        step_minutes = np.minimum(np.diff(ns) // NS_PER_MINUTE, _WEEK_MINUTES)
        typical = int(np.argmax(np.bincount(step_minutes)))
        if typical != 1:
            raise DataValidationError(
                f"{source}: bars are typically {typical} minutes apart, so these are not M1 bars "
                "(rule: the input to prepare is 1-minute bars)"
            )
