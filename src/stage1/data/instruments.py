"""Instruments: names guessed from vendor file names, pip sizes, and data roots that hold one
prepared directory per instrument (``ROOT/EURUSD/{tf}.parquet``, ``ROOT/USDJPY/...``).

A data directory is either one instrument (it holds the ``{tf}.parquet`` files itself) or a root
(its subdirectories do). Instruments are named by their ``manifest.json`` (``stage1 prepare
--instrument``), else by their directory name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from stage1.data.io import find_tf_file
from stage1.errors import ConfigError, DataValidationError

MANIFEST = "manifest.json"
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
        path = self.path / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None


def _has_bars(directory: Path) -> bool:
    return any(
        p.suffix.lower() == ".parquet" and not p.name.startswith(".") for p in directory.iterdir()
    )


def _name_of(directory: Path) -> str:
    manifest = directory / MANIFEST
    if manifest.is_file():
        try:
            name = json.loads(manifest.read_text()).get("instrument")
        except (json.JSONDecodeError, AttributeError):
            name = None
        if name:
            return str(name)
    return directory.name


def find_instruments(
    data_dirs: str | Path | Sequence[str | Path],
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
        for tf in timeframes:
            try:
                find_tf_file(instrument.path, tf)
            except DataValidationError as exc:
                raise DataValidationError(f"instrument {instrument.name}: {exc}") from exc
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
