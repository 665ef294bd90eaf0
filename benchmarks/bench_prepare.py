"""How long `stage1 prepare` takes on 3.1 M M1 rows (about 8.5 years of bars) into six timeframes.

    python benchmarks/bench_prepare.py [--rows 3100000] [--repeats 3]

Generates synthetic M1 bars, writes them as Parquet, then times (median of --repeats runs):
the whole `prepare` (read, validate, aggregate, write six Parquet files + manifest, hashes), and,
as the same-run baseline, a plain pandas read + `resample` of the same file into the same
timeframes (no validation, nothing written). Also times validation and aggregation alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from stage1.data.io import aggregate_bars, validate_bars, write_bars
from stage1.data.prepare import prepare
from stage1.data.synthetic import generate_m1

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]
PANDAS_RULES = {"m5": "5min", "m15": "15min", "m30": "30min", "h1": "1h", "h4": "4h"}
AGG = {"open": "first", "high": "max", "low": "min", "close": "last"}


def median_seconds(work: Callable[[int], object], repeats: int) -> float:
    times = []
    for run in range(repeats):
        start = time.perf_counter()
        work(run)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds(work: Callable[[int], object]) -> float:
    """CPU time of one run (all threads of this process): steadier than wall time on a busy host."""
    start = time.process_time()
    work(0)
    return time.process_time() - start


def pandas_baseline(source: Path) -> None:
    m1 = pd.read_parquet(source).set_index("timestamp")
    for rule in PANDAS_RULES.values():
        m1.resample(rule, label="left", closed="left").agg(AGG).dropna(how="all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"pandas {pd.__version__}"
    )
    start = time.perf_counter()
    bars = generate_m1(args.rows, seed=0)
    generate_s = time.perf_counter() - start
    print(f"generate_m1({args.rows:,}):                {generate_s:6.2f} s")

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        source = Path(tmp) / "m1.parquet"
        write_bars(bars, source)
        size_mb = source.stat().st_size / 1e6
        validate_s = median_seconds(lambda _: validate_bars(bars, "bench"), args.repeats)
        aggregate_s = median_seconds(
            lambda _: [aggregate_bars(bars, tf) for tf in TIMEFRAMES[1:]], args.repeats
        )

        def run_prepare(run: int) -> None:
            out = Path(tmp) / f"out{run}"
            prepare(source, out, timeframes=TIMEFRAMES)
            shutil.rmtree(out)

        prepare_s = median_seconds(run_prepare, args.repeats)
        prepare_cpu_s = cpu_seconds(run_prepare)
        baseline_s = median_seconds(lambda _: pandas_baseline(source), args.repeats)
        resample_s = median_seconds(
            lambda _: [
                bars.resample(rule, label="left", closed="left").agg(AGG).dropna(how="all")
                for rule in PANDAS_RULES.values()
            ],
            args.repeats,
        )

    print(f"validate_bars (in memory):             {validate_s:6.2f} s")
    print(f"aggregate_bars x5 (in memory):         {aggregate_s:6.2f} s")
    print(
        f"pandas resample x5 (in memory):        {resample_s:6.2f} s  ({resample_s / aggregate_s:.1f}x ours)"
    )
    print(f"baseline: pandas read + resample x5:   {baseline_s:6.2f} s")
    print(
        f"prepare {args.rows:,} rows ({size_mb:.0f} MB Parquet) -> {len(TIMEFRAMES)} timeframes: "
        f"{prepare_s:.2f} s (median of {args.repeats}; {prepare_s / baseline_s:.2f}x the baseline, "
        f"which validates and writes nothing); CPU time {prepare_cpu_s:.2f} s"
    )


if __name__ == "__main__":
    main()
