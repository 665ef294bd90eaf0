"""``stage1 prepare``: raw M1 bars (CSV or Parquet) -> one Parquet per timeframe + manifest.json.

The pipeline and its CLI entry: check the arguments, read and validate every input file
(:mod:`stage1.data.raw_m1`: layouts, time zones, M1 checks), join the files of one instrument
in time order (:mod:`stage1.data.raw_inputs`: globs, instrument from the file names, the
overlap rule), derive every timeframe, check the weekly open (:mod:`stage1.data.weekly_open`)
and write the manifest. The M1 bars are validated (SPEC §1) before anything is derived, and the
output directory appears only when everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd
from tqdm import tqdm

import stage1
from stage1.data.instruments import pip_size
from stage1.data.io import aggregate_bars, file_sha256, validate_bars, write_bars
from stage1.data.raw_inputs import (
    OVERLAP_RULES,
    _concatenate,
    expand_inputs,
    instrument_from_names,
)
from stage1.data.raw_m1 import _is_parquet, read_m1
from stage1.data.timeframes import sort_timeframes, tf_minutes
from stage1.data.weekly_open import weekly_open_report
from stage1.errors import Stage1Error

logger = logging.getLogger(__name__)

DEFAULT_TIMEFRAMES = ("m1", "m5", "m15", "m30", "h1", "h4")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "stage1-derived-v1"
_PROGRESS_MIN_BYTES = 20 << 20  # show a progress bar for inputs of 20 MB and more


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
    :mod:`stage1.data.raw_inputs`). ``instrument``: written to the manifest with its pip size;
    None: guessed from the file names (``DAT_ASCII_EURUSD_M1_2019.csv``), else left null, or, with
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
