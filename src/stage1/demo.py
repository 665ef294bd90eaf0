"""``stage1 demo``: the whole pipeline in one command, on synthetic or real M1 bars.

data → ``stage1 prepare`` → ``stage1 train`` (configs/demo.yaml, CPU) → ``stage1 evaluate`` →
``stage1 encode``. Each step calls the same ``run_*`` function as its CLI sub-command, so the demo
exercises exactly what a user runs by hand.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from stage1.config import load_config
from stage1.data.io import load_tf_data
from stage1.data.timeframes import sort_timeframes
from stage1.errors import Stage1Error

SYNTHETIC_ROWS = 120_000  # about 12 weeks of trading minutes: three splits with embargoes
ENCODE_DAYS = 7  # the demo encodes the newest week; `stage1 encode` does any range


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def _prepare_data(args: argparse.Namespace, out: Path, timeframes: list[str]) -> Path:
    """Return a derived data directory: given, prepared from --input, or synthetic."""
    from stage1.data.prepare import prepare

    if args.data_dir is not None:
        return Path(args.data_dir)
    data_dir = out / "data"
    if args.input is not None:
        prepare(
            Path(args.input), data_dir, tz=args.tz, fmt="auto", timeframes=timeframes, force=True
        )
        return data_dir
    from stage1.data.synthetic import generate_m1

    m1_path = out / "synthetic_m1.parquet"
    print(f"   generating {SYNTHETIC_ROWS:,} synthetic M1 bars -> {m1_path}")
    generate_m1(SYNTHETIC_ROWS, seed=0).reset_index().to_parquet(m1_path, index=False)
    prepare(m1_path, data_dir, tz="UTC", fmt="auto", timeframes=timeframes, force=True)
    return data_dir


def run_demo(args: argparse.Namespace) -> None:
    """Run prepare → train → evaluate → encode and print where the results are."""
    from stage1.encode import run_encode
    from stage1.evaluation import run_evaluate
    from stage1.training import run_train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    config = load_config(args.config, overrides)
    timeframes = sort_timeframes(list(config.data.timeframes))
    total = time.perf_counter()

    start = _step("1/4 prepare data")
    data_dir = _prepare_data(args, out, timeframes)
    _done(start)

    run_dir = out / "run"
    start = _step(f"2/4 train ({args.config}, CPU)")
    run_train(
        argparse.Namespace(
            config=args.config,
            data_dir=str(data_dir),
            overrides=overrides,
            output_dir=str(run_dir),
            max_epochs=None,
            batch_size=None,
            devices=1,
            accelerator="cpu",
            strategy=None,
            num_nodes=None,
            precision=None,
            fast_dev_run=False,
            resume=False,
            debug=getattr(args, "debug", False),
        )
    )
    _done(start)
    ckpt = run_dir / "checkpoints" / "stage1_best.pth"
    if not ckpt.is_file():
        raise Stage1Error(f"training finished without exporting {ckpt}")

    report_dir = out / "report"
    start = _step("3/4 evaluate on the test split")
    run_evaluate(
        argparse.Namespace(
            config=None,
            data_dir=str(data_dir),
            overrides=[],
            ckpt=str(ckpt),
            split="test",
            output=None,
            report_dir=str(report_dir),
            debug=getattr(args, "debug", False),
        )
    )
    _done(start)

    embeddings = out / "embeddings.parquet"
    base = load_tf_data(data_dir, timeframes[:1])[timeframes[0]]
    encode_start = base.index[-1] - pd.Timedelta(days=ENCODE_DAYS)
    start = _step(f"4/4 encode the last {ENCODE_DAYS} days (mean-pooled embeddings)")
    run_encode(
        argparse.Namespace(
            ckpt=str(ckpt),
            data_dir=str(data_dir),
            out=str(embeddings),
            start=encode_start.isoformat(),
            end=None,
            pool="mean",
            batch_size=None,
            device="cpu",
            debug=getattr(args, "debug", False),
        )
    )
    _done(start)

    print(f"\nStage 1 demo finished in {time.perf_counter() - total:.0f} s")
    print(f"  data        {data_dir}")
    print(f"  checkpoint  {ckpt}")
    print(f"  metrics     {report_dir / 'metrics.json'}")
    print(f"  report      {report_dir / 'report.html'}")
    print(f"  embeddings  {embeddings}")
    print(f"  tensorboard tensorboard --logdir {run_dir / 'logs'}")
