"""Sampler index and batch assembly on 3.1 M synthetic M1 rows, six timeframes, seq_len 48.

Prints (SPEC §8 targets in brackets), each as the median of --repeats runs:
  cold index time                                  [<= 1.5 s, <= 5x the searchsorted floor]
  bare np.searchsorted floor for the same anchors  (one call per timeframe, same run)
  cached index time, hashing included              [<= 0.2 s]
  batch assembly of train-loader batches of 1024, one process: the device path (window ids
  from the loader, DeviceBatchBuilder's gather + features + normalisation, masks as the
  LightningModule draws them) against the NumPy path it replaced (sampler.gather +
  numpy_reference_features + TFNormalizer + the same masks), the
  two alternating in the same run, median of --repeats rounds, with torch on 1 and on all
  threads                                          [>= 100 000 windows/s, >= 1.5 x NumPy]
  peak RSS of a fresh process: load, index, fit, one pass over every window   [<= 1.5 GB]

Times are wall clock and, beside them, the process's CPU time: on a shared machine the wall
clock grows with other processes' load (printed as the load average), the CPU time much less.

Usage: python benchmarks/bench_sampler.py [--rows 3100000] [--repeats 3] [--skip-rss]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule
from stage1.data.features import numpy_reference_features
from stage1.data.io import aggregate_bars, load_tf_data, write_bars
from stage1.data.masking import MaskingStrategy
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.synthetic import generate_m1
from stage1.data.timeframes import tf_ns

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


def bench_config(seq_len: int, batch_size: int, cache_dir: Path | None) -> Any:
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


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and median CPU seconds of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def load_note() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def write_dataset(rows: int, out: Path) -> None:
    m1 = generate_m1(rows, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    for tf in TIMEFRAMES:
        write_bars(m1 if tf == "m1" else aggregate_bars(m1, tf), out / f"{tf}.parquet")


def bench_index(frames: dict, seq_len: int, cache_dir: Path, repeats: int) -> None:
    sampler = MultiTFWindowSampler(frames, seq_len)
    cold = timed(lambda: MultiTFWindowSampler(frames, seq_len), repeats)
    anchors = frames["m1"].index.as_unit("ns").asi8 + tf_ns("m1")
    closes = [df.index.as_unit("ns").asi8 + tf_ns(tf) for tf, df in frames.items()]
    floor = timed(lambda: [np.searchsorted(c, anchors, side="right") for c in closes], repeats)
    MultiTFWindowSampler(frames, seq_len, cache_dir=cache_dir)  # writes the cache
    cached = timed(lambda: MultiTFWindowSampler(frames, seq_len, cache_dir=cache_dir), repeats)
    print(f"windows: {len(sampler):,} of {len(anchors):,} anchors; {load_note()}")
    print("                 wall s   cpu s")
    print(f"cold index:     {cold[0]:7.3f} {cold[1]:7.3f}   (target <= 1.5 s)")
    print(f"searchsorted:   {floor[0]:7.3f} {floor[1]:7.3f}   (floor: one call per timeframe)")
    print(f"cold / floor:   {cold[0] / floor[0]:7.2f} {cold[1] / floor[1]:7.2f}   (target <= 5 x)")
    print(f"cached index:   {cached[0]:7.3f} {cached[1]:7.3f}   (target <= 0.2 s)")


Batch = dict[str, torch.Tensor]


def device_path(dm: Stage1DataModule, masking: MaskingStrategy, ids: Batch) -> Batch:
    """What training does per batch: the loader's ids → the batch on the device → masks."""
    batch = dm.on_after_batch_transfer(ids, 0)
    batch["masks"] = masking.generate(batch["times"], parents=batch.get("parents"))
    return batch


def numpy_path(dm: Stage1DataModule, masking: MaskingStrategy, ids: Batch) -> Batch:
    """The batch path before the device builder (NumPy features), kept as the reference; its
    masks' sync searches the times, as before the parents (its batch has none)."""
    assert dm.sampler is not None and dm.normalizer is not None
    ohlc, times = dm.sampler.gather(ids["window_ids"].numpy())
    features = dm.normalizer.normalize(numpy_reference_features(ohlc))
    batch = {"features": features, "targets": features.clone(), "times": torch.from_numpy(times)}
    batch["ref_price"] = torch.from_numpy(ohlc[:, 0, 0, 0].copy())
    batch["masks"] = masking.generate(batch["times"])
    return batch


def assembly_rate(
    dm: Stage1DataModule, masking: MaskingStrategy, n_batches: int, path: Callable[..., Batch]
) -> tuple[float, float]:
    """Windows per wall second and per CPU second of ``n_batches`` train-loader batches."""
    loader = iter(dm.train_dataloader())
    path(dm, masking, next(loader))  # warm-up
    count = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        ids = next(loader)
        path(dm, masking, ids)
        count += len(ids["window_ids"])
    return count / (time.perf_counter() - start), count / (time.process_time() - start_cpu)


def bench_assembly(data_dir: Path, cache_dir: Path, args: argparse.Namespace) -> None:
    config = bench_config(args.seq_len, args.batch_size, cache_dir)
    dm = Stage1DataModule(data_dir, config)
    start = time.perf_counter()
    dm.setup()
    assert dm.sampler is not None
    setup_s = time.perf_counter() - start
    print(f"datamodule setup (load, cached index, splits, normaliser fit): {setup_s:.1f} s")
    masking = MaskingStrategy(config.masking, dm.sampler.timeframes, args.seq_len)
    default_threads = torch.get_num_threads()
    print(f"batch assembly (batch {args.batch_size}, gather + features + normalise + masks, one")
    print("process; target >= 100 000 windows/s and >= 1.5 x the NumPy path), median of")
    print(f"{args.repeats} alternating rounds; {load_note()}")
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        runs: dict[str, list[tuple[float, float]]] = {"device": [], "numpy": []}
        for _ in range(args.repeats):  # alternating: a change in load hits both paths alike
            runs["device"].append(assembly_rate(dm, masking, args.rate_batches, device_path))
            runs["numpy"].append(assembly_rate(dm, masking, args.rate_batches, numpy_path))
        wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
        ratios = [d[0] / n[0] for d, n in zip(runs["device"], runs["numpy"], strict=True)]
        for name in ("device", "numpy"):
            print(
                f"  torch threads {threads}, {name:6s} path: {wall[name]:9,.0f} windows/s wall, "
                f"{cpu[name]:9,.0f} per CPU second"
            )
        print(
            f"  torch threads {threads}, device / numpy: {statistics.median(ratios):.2f} x "
            f"(median of the per-round ratios; {wall['device'] / wall['numpy']:.2f} x of medians)"
        )
    torch.set_num_threads(default_threads)


def rss_child(data_dir: Path, seq_len: int, batch_size: int) -> None:
    """Fresh process: load, index, fit, then features + normalise + masks for EVERY window.

    Torch runs on one thread here: memory does not depend on it, and the pass is faster on a
    busy machine."""
    torch.set_num_threads(1)
    dm = Stage1DataModule(data_dir, bench_config(seq_len, batch_size, None))
    dm.setup()
    assert dm.sampler is not None
    masking = MaskingStrategy(dm.config.masking, dm.sampler.timeframes, seq_len)
    n_windows = 0
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for ids in loader:
            device_path(dm, masking, ids)
            n_windows += len(ids["window_ids"])
    print(f"{peak_rss_mib():.0f} {n_windows} {len(dm.sampler)}")


def peak_rss_mib() -> float:
    """Peak RSS of this process image. ru_maxrss is not enough on Linux: it survives exec and
    so can report the (larger) parent that spawned us; VmHWM belongs to this image only."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_rss(data_dir: Path, args: argparse.Namespace) -> None:
    command = [sys.executable, __file__, "--rss-child", str(data_dir)]
    command += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    peak_mib, n_windows, total = (int(v) for v in out.split())
    print(
        f"peak RSS: {peak_mib} MiB (fresh process: load, index, fit, one pass over "
        f"{n_windows:,} split windows of {total:,} in {time.perf_counter() - start:.0f} s; "
        "target <= 1.5 GB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_100_000)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
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
        bench_index(frames, args.seq_len, cache_dir, args.repeats)
        del frames
        bench_assembly(data_dir, cache_dir, args)
        if not args.skip_rss:
            bench_rss(data_dir, args)


if __name__ == "__main__":
    main()
