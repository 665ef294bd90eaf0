"""Sampler index and batch assembly on 3.1 M synthetic M1 rows, six timeframes, seq_len 48.

Prints (SPEC §8 targets in brackets):
  cold index time, median of --repeats             [<= 1.5 s, <= 5x the searchsorted floor]
  bare np.searchsorted floor for the same anchors  (one call per timeframe, same run)
  cached index time, median of --repeats           [<= 0.2 s]
  batch assembly through Stage1DataModule's train loader: gather + features + normalisation
  + masks, one process, batch 1024, windows/s      [>= 50 000]
  peak RSS of a fresh process: load, index, one pass over every window   [<= 1.5 GB]

Usage: python benchmarks/bench_sampler.py [--rows 3100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule
from stage1.data.io import aggregate_bars, load_tf_data, write_bars
from stage1.data.masking import MaskingStrategy
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.synthetic import generate_m1
from stage1.data.timeframes import tf_ns

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


def bench_config(data_dir: Path, seq_len: int, batch_size: int, cache_dir: Path | None):
    overrides = [
        f"data.seq_len={seq_len}",
        f"training.batch_size={batch_size}",
        "dataloader.num_workers=0",
        "dataloader.pin_memory=false",
        "dataloader.persistent_workers=false",
    ]
    if cache_dir is not None:
        overrides.append(f"data.cache_dir={cache_dir}")
    return load_config("base", overrides)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def write_dataset(rows: int, out: Path) -> None:
    m1 = generate_m1(rows, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    for tf in TIMEFRAMES:
        write_bars(m1 if tf == "m1" else aggregate_bars(m1, tf), out / f"{tf}.parquet")


def assembly_rate(dm: Stage1DataModule, masking: MaskingStrategy, n_batches: int) -> float:
    """Windows/s of train-loader batches with masks drawn as the LightningModule does."""
    loader = iter(dm.train_dataloader())
    next(loader)  # warm-up
    count = 0
    start = time.perf_counter()
    for _ in range(n_batches):
        batch = next(loader)
        masking.generate(batch["times"])
        count += len(batch["window_ids"])
    return count / (time.perf_counter() - start)


def rss_child(data_dir: Path, seq_len: int, batch_size: int) -> None:
    """Fresh process: load, index, fit, then features + normalise + masks for EVERY window.

    Torch runs on one thread here: memory does not depend on it, and the pass is faster on a
    busy machine."""
    torch.set_num_threads(1)
    dm = Stage1DataModule(data_dir, bench_config(data_dir, seq_len, batch_size, None))
    dm.setup()
    assert dm.sampler is not None
    masking = MaskingStrategy(dm.config.masking, dm.sampler.timeframes, seq_len)
    n_windows = 0
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            masking.generate(batch["times"])
            n_windows += len(batch["window_ids"])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"{peak_mib:.0f} {n_windows} {len(dm.sampler)}")


def bench_index(frames: dict, seq_len: int, cache_dir: Path, repeats: int) -> None:
    cold, sampler = timed(lambda: MultiTFWindowSampler(frames, seq_len), repeats)
    assert isinstance(sampler, MultiTFWindowSampler)
    anchors = frames["m1"].index.as_unit("ns").asi8 + tf_ns("m1")
    closes = [df.index.as_unit("ns").asi8 + tf_ns(tf) for tf, df in frames.items()]
    floor, _ = timed(lambda: [np.searchsorted(c, anchors, side="right") for c in closes], repeats)
    print(f"windows: {len(sampler):,} of {len(anchors):,} anchors")
    print(f"cold index:   {cold:6.3f} s  (target <= 1.5 s)")
    print(f"searchsorted: {floor:6.3f} s  (floor: one call per timeframe for every anchor)")
    print(f"cold / floor: {cold / floor:6.2f} x  (target <= 5 x)")
    MultiTFWindowSampler(frames, seq_len, cache_dir=cache_dir)  # writes the cache
    cached, _ = timed(lambda: MultiTFWindowSampler(frames, seq_len, cache_dir=cache_dir), repeats)
    print(f"cached index: {cached:6.3f} s  (target <= 0.2 s, includes hashing the times)")


def bench_assembly(data_dir: Path, cache_dir: Path, args: argparse.Namespace) -> None:
    config = bench_config(data_dir, args.seq_len, args.batch_size, cache_dir)
    dm = Stage1DataModule(data_dir, config)
    start = time.perf_counter()
    dm.setup()
    assert dm.sampler is not None
    print(
        f"datamodule setup (load, cached index, splits, fit): {time.perf_counter() - start:.1f} s"
    )
    masking = MaskingStrategy(config.masking, dm.sampler.timeframes, args.seq_len)
    rate = statistics.median(
        assembly_rate(dm, masking, args.rate_batches) for _ in range(args.repeats)
    )
    print(
        f"batch assembly: {rate:8,.0f} windows/s  (batch {args.batch_size}, gather + features"
        " + normalise + masks, one process; target >= 50 000)"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rate_1 = statistics.median(
        assembly_rate(dm, masking, args.rate_batches) for _ in range(args.repeats)
    )
    torch.set_num_threads(threads)
    print(f"batch assembly: {rate_1:8,.0f} windows/s  (same, torch limited to 1 thread)")


def bench_rss(data_dir: Path, args: argparse.Namespace) -> None:
    command = [sys.executable, __file__, "--rss-child", str(data_dir)]
    command += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    peak_mib, n_windows, total = (int(v) for v in out.split())
    print(
        f"peak RSS:     {peak_mib:6.0f} MiB  (fresh process: load, index, fit, one pass over "
        f"{n_windows:,} of {total:,} windows in {time.perf_counter() - start:.0f} s; "
        "target <= 1.5 GB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_100_000)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate-batches", type=int, default=60)
    parser.add_argument("--skip-rss", action="store_true", help="skip the one-pass RSS run")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child, args.seq_len, args.batch_size)
        return
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        data_dir, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        start = time.perf_counter()
        write_dataset(args.rows, data_dir)
        frames = load_tf_data(data_dir, TIMEFRAMES)
        rows = ", ".join(f"{tf} {len(df):,}" for tf, df in frames.items())
        print(f"data: {rows} ({time.perf_counter() - start:.1f} s to generate and load)")
        print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)")
        bench_index(frames, args.seq_len, cache_dir, args.repeats)
        del frames
        bench_assembly(data_dir, cache_dir, args)
        if not args.skip_rss:
            bench_rss(data_dir, args)


if __name__ == "__main__":
    main()
