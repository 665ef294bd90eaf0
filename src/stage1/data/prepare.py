"""``stage1 prepare``: raw M1 bars (CSV or Parquet) -> one Parquet per timeframe + manifest.json.

Layouts read (``--format auto`` picks one from the file's first line):

* ``generic``: CSV or Parquet with a time column (``timestamp``, ``time``, ``datetime``, or
  ``date`` + ``time``) or a DatetimeIndex, plus open/high/low/close[/volume]; headers are
  case-insensitive; a headerless CSV ``2019-01-02 00:00:00,o,h,l,c[,v]`` also works.
* ``histdata``: HistData Generic ASCII, ``YYYYMMDD HHMMSS;open;high;low;close;volume``, no header.
* ``mt``: MetaTrader exports: ``Date,Time,Open,High,Low,Close,Volume`` (or ``<DATE>\\t<TIME>...``)
  with a header, or ``2019.01.02,00:00,o,h,l,c,v`` without one.

Labels are converted from ``--tz`` to UTC. A label that a DST change makes ambiguous is resolved
by its order in the file (the repeated hour's first pass is summer time); a label that DST skips,
or an ambiguous one whose order does not tell, is an error. The M1 bars are validated (SPEC §1)
before anything is derived, and the output directory appears only when everything succeeded.

Several inputs of one instrument (yearly or monthly vendor files, or a quoted glob) are read one by
one and concatenated in time order. Files must cover disjoint periods: a bar of one file at or
before the last bar of another is an error naming both files, unless ``overlap="identical"``, which
keeps a bar that several files hold once when they agree exactly and still rejects any difference.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

import stage1
from stage1.data.instruments import guess_instrument, pip_size
from stage1.data.io import (
    OHLC,
    TIME_COLUMN,
    aggregate_bars,
    bars_from_frame,
    file_sha256,
    read_parquet_frame,
    validate_bars,
    write_bars,
)
from stage1.data.timeframes import NS_PER_MINUTE, sort_timeframes, tf_minutes
from stage1.errors import DataValidationError, Stage1Error

logger = logging.getLogger(__name__)

DEFAULT_TIMEFRAMES = ("m1", "m5", "m15", "m30", "h1", "h4")
FORMATS = ("auto", "generic", "histdata", "mt")
OVERLAP_RULES = ("error", "identical")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "stage1-derived-v1"
_PROGRESS_MIN_BYTES = 20 << 20  # show a progress bar for inputs of 20 MB and more

# The FX week opens Sunday 17:00 New York time; weekly opens within an hour of it fit.
NEW_YORK = "America/New_York"
_WEEK_MINUTES = 7 * 1440
_SUNDAY_1700_MINUTES = 6 * 1440 + 17 * 60  # minutes after Monday 00:00
_OPEN_TOLERANCE_MINUTES = 60
_BREAK_NS = 24 * 60 * NS_PER_MINUTE
# Zones whose labels users most often mistake for another; tried when the open does not fit.
_CANDIDATE_ZONES = (
    "UTC",
    "America/New_York",
    "Etc/GMT+5",
    "America/Chicago",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Athens",
    "Europe/Moscow",
    "Asia/Tokyo",
    "Asia/Singapore",
    "Australia/Sydney",
)
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

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


def _check_tz(tz: str) -> None:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise Stage1Error(
            f"--tz {tz!r} is not an IANA time zone name (e.g. UTC, America/New_York, Europe/London)"
        ) from exc


def _check_timeframes(timeframes: Sequence[str]) -> list[str]:
    names = [str(tf).lower() for tf in timeframes]
    if not names:
        raise Stage1Error("--timeframes: give at least one timeframe (e.g. m1 m5 h1)")
    try:
        ordered = sort_timeframes(names)
    except ValueError as exc:
        raise Stage1Error(f"--timeframes: {exc}") from exc
    if len(set(ordered)) != len(ordered):
        raise Stage1Error(f"--timeframes: duplicate entries in {names}")
    return ordered


def _check_destination(input_paths: Sequence[Path], out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise Stage1Error(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise Stage1Error(
                f"{out_dir}: already exists and is not empty; pass --force to replace it"
            )
        for input_path in input_paths:
            if out_dir.resolve() in input_path.resolve().parents:
                raise Stage1Error(
                    f"{out_dir}: holds the input file {input_path}; --force would delete it"
                )


def expand_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Input files: paths as given, and glob patterns (``'DAT_ASCII_EURUSD_M1_20*.csv'``,
    quoted so the shell leaves them alone) expanded in name order. A pattern that matches
    nothing, or a file named twice, is an error."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise Stage1Error("--input: give at least one file")
    paths: list[Path] = []
    for item in map(str, items):
        if not Path(item).exists() and glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataValidationError(f"{item}: no input file matches this pattern")
            paths.extend(map(Path, matches))
        else:
            paths.append(Path(item))
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            raise Stage1Error(f"--input: {path} is given twice (as {seen[key]} and {path})")
        seen[key] = path
    return paths


def instrument_from_names(paths: Sequence[Path]) -> str | None:
    """The instrument all input file names agree on (None when no name holds one); names that
    disagree are an error naming two of them."""
    guesses = {path: guess_instrument(path.name) for path in paths}
    named = {path: name for path, name in guesses.items() if name is not None}
    if len(set(named.values())) > 1:
        (a, name_a), (b, name_b) = next(
            (x, y) for x, y in itertools.combinations(named.items(), 2) if x[1] != y[1]
        )
        raise DataValidationError(
            f"{a.name} looks like {name_a} but {b.name} like {name_b}: one prepare takes the "
            "files of one instrument (or give --instrument NAME)"
        )
    return next(iter(named.values()), None)


def _concatenate(parts: list[tuple[Path, pd.DataFrame]], overlap: str) -> pd.DataFrame:
    """Bars of several files of one instrument, ``parts`` sorted by first bar, as one frame in
    time order (see the module docstring for the overlap rule)."""
    if len(parts) == 1:
        return parts[0][1]
    if overlap == "error":
        for (path_a, a), (path_b, b) in itertools.pairwise(parts):
            if b.index[0] <= a.index[-1]:
                raise DataValidationError(
                    f"{path_a} and {path_b} overlap: {path_b.name} starts at {b.index[0]}, "
                    f"before {path_a.name} ends at {a.index[-1]} (rule: input files cover "
                    "disjoint periods; --overlap identical keeps bars both files hold alike)"
                )
        return pd.concat([bars for _, bars in parts])
    source = np.concatenate([np.full(len(bars), i) for i, (_, bars) in enumerate(parts)])
    merged = pd.concat([bars for _, bars in parts])
    order = np.argsort(pd.DatetimeIndex(merged.index).asi8, kind="stable")
    merged, source = merged.iloc[order], source[order]
    repeat = np.flatnonzero(np.diff(pd.DatetimeIndex(merged.index).asi8) == 0) + 1
    values = merged.to_numpy()
    differs = repeat[(values[repeat] != values[repeat - 1]).any(axis=1)]
    if len(differs):
        row = int(differs[0])
        path_a, path_b = parts[source[row - 1]][0], parts[source[row]][0]
        raise DataValidationError(
            f"{path_a} and {path_b} hold different bars at {merged.index[row]} "
            f"(rule: --overlap identical keeps a repeated bar only when the files agree exactly)"
        )
    keep = np.ones(len(merged), dtype=bool)
    keep[repeat] = False
    return merged[keep]


def _minute_of_week(index: pd.DatetimeIndex) -> np.ndarray:
    return np.asarray(index.day_of_week * 1440 + index.hour * 60 + index.minute, dtype=np.int64)


def _open_offsets(opens_new_york: pd.DatetimeIndex) -> np.ndarray:
    """Signed minutes from the nearest Sunday 17:00 New York to each weekly open."""
    offset = (_minute_of_week(opens_new_york) - _SUNDAY_1700_MINUTES) % _WEEK_MINUTES
    return np.where(offset > _WEEK_MINUTES // 2, offset - _WEEK_MINUTES, offset)


def _mode_hour(index: pd.DatetimeIndex) -> tuple[str, float]:
    keys = pd.Series(index.day_of_week * 24 + index.hour)
    counts = keys.value_counts()
    key = int(counts.index[0])
    return f"{_DAY_NAMES[key // 24]} {key % 24:02d}:00", float(counts.iloc[0] / len(keys))


def weekly_open_report(index: pd.DatetimeIndex, tz: str = "UTC") -> dict[str, Any]:
    """Where the first bar after each break of more than 24 h lands, in UTC and New York time.

    ``fits`` is False when most weekly opens miss Sunday 17:00 New York ±1 h; then
    ``suggested_tz`` names the common zone whose reading of the same labels fits best, if any.
    """
    index = pd.DatetimeIndex(index).as_unit("ns")
    opens = index[np.flatnonzero(np.diff(index.asi8) > _BREAK_NS) + 1]
    report: dict[str, Any] = {"weekly_opens": len(opens)}
    if len(opens) == 0:
        return report | {"fits": None, "message": "no break over 24 h: weekly open not checked"}
    new_york = opens.tz_convert(NEW_YORK)
    utc_mode, utc_share = _mode_hour(opens)
    ny_mode, ny_share = _mode_hour(new_york)
    fit = float(np.mean(np.abs(_open_offsets(new_york)) <= _OPEN_TOLERANCE_MINUTES))
    report |= {
        "utc_mode": utc_mode,
        "utc_mode_share": round(utc_share, 4),
        "new_york_mode": ny_mode,
        "new_york_mode_share": round(ny_share, 4),
        "fit_share": round(fit, 4),
        "fits": fit >= 0.5,
        "suggested_tz": None,
    }
    summary = (
        f"weekly open (first bar after each of {len(opens)} breaks > 24 h): {ny_mode} New York "
        f"in {ny_share:.0%} of weeks ({utc_mode} UTC: {utc_share:.0%}); "
        f"{fit:.0%} within 1 h of Sunday 17:00 New York"
    )
    if report["fits"]:
        return report | {"message": summary}
    labels = opens.tz_convert(tz).tz_localize(None)
    scores = {}  # zone -> (share of opens that fit, -mean |offset|): the closest fit wins ties
    for zone in _CANDIDATE_ZONES:
        if zone == tz:
            continue
        local = labels.tz_localize(zone, ambiguous="NaT", nonexistent="NaT").dropna()
        offsets = np.abs(_open_offsets(local.tz_convert(NEW_YORK)))
        fits = offsets <= _OPEN_TOLERANCE_MINUTES
        closeness = -float(offsets[fits].mean()) if fits.any() else -np.inf
        scores[zone] = (float(fits.sum()) / len(labels), closeness)
    best = max(scores, key=lambda zone: scores[zone])
    if scores[best][0] >= 0.8:
        report["suggested_tz"] = best
        advice = f"the labels look like {best} time read as {tz}: rerun with --tz {best}"
    else:
        advice = "no common time zone fits the labels either: check --tz and the source"
    return report | {
        "message": f"{summary}; FX opens Sunday 17:00 New York, so the time zone looks wrong: {advice}"
    }


def _tf_entry(bars: pd.DataFrame, path: Path) -> dict[str, Any]:
    return {
        "file": path.name,
        "rows": len(bars),
        "first_bar": bars.index[0].isoformat(),
        "last_bar": bars.index[-1].isoformat(),
        "sha256": file_sha256(path),
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished ``tmp_dir`` to ``out_dir``, replacing what was there."""
    if not out_dir.exists():
        os.replace(tmp_dir, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        os.replace(old / out_dir.name, out_dir)  # put the previous directory back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _source_entry(path: Path, bars: pd.DataFrame) -> dict[str, Any]:
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "rows": len(bars),
        "first_bar": bars.index[0].isoformat(),
        "last_bar": bars.index[-1].isoformat(),
    }


def prepare(
    input_path: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    tz: str = "UTC",
    fmt: str = "auto",
    timeframes: Sequence[str] = DEFAULT_TIMEFRAMES,
    force: bool = False,
    instrument: str | None = None,
    overlap: str = "error",
    require_instrument: bool = False,
) -> dict[str, Any]:
    """Convert the M1 file(s) of one instrument into a derived data directory; return the
    manifest (also saved).

    ``input_path``: a file, a glob pattern, or a list of them (concatenated in time order, see
    the module docstring). ``instrument``: written to the manifest with its pip size; None:
    guessed from the file names (``DAT_ASCII_EURUSD_M1_2019.csv``), else left null, or, with
    ``require_instrument`` (the CLI), an error once the bars are read and valid. Builds
    everything in a temporary directory beside ``out_dir`` and renames it into place at the
    end, so a failure leaves ``out_dir`` as it was (absent, or untouched). An existing,
    non-empty ``out_dir`` is replaced only with ``force``.
    """
    inputs, out_dir = expand_inputs(input_path), Path(out_dir)
    ordered = _check_timeframes(timeframes)
    _check_tz(tz)
    if overlap not in OVERLAP_RULES:
        raise Stage1Error(f"--overlap {overlap!r}: expected one of {', '.join(OVERLAP_RULES)}")
    if instrument is None:
        instrument = instrument_from_names(inputs)
    _check_destination(inputs, out_dir, force)
    size = sum(path.stat().st_size for path in inputs if path.is_file())
    with tqdm(
        total=len(inputs) + 1 + len(ordered),
        desc="prepare",
        unit="step",
        file=sys.stderr,
        disable=None if size >= _PROGRESS_MIN_BYTES else True,  # None: shown on a terminal only
    ) as progress:
        parts, formats = [], set()
        for path in inputs:
            progress.set_postfix_str(f"read + validate {path.name}")
            bars, detected, _ = read_m1(path, fmt, tz)
            parts.append((path, bars))
            formats.add(detected)
            progress.update(1)
        if instrument is None and require_instrument:
            names = ", ".join(str(path) for path in inputs)
            raise Stage1Error(
                f"--instrument: the file name(s) ({names}) do not name a pair such as EURUSD; "
                "give --instrument NAME"
            )
        parts.sort(key=lambda part: part[1].index[0])  # time order, whatever the input order
        m1 = _concatenate(parts, overlap)
        if len(parts) > 1:  # each file is valid; the seams must be too
            validate_bars(m1, " + ".join(str(path) for path in inputs))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp_dir.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal dir
        try:
            files: dict[str, Any] = {}
            for tf in ordered:
                progress.set_postfix_str(tf)
                bars = m1 if tf_minutes(tf) == 1 else aggregate_bars(m1, tf)
                path = tmp_dir / f"{tf}.parquet"
                write_bars(bars, path)
                files[tf] = _tf_entry(bars, path)
                progress.update(1)
            progress.set_postfix_str("manifest")
            weekly = weekly_open_report(pd.DatetimeIndex(m1.index), tz)
            if weekly["fits"] is False:
                logger.warning("%s: %s", inputs[0], weekly["message"])
            entries = [_source_entry(path, bars) for path, bars in parts]
            source: dict[str, Any] = dict(entries[0]) if len(entries) == 1 else {}
            source |= {
                "inputs": entries,
                "format": "+".join(sorted(formats)),
                "file_type": "+".join(
                    sorted({"parquet" if _is_parquet(path) else "text" for path in inputs})
                ),
                "tz": tz,
                "overlap": overlap,
                "rows": len(m1),
                "first_bar": m1.index[0].isoformat(),
                "last_bar": m1.index[-1].isoformat(),
            }
            manifest = {
                "format": MANIFEST_FORMAT,
                "stage1_version": stage1.__version__,
                "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "instrument": instrument,
                "pip_size": pip_size(float(np.median(m1["close"].to_numpy())), instrument),
                "source": source,
                "timeframes": ordered,
                "files": files,
                "weekly_open": weekly,
            }
            (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _publish(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        progress.update(1)
    return manifest


def format_summary(manifest: dict[str, Any], out_dir: str | Path) -> str:
    """A few lines for the terminal: source, rows per timeframe, period, weekly open."""
    source = manifest["source"]
    inputs = source["inputs"]
    origin = inputs[0]["path"] if len(inputs) == 1 else f"{len(inputs)} files"
    lines = [
        f"read {source['rows']:,} M1 bars of {manifest['instrument'] or 'an unnamed instrument'} "
        f"({source['format']}, labels in {source['tz']}) from {origin}",
        f"period (bar open, UTC): {source['first_bar']} -> {source['last_bar']}",
    ]
    for tf, entry in manifest["files"].items():
        lines.append(f"  {tf:>4}  {entry['rows']:>10,} bars  {entry['file']}")
    lines.append(manifest["weekly_open"]["message"])
    lines.append(f"wrote {out_dir} ({MANIFEST})")
    return "\n".join(lines)


def run_prepare(args: argparse.Namespace) -> None:
    """CLI entry point of ``stage1 prepare``."""
    manifest = prepare(
        args.input,
        args.out,
        tz=args.tz,
        fmt=args.format,
        timeframes=args.timeframes,
        force=args.force,
        instrument=args.instrument,
        overlap=args.overlap,
        require_instrument=True,
    )
    print(format_summary(manifest, args.out))
