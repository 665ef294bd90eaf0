"""Encoding speed on CPU (test config) and peak memory of `stage1 encode` on the real data set.

    python benchmarks/bench_encode.py [--rows 100000] [--windows 20000] [--repeats 3]
                                      [--batch_size N] [--skip_real] [--real_end TIME]

1. Throughput: ``engine.encode`` over ``--windows`` anchors of synthetic M1 data with
   ``configs/test.yaml`` and a freshly initialised model (weights do not change the cost),
   median of ``--repeats`` runs that alternate with the same-run baseline: the model alone
   (``Stage1Model.encode``) on ready-made features. The same batches are also timed step by
   step to split the time into window building (gather + features + normalise) and the model.
   The model's FLOPs per window, the rate the model reaches, and this CPU's large-matmul rate
   give the ceiling any implementation of this model could reach here.
2. Peak memory: the full USDJPY M1 file (../shared/data/usdjpy_m1_2017_2019.parquet) is
   prepared into six timeframes in a temp dir, then `stage1 encode --pool mean --out x.parquet`
   runs in a fresh process over every valid anchor; that process reports its peak RSS (data +
   index + streamed output). Skipped with a message when the file is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import median_seconds, seconds
from torch.utils.flop_counter import FlopCounterMode

from stage1.checkpoint import export_checkpoint
from stage1.config import load_config
from stage1.data.dataset import Stage1Dataset
from stage1.data.io import load_tf_data
from stage1.data.prepare import prepare
from stage1.data.synthetic import write_synthetic_dataset
from stage1.inference import DEFAULT_BATCH_SIZE, Stage1InferenceEngine
from stage1.model.model import Stage1Model

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]
REAL_M1 = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "usdjpy_m1_2017_2019.parquet"
)


def make_checkpoint(data_dir: Path, path: Path) -> Path:
    """Fresh model + normaliser fitted on the data's train split, exported as `stage1 train` does."""
    config = load_config("test")
    normalizer = Stage1Dataset(data_dir, config, "train").normalizer
    torch.manual_seed(0)
    state = Stage1Model(config).state_dict()
    return export_checkpoint(path, state, config, normalizer.to_dict(), 0, None)


def matmul_gflops(repeats: int) -> float:
    """Sustained fp32 GFLOP/s of a large matmul on this machine (the compute ceiling)."""
    a = torch.randn(2048, 2048)
    return 2 * 2048**3 / median_seconds(lambda: a @ a, repeats, warmup=True) / 1e9


def throughput(args: argparse.Namespace, work_dir: Path) -> None:
    data_dir = work_dir / "synthetic"
    write_synthetic_dataset(data_dir, n_rows=args.rows, timeframes=TIMEFRAMES, seed=0)
    engine = Stage1InferenceEngine(make_checkpoint(data_dir, work_dir / "t.pth"), "cpu")
    frames = load_tf_data(data_dir, engine.timeframes)
    sampler = engine.build_sampler(frames)
    anchors = sampler.anchor_times
    n = min(args.windows, len(anchors))
    span = {"start": anchors[-n], "end": anchors[-1], "batch_size": args.batch_size}
    print(f"\n== encode throughput: test config, {n} windows, batch {args.batch_size}")

    # The same batches, step by step (the steps of engine.embed_windows): building vs model.
    ids = engine.select_windows(sampler, span["start"], span["end"])
    batches = [ids[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    build_s = model_s = 0.0
    features = []
    for batch in batches:
        start = time.perf_counter()
        x = engine.batch_builder(sampler).features(batch)
        build_s += time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            engine.model.encode(x)
        model_s += time.perf_counter() - start
        features.append(x)

    def model_only() -> None:
        with torch.inference_mode():
            for x in features:
                engine.model.encode(x)

    # encode() and its baseline alternate, so a change in machine load hits both alike.
    encode_times, baseline_times = [], []
    for _ in range(args.repeats):
        encode_times.append(seconds(lambda: engine.encode(frames, **span)))
        baseline_times.append(seconds(model_only))
    encode_s, baseline_s = statistics.median(encode_times), statistics.median(baseline_times)
    print(f"encode():             {n / encode_s:9,.0f} windows/s  (median of {args.repeats})")
    total = build_s + model_s
    print(
        f"  window building:    {100 * build_s / total:5.1f} % of time "
        f"({n / build_s:,.0f} windows/s alone: DeviceBatchBuilder gather + features + z-score)"
    )
    print(f"  model forward:      {100 * model_s / total:5.1f} % of time")
    print(
        f"baseline, model only: {n / baseline_s:9,.0f} windows/s on ready features "
        f"-> encode() reaches {baseline_s / encode_s:.2f} x the bare model"
    )
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.model.encode(features[0])
    mflop = counter.get_total_flops() / len(batches[0]) / 1e6
    gflops = matmul_gflops(args.repeats)
    print(
        f"model cost {mflop:.1f} MFLOP/window, run at {mflop * n / baseline_s / 1e3:.0f} GFLOP/s; "
        f"this CPU sustains {gflops:.0f} GFLOP/s on a 2048^2 matmul -> ceiling "
        f"~{gflops * 1e3 / mflop:,.0f} windows/s (5,000/s would need {5 * mflop:.0f} GFLOP/s)"
    )


# Run in a fresh interpreter that imports only what `stage1 encode` imports, so the figure is the
# command's own footprint (this script also imports Lightning, about 180 MB more).
CHILD = """
import json, re, sys
spec = json.loads(sys.argv[1])
if spec["mode"] == "load":
    from stage1.data.io import load_tf_data
    from stage1.inference import Stage1InferenceEngine
    engine = Stage1InferenceEngine(spec["ckpt"], "cpu")
    sampler = engine.build_sampler(load_tf_data(spec["data_dir"], engine.timeframes))
else:
    from stage1.cli import main
    assert main(spec["argv"]) == 0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_rss_mb": hwm_kb / 1024}))
"""


def child_peak_rss_mb(spec: dict) -> tuple[float, list[str]]:
    """Peak RSS (MB, Linux VmHWM) of CHILD run with ``spec``, and its other output lines."""
    command = [sys.executable, "-c", CHILD, json.dumps(spec)]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
    return json.loads(lines[-1])["peak_rss_mb"], lines[:-1]


def real_data_memory(args: argparse.Namespace, work_dir: Path) -> None:
    print("\n== peak memory: stage1 encode --pool mean over the full USDJPY M1 set")
    if not REAL_M1.is_file():
        print(f"skipped: {REAL_M1} not found (real data lives only on CI/dev machines)")
        return
    data_dir = work_dir / "usdjpy"
    prepare(REAL_M1, data_dir, tz="UTC", fmt="auto", timeframes=TIMEFRAMES)
    ckpt = make_checkpoint(data_dir, work_dir / "real.pth")
    out = work_dir / "embeddings.parquet"
    argv = ["encode", "--ckpt", str(ckpt), "--data_dir", str(data_dir), "--out", str(out)]
    argv += ["--pool", "mean", "--batch_size", str(args.batch_size)]
    argv += ["--end", args.real_end] if args.real_end else []
    loaded_mb, _ = child_peak_rss_mb({"mode": "load", "ckpt": str(ckpt), "data_dir": str(data_dir)})
    peak_mb, summary = child_peak_rss_mb({"mode": "encode", "argv": argv})
    print(*summary, sep="\n")
    print(
        f"peak RSS {peak_mb:,.0f} MB for the whole run (engine + data + index alone: "
        f"{loaded_mb:,.0f} MB); output {out.stat().st_size / 2**20:,.0f} MB Parquet"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic M1 rows")
    parser.add_argument("--windows", type=int, default=20_000, help="anchors to encode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch_size", type=int, default=DEFAULT_BATCH_SIZE["cpu"], help="windows per model call"
    )
    parser.add_argument("--skip_real", action="store_true", help="skip the real-data memory run")
    parser.add_argument(
        "--real_end", default=None, help="last anchor of the real-data run (default: all)"
    )
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_encode_") as tmp:
        throughput(args, Path(tmp))
        if not args.skip_real:
            real_data_memory(args, Path(tmp))


if __name__ == "__main__":
    main()
