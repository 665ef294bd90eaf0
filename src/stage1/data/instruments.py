"""Instruments: names guessed from vendor file names, pip sizes, and data roots that hold one
prepared directory per instrument (``ROOT/EURUSD/{tf}.parquet``, ``ROOT/USDJPY/...``).

A data directory is either one instrument (it holds the ``{tf}.parquet`` files itself) or a root
(its subdirectories do). Instruments are named by their ``manifest.json`` (``stage1 prepare
--instrument``), else by their directory name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow
import pyarrow.parquet as pq

from stage1.data.bar_blocks import BarBlocks
from stage1.data.io import OHLC, file_sha256, find_tf_file, read_bars, validate_bars
from stage1.data.timeframes import sort_timeframes
from stage1.errors import ConfigError, DataValidationError

MANIFEST = "manifest.json"
# What ``data_dir`` may be: one directory (an instrument or a root) or several.
DataDirs: TypeAlias = str | Path | Sequence[str | Path]
# ISO 4217 codes of traded currencies and metals: a 6-letter token of two of them is a pair.
_CODES = "USD EUR JPY GBP CHF AUD NZD CAD SEK NOK DKK PLN HUF CZK TRY ZAR MXN SGD HKD CNH CNY RUB"
_CURRENCIES = frozenset(f"{_CODES} INR KRW THB ILS BRL XAU XAG XPT XPD".split(" "))
_HISTDATA_NAME = re.compile(r"DAT_(?:ASCII|MT|NT|XLSX)_([A-Z0-9]+)_M1", re.IGNORECASE)
_PAIR_TOKEN = re.compile(r"(?<![A-Za-z])([A-Za-z]{6})(?![A-Za-z])")


def guess_instrument(name: str) -> str | None:
    """Instrument in a file name: ``DAT_ASCII_EURUSD_M1_2019.csv`` → ``EURUSD``,
    ``usdjpy_m1_2017.parquet`` → ``USDJPY``; None when the name holds no pair."""
    match = _HISTDATA_NAME.search(name)
    if match:
        return match.group(1).upper()
    for token in _PAIR_TOKEN.findall(name):
        token = token.upper()
        if token[:3] in _CURRENCIES and token[3:] in _CURRENCIES:
            return token
    return None


def pip_size(median_price: float, instrument: str | None = None) -> float:
    """Pip of an instrument: 0.01 for JPY-quoted pairs (by name, else a median price above 20),
    0.0001 otherwise."""
    if instrument is not None and len(instrument) == 6 and instrument[3:] in _CURRENCIES:
        return 0.01 if instrument[3:] == "JPY" else 0.0001
    return 0.01 if median_price > 20 else 0.0001


@dataclass(frozen=True)
class Instrument:
    """One prepared data directory: its name and where it is."""

    name: str
    path: Path

    def manifest(self) -> dict | None:
        """The directory's ``manifest.json`` (``stage1 prepare``), or None if absent/unreadable."""
        path = self.path / MANIFEST
        try:
            manifest = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None
        return manifest if isinstance(manifest, dict) else None


def _has_bars(directory: Path) -> bool:
    return any(
        p.suffix.lower() == ".parquet" and not p.name.startswith(".") for p in directory.iterdir()
    )


def _name_of(directory: Path) -> str:
    name = (Instrument(directory.name, directory).manifest() or {}).get("instrument")
    return str(name) if name else directory.name


def find_instruments(
    data_dirs: DataDirs,
    timeframes: Sequence[str],
    selected: Sequence[str] | None = None,
) -> list[Instrument]:
    """The instruments in one or several data directories, each one instrument or a root of
    instrument directories, in name order; ``selected`` keeps only those names (an unknown one is
    an error). Every instrument must have a file for every timeframe."""
    dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    found: dict[str, Instrument] = {}
    for data_dir in map(Path, dirs):
        if not data_dir.is_dir():
            raise DataValidationError(
                f"{data_dir}: data directory not found (see `stage1 prepare`)"
            )
        if _has_bars(data_dir):
            candidates = [data_dir]
        else:
            candidates = sorted(d for d in data_dir.iterdir() if d.is_dir() and _has_bars(d))
            if not candidates:
                raise DataValidationError(
                    f"{data_dir}: no .parquet bars here and no instrument directory below "
                    "(expected {tf}.parquet files, or ROOT/<instrument>/{tf}.parquet)"
                )
        for directory in candidates:
            name = _name_of(directory)
            if name in found:
                raise DataValidationError(
                    f"instrument {name}: found twice ({found[name].path} and {directory}); "
                    "keep one directory per instrument"
                )
            found[name] = Instrument(name, directory)
    if selected is not None:
        unknown = [name for name in selected if name not in found]
        if unknown:
            raise ConfigError(
                f"data.instruments: {unknown} not found in {', '.join(map(str, dirs))} "
                f"(found: {', '.join(sorted(found))})"
            )
        found = {name: found[name] for name in selected}
    instruments = [found[name] for name in sorted(found)]
    for instrument in instruments:
        _tf_files(instrument, timeframes)
    return instruments


def balanced_order(
    groups: npt.NDArray[np.integer], rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """An epoch of ``len(groups)`` positions in which every group is drawn equally often:
    positions of each group shuffled and cycled (small groups repeat, large ones are subsampled,
    a different subset each epoch), then all shuffled together."""
    n = len(groups)
    labels, counts = np.unique(groups, return_counts=True)
    quota = np.full(len(labels), n // len(labels))
    quota[: n - quota.sum()] += 1
    by_group = np.argsort(groups, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)))
    picks = []
    for g in range(len(labels)):
        members = by_group[starts[g] : starts[g + 1]]
        repeats = -(-quota[g] // counts[g])
        cycled = np.concatenate([rng.permutation(members) for _ in range(repeats)])
        picks.append(cycled[: quota[g]])
    return rng.permutation(np.concatenate(picks)).astype(np.int64)


# ------------------------------------------------------------------------------ bar arrays
# Bump when the cached bar files' layout or meaning changes, so old ones are never read.
BARS_FORMAT_VERSION = 1
_BLOCKS_FILE = "blocks.json"


def _tf_files(instrument: Instrument, timeframes: Sequence[str]) -> list[Path]:
    try:
        return [find_tf_file(instrument.path, tf) for tf in timeframes]
    except DataValidationError as exc:
        raise DataValidationError(f"instrument {instrument.name}: {exc}") from exc


def _read_arrays(path: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """One timeframe file, validated (SPEC §1): open times int64 ns, OHLC float64 ``[rows, 4]``."""
    bars = read_bars(path)
    validate_bars(bars, str(path))
    open_ns = np.asarray(pd.DatetimeIndex(bars.index).as_unit("ns").asi8, dtype=np.int64)
    ohlc = np.ascontiguousarray(bars[list(OHLC)].to_numpy(dtype=np.float64))
    del bars
    # Reading Parquet leaves Arrow's freed buffers cached in its allocator (about the size of
    # the data); give them back to the OS before the next file.
    pyarrow.default_memory_pool().release_unused()
    return open_ns, ohlc


def _bars_key(
    instruments: Sequence[Instrument], timeframes: Sequence[str], files: list[list[Path]]
) -> str:
    """Digest of the bar files' bytes (sha256 each, two at a time), the instruments and the
    timeframes: any change of content gives another key, so a stale cache cannot be read."""
    flat = [path for paths in files for path in paths]
    with ThreadPoolExecutor(max_workers=2) as pool:  # hashlib releases the GIL
        hashes = iter(pool.map(file_sha256, flat))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"bars-v{BARS_FORMAT_VERSION}|{list(timeframes)}".encode())
    for instrument, paths in zip(instruments, files, strict=True):
        for tf, _ in zip(timeframes, paths, strict=True):
            digest.update(f"|{instrument.name}|{tf}|{next(hashes)}".encode())
    return digest.hexdigest()


def _starts(rows: list[list[int]]) -> npt.NDArray[np.int64]:
    """Block starts ``[n_instruments + 1, n_tf]`` from rows per instrument and timeframe."""
    counts = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    return np.concatenate([np.zeros((1, counts.shape[1]), np.int64), np.cumsum(counts, axis=0)])


def _blocks_in_memory(
    instruments: Sequence[Instrument], timeframes: list[str], files: list[list[Path]]
) -> BarBlocks:
    arrays = [[_read_arrays(path) for path in paths] for paths in files]
    open_ns, ohlc = [], []
    for k in range(len(timeframes)):
        parts = [per_tf[k] for per_tf in arrays]
        open_ns.append(parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts]))
        ohlc.append(parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts]))
    starts = _starts([[len(per_tf[k][0]) for k in range(len(timeframes))] for per_tf in arrays])
    return BarBlocks(timeframes, open_ns, ohlc, [i.name for i in instruments], starts)


def _build_cached(
    directory: Path,
    instruments: Sequence[Instrument],
    timeframes: list[str],
    files: list[list[Path]],
) -> None:
    """Write the bars of every instrument into one ``.npy`` pair per timeframe (open times,
    OHLC) in a temporary directory, one file at a time, then rename it into place."""
    rows = [[pq.ParquetFile(path).metadata.num_rows for path in paths] for paths in files]
    starts = _starts(rows)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        mapped = []
        for k, tf in enumerate(timeframes):
            total = int(starts[-1, k])
            open_file = tmp / f"{tf}_open.npy"
            ohlc_file = tmp / f"{tf}_ohlc.npy"
            mapped.append(
                (
                    np.lib.format.open_memmap(open_file, "w+", np.int64, (total,)),
                    np.lib.format.open_memmap(ohlc_file, "w+", np.float64, (total, 4)),
                )
            )
        for i, paths in enumerate(files):
            for k, path in enumerate(paths):
                open_ns, ohlc = _read_arrays(path)
                if len(open_ns) != rows[i][k]:
                    raise DataValidationError(f"{path}: changed while it was being read")
                block = slice(int(starts[i, k]), int(starts[i + 1, k]))
                mapped[k][0][block], mapped[k][1][block] = open_ns, ohlc
        for arrays in mapped:
            for array in arrays:
                array.flush()
        del mapped
        meta = {
            "instruments": [instrument.name for instrument in instruments],
            "timeframes": timeframes,
            "starts": starts.tolist(),
            "sources": [[str(path) for path in paths] for paths in files],
        }
        (tmp / _BLOCKS_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        tmp.chmod(0o755)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (directory / _BLOCKS_FILE).is_file():
                raise
            # Another process (a DDP rank) published the same content first: keep its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_cached(
    directory: Path, instruments: Sequence[Instrument], timeframes: list[str], key: str
) -> BarBlocks:
    """The cached bars, memory-mapped read-only; ValueError if they do not fit."""
    meta = json.loads((directory / _BLOCKS_FILE).read_text())
    names = [instrument.name for instrument in instruments]
    if meta["instruments"] != names or meta["timeframes"] != timeframes:
        raise ValueError("instruments or timeframes differ from the request")
    starts = np.asarray(meta["starts"], dtype=np.int64)
    if starts.shape != (len(names) + 1, len(timeframes)):
        raise ValueError(f"block table has shape {starts.shape}")
    open_ns, ohlc = [], []
    for k, tf in enumerate(timeframes):
        times = np.load(directory / f"{tf}_open.npy", mmap_mode="r", allow_pickle=False)
        prices = np.load(directory / f"{tf}_ohlc.npy", mmap_mode="r", allow_pickle=False)
        rows = int(starts[-1, k])
        if times.shape != (rows,) or times.dtype != np.int64:
            raise ValueError(f"{tf}_open.npy has shape {times.shape} {times.dtype}, not ({rows},)")
        if prices.shape != (rows, 4) or prices.dtype != np.float64:
            raise ValueError(f"{tf}_ohlc.npy has shape {prices.shape}, not ({rows}, 4)")
        open_ns.append(times)
        ohlc.append(prices)
    return BarBlocks(timeframes, open_ns, ohlc, names, starts, content_key=key)


def load_bar_blocks(
    instruments: Sequence[Instrument],
    timeframes: Sequence[str],
    cache_dir: str | Path | None = None,
) -> BarBlocks:
    """Every instrument's bars for ``timeframes`` in one row space per timeframe.

    Without ``cache_dir``: read and validated into memory. With it: memory-mapped ``.npy`` files
    in ``cache_dir/bars_<key>/``, built once (validated, written to a temporary directory and
    renamed) and keyed by the sha256 of every bar file's bytes, the instrument names and the
    timeframes; a cache that does not fit is rebuilt with a warning. Pages of a memory-mapped
    file are shared by every process that maps it (DDP ranks on one node) and are not
    anonymous memory.
    """
    ordered = sort_timeframes(list(timeframes))
    files = [_tf_files(instrument, ordered) for instrument in instruments]
    if cache_dir is None:
        return _blocks_in_memory(instruments, ordered, files)
    key = _bars_key(instruments, ordered, files)
    directory = Path(cache_dir) / f"bars_{key}"
    if directory.is_dir():
        try:
            return _open_cached(directory, instruments, ordered, key)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            warnings.warn(
                f"bar cache {directory} is unreadable ({exc}); rebuilding it", stacklevel=2
            )
            shutil.rmtree(directory, ignore_errors=True)
    _build_cached(directory, instruments, ordered, files)
    return _open_cached(directory, instruments, ordered, key)
