"""The input files of one ``stage1 prepare``: paths and globs, the instrument their names give,
and how the bars of several files join.

Several inputs of one instrument (yearly or monthly vendor files, or a quoted glob) are read one by
one and concatenated in time order. Files must cover disjoint periods: a bar of one file at or
before the last bar of another is an error naming both files, unless ``overlap="identical"``, which
keeps a bar that several files hold once when they agree exactly and still rejects any difference.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from stage1.data.instruments import guess_instrument
from stage1.errors import DataValidationError, Stage1Error

OVERLAP_RULES = ("error", "identical")


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
