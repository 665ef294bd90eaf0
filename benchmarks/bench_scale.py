"""Many instruments, data larger than RAM would like: N synthetic instruments x 3.1 M M1 rows,
six timeframes, seq_len 48, one data root, memory-mapped bars and index (``data.cache_dir``).

For 20 instruments and for 1 (the same root, ``data.instruments=[I00]``), each in fresh
processes, prints (SPEC §8 targets for 20 instruments in brackets):
  cold start    data + index ready from prepared Parquet: bars validated and written to
                memory-mapped .npy, index built into its cache file (build_sampler)
  cached start  the same in a new process with the caches in place   [<= 5 s]
  setup         splits, normaliser fit and datasets after the start (Stage1DataModule.setup)
  one pass of batch assembly over --batches train batches (gather + features + normalise +
  masks, batch 1024, drawn from the whole shuffled train split), with the process's peak
  anonymous memory (RssAnon, sampled after every batch)   [<= 1.5 GB]
  and its peak RSS (VmHWM: anonymous + file pages mapped in, which are shared and evictable)

Usage: python benchmarks/bench_scale.py [--instruments 20] [--rows 3100000] [--batches 200]
       [--data DIR (kept; reused when it holds the instruments)]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule, build_sampler
from stage1.data.io import aggregate_bars, write_bars
from stage1.data.masking import MaskingStrategy
from stage1.data.synthetic import START, generate_m1

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


def memory_mib() -> dict[str, float]:
    """RssAnon, RssFile, VmRSS and VmHWM (peak RSS) of this process, MiB (/proc/self/status)."""
    wanted = ("RssAnon", "RssFile", "VmRSS", "VmHWM")
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in wanted:
            values[key] = int(line.split()[1]) / 1024  # kB
    return values


def write_root(root: Path, n_instruments: int, rows: int) -> None:
    """Prepared directories ``root/I00 .. I{n-1}``: vectorised synthetic M1 bars (a different
    seed each, starting a day apart) and their aggregates, written as Parquet. Instruments
    already there are kept."""
    for i in range(n_instruments):
        out = root / f"I{i:02d}"
        if all((out / f"{tf}.parquet").is_file() for tf in TIMEFRAMES):
            continue
        start = time.perf_counter()
        m1 = generate_m1(rows, seed=100 + i, start=pd.Timestamp(START) + pd.Timedelta(days=i))
        tmp = root / f".I{i:02d}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for tf in TIMEFRAMES:
            write_bars(m1 if tf == "m1" else aggregate_bars(m1, tf), tmp / f"{tf}.parquet")
        del m1
        os.replace(tmp, out)
        print(f"  wrote {out.name} ({time.perf_counter() - start:.1f} s)", flush=True)


def bench_config(cache_dir: Path, instruments: list[str] | None) -> Any:
    overrides = [
        "data.seq_len=48",
        "training.batch_size=1024",
        "dataloader.num_workers=0",
        "dataloader.pin_memory=false",
        "dataloader.persistent_workers=false",
        f"data.cache_dir={cache_dir}",
    ]
    if instruments is not None:
        overrides.append(f"data.instruments=[{','.join(instruments)}]")
    return load_config("base", overrides)


def child(root: Path, cache_dir: Path, instruments: list[str] | None, batches: int) -> None:
    """One fresh training process: start, setup, then ``batches`` train batches. Prints JSON."""
    torch.set_num_threads(1)
    config = bench_config(cache_dir, instruments)
    result: dict[str, Any] = {"before": memory_mib()}
    start = time.perf_counter()
    sampler = build_sampler(root, config)
    result["start_s"] = time.perf_counter() - start
    result["after_start"] = memory_mib()
    result["windows"] = len(sampler)
    result["instruments"] = len(sampler.instruments)
    result["rows_m1"] = int(sampler.block_starts[-1, 0])
    dm = Stage1DataModule(root, config)
    start = time.perf_counter()
    dm.setup()  # builds its own sampler: from the caches now (counted in setup_s)
    result["setup_s"] = time.perf_counter() - start
    result["after_setup"] = memory_mib()
    del sampler
    assert dm.sampler is not None
    masking = MaskingStrategy(dm.config.masking, dm.sampler.timeframes, dm.sampler.seq_len)
    peak_anon, n_windows = 0.0, 0
    start = time.perf_counter()
    loader = iter(dm.train_dataloader())
    for _ in range(batches):
        batch = dm.on_after_batch_transfer(next(loader), 0)  # built where Lightning would
        masking.generate(batch["times"], parents=batch.get("parents"))
        n_windows += len(batch["window_ids"])
        peak_anon = max(peak_anon, memory_mib()["RssAnon"])
    result["pass_s"] = time.perf_counter() - start
    result["pass_windows"] = n_windows
    result["train_windows"] = len(dm.splits["train"])
    result["peak_rss_anon"] = peak_anon
    result["end"] = memory_mib()
    print(json.dumps(result))


def run_child(root: Path, cache_dir: Path, instruments: list[str] | None, batches: int) -> dict:
    command = [sys.executable, __file__, "--child", str(root), "--cache", str(cache_dir)]
    command += ["--batches", str(batches)]
    if instruments is not None:
        command += ["--only", ",".join(instruments)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(label: str, cold: dict, cached: dict) -> None:
    mib = 1 / 1024
    print(
        f"{label}: {cached['instruments']} instrument(s), {cached['rows_m1']:,} M1 rows, "
        f"{cached['windows']:,} windows ({cached['train_windows']:,} train)"
    )
    print(f"  cold start (data + index ready):   {cold['start_s']:7.1f} s")
    print(f"  cached start (data + index ready): {cached['start_s']:7.2f} s   (target <= 5 s)")
    print(f"  setup after start (splits, normaliser, datasets; cached): {cached['setup_s']:.2f} s")
    for name, run in (("cold", cold), ("cached", cached)):
        rate = run["pass_windows"] / run["pass_s"]
        print(
            f"  {name:6s} process, {run['pass_windows']:,} windows of batch assembly "
            f"({rate:,.0f}/s): peak RssAnon {run['peak_rss_anon'] * mib:.2f} GiB "
            f"(after start {run['after_start']['RssAnon'] * mib:.2f}, after setup "
            f"{run['after_setup']['RssAnon'] * mib:.2f}; target <= 1.5 GB), "
            f"peak RSS (VmHWM) {run['end']['VmHWM'] * mib:.2f} GiB, "
            f"RssFile at the end {run['end']['RssFile'] * mib:.2f} GiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruments", type=int, default=20)
    parser.add_argument("--rows", type=int, default=3_100_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--data", type=Path, default=None, help="data root to keep and reuse")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.cache, args.only.split(",") if args.only else None, args.batches)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        root = args.data or tmp / "root"
        start = time.perf_counter()
        print(f"writing {args.instruments} instruments x {args.rows:,} M1 rows to {root}")
        write_root(root, args.instruments, args.rows)
        print(
            f"data ready in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f}"
        )
        for label, only in (("all", None), ("one", ["I00"])):
            cache = tmp / f"cache_{label}"  # fresh: the first process builds everything
            cold = run_child(root, cache, only, args.batches)
            cached = run_child(root, cache, only, args.batches)
            report(label, cold, cached)
            shutil.rmtree(cache)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
