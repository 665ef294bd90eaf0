"""Does pretraining learn? Train named variants on the same real data and seed, evaluate each
on the same test windows and masks, and write the table to ``docs/RESULTS.md``.

    python benchmarks/quality.py --source ../shared/data/usdjpy_m1_2017_2019.parquet \\
        [--variants cpu cpu_prior_none ...] [--out runs/quality] [--max_windows 15000] \\
        [--results docs/RESULTS.md] [--reuse]

Each variant is a config plus overrides (``VARIANTS``). The source M1 file is prepared once
(``stage1 prepare``) into ``<out>/data/full``; a variant with ``holdout`` trains on the bars
before 1 January of that year and is evaluated on that whole year (``--split all`` of a data
directory holding only that year), a period it never saw. Training runs through the real
``stage1 train`` (a subprocess, so each variant gets a fresh process and its own wall time);
evaluation through ``evaluate_checkpoint`` with ``evaluation.max_windows`` evenly spaced test
windows (the same windows and masks for every variant of one data directory). ``--reuse`` keeps
finished variants (their ``metrics.json``) and only runs the missing ones.

Figures are printed as they come and the whole table is rewritten after each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from stage1.data.prepare import prepare
from stage1.evaluation.runner import evaluate_checkpoint

REPO = Path(__file__).resolve().parents[1]
# The generated table sits between these markers; text around them is kept on rewrites.
START, END = "<!-- quality.py table: start -->", "<!-- quality.py table: end -->"


@dataclass(frozen=True)
class Variant:
    config: str
    overrides: list[str] = field(default_factory=list)
    note: str = ""
    holdout: int | None = None  # train before this year, evaluate on it
    seed: int | None = None


# Screening budget for the ablation rows: 300 steps (3 x 100) of configs/cpu.yaml, ~5 minutes.
# cpu.yaml before it had the forecast head and calendar inputs (the reconstruction objective only).
NO_FORECAST = [
    "model.forecast_horizons=[]",
    "model.time_features=false",
    "loss.weights.forecast=0",
]
# Screening budget for the ablation rows: 300 steps (3 x 100) of configs/cpu.yaml, ~5 minutes,
# on the reconstruction objective alone (the screens ran before the forecast head existed).
SCREEN = [
    *NO_FORECAST,
    "masking.mask_ratio=0.15",  # the screens ran on cpu.yaml before it hid 40 % in training
    "training.max_epochs=3",
    "training.limit_train_batches=100",
    "training.limit_val_batches=10",
]
# The same budget with 40 % hidden in training, as cpu.yaml.
SCREEN_40 = [x for x in SCREEN if not x.startswith("masking.mask_ratio")]
FORECAST = ["model.forecast_horizons=[10,30,120]", "model.time_features=true"]
OLD_LOSS = [
    "loss.weights.huber=0.6",
    "loss.weights.stft=0.2",
    "loss.weights.cross_tf=0.15",
    "loss.weights.amp_phase=0.05",
    "loss.huber_delta=1.0",
]

# The final config at its full budget, then one change at a time against `screen_cpu`.
VARIANTS: dict[str, Variant] = {
    "cpu": Variant("cpu", note="configs/cpu.yaml as shipped (full budget)"),
    "cpu_seed2": Variant("cpu", seed=7, note="the same, second seed"),
    "cpu_holdout2019": Variant(
        "cpu", holdout=2019, note="trained on 2017-18, evaluated on all of 2019"
    ),
    "cpu_no_forecast": Variant(
        "cpu", NO_FORECAST, "the previous cpu.yaml: no forecast head, no calendar inputs"
    ),
    "cpu_no_forecast_seed2": Variant("cpu", NO_FORECAST, "the same, second seed", seed=7),
    "cpu_no_forecast_holdout2019": Variant(
        "cpu", NO_FORECAST, "the same, trained on 2017-18, evaluated on 2019", holdout=2019
    ),
    "cpu_forecast_w0001": Variant(
        "cpu", ["loss.weights.forecast=0.001"], "cpu.yaml with forecast weight 1e-3 (0.01 shipped)"
    ),
    "cpu_forecast_w00001": Variant(
        "cpu",
        ["loss.weights.forecast=0.0001"],
        "forecast weight 1e-4 (its encoder gradient ~4x the hidden-bar term's)",
    ),
    "cpu_mask_015": Variant(
        "cpu",
        [*NO_FORECAST, "masking.mask_ratio=0.15"],
        "the cpu.yaml before it: 15 % hidden in training",
    ),
    "cpu_mask_060": Variant(
        "cpu", [*NO_FORECAST, "masking.mask_ratio=0.6"], "cpu_no_forecast hiding 60 % in training"
    ),
    "screen_cpu": Variant("cpu", SCREEN, "cpu.yaml at the screening budget (300 steps)"),
    "screen_huber_delta1": Variant(
        "cpu",
        [*SCREEN, "loss.huber_delta=1.0"],
        "quadratic Huber (delta 1 bar scale) instead of L1-like",
    ),
    "screen_all_losses": Variant(
        "cpu",
        [*SCREEN, *OLD_LOSS[:4]],
        "+ the guide's STFT / cross-TF / amp-phase terms (on the composite)",
    ),
    "screen_right_edge_05": Variant(
        "cpu",
        [*SCREEN, "masking.right_edge_ratio=0.5"],
        "half the training rows end in a hidden span (0.2 shipped)",
    ),
    "screen_prior_bridge": Variant(
        "cpu", [*SCREEN, "model.prior=bridge"], "bridge prior everywhere (no agg for coarse bars)"
    ),
    "screen_prior_none": Variant(
        "cpu", [*SCREEN, "model.prior=none"], "no prior: hidden bars predicted from scratch"
    ),
    "screen_no_scale": Variant(
        "cpu", [*SCREEN, "model.window_scale=false"], "z-scored inputs/outputs, no window scale"
    ),
    "screen_time": Variant(
        "cpu",
        [*SCREEN, "model.time_features=true"],
        "+ calendar inputs (time of day, day of week, bar age)",
    ),
    "screen_mask_040": Variant(
        "cpu",
        [*SCREEN, "masking.mask_ratio=0.4"],
        "train with 40 % of bars hidden (scored on the shipped 15 %)",
    ),
    "screen_mask_030": Variant(
        "cpu",
        [*SCREEN, "masking.mask_ratio=0.3"],
        "train with 30 % of bars hidden (scored on the shipped 15 %)",
    ),
    "screen_time_mask_040": Variant(
        "cpu",
        [
            *SCREEN,
            "model.time_features=true",
            "masking.mask_ratio=0.4",
        ],
        "calendar inputs and 40 % hidden in training (scored on 15 %)",
    ),
    "screen_forecast_clean_time": Variant(
        "cpu",
        [*SCREEN_40, *FORECAST, "loss.weights.forecast=0.01"],
        "+ forecast head (weight 0.01) + calendar inputs: cpu.yaml at 300 steps",
    ),
    "screen_forecast_clean_balanced_time": Variant(
        "cpu", [*SCREEN_40, *FORECAST, "loss.weights.forecast=0.0001"], "the same, weight 1e-4"
    ),
    "screen_unsync": Variant(
        "cpu", [*SCREEN, "masking.sync_tf=false"], "unsynchronised training masks"
    ),
    "screen_old_model": Variant(
        "cpu",
        [
            *SCREEN,
            "model.prior=none",
            "model.window_scale=false",
            "masking.sync_tf=false",
            "masking.right_edge_ratio=0",
            *OLD_LOSS,
        ],
        "the previous model and loss (no prior, no scale, unsync, guide weights)",
    ),
    "demo": Variant("demo", note="configs/demo.yaml (the demo's budget)"),
}


def _machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"


def prepare_data(source: Path, out: Path, holdouts: set[int]) -> dict[str, Path]:
    """``{'full': dir}`` plus ``{'before_YYYY': dir, 'year_YYYY': dir}`` per holdout year."""
    dirs = {"full": out / "full"}
    if not (dirs["full"] / "manifest.json").exists():
        prepare(source, dirs["full"], force=True)
    for year in sorted(holdouts):
        frame: pd.DataFrame | None = None
        for name in ("before", "year"):
            target = out / f"{name}_{year}"
            dirs[f"{name}_{year}"] = target
            if (target / "manifest.json").exists():
                continue
            if frame is None:
                frame = pd.read_parquet(source)
            years = pd.DatetimeIndex(frame["timestamp"]).year
            keep = years < year if name == "before" else years == year
            part = out / f"{name}_{year}.parquet"
            frame[keep].to_parquet(part, index=False)
            prepare(part, target, force=True)
            part.unlink()
    return dirs


def run_variant(
    name: str, variant: Variant, dirs: dict[str, Path], out: Path, max_windows: int
) -> dict[str, Any]:
    run_dir = out / name
    train_dir = dirs[f"before_{variant.holdout}"] if variant.holdout else dirs["full"]
    overrides = list(variant.overrides)
    if variant.seed is not None:
        overrides.append(f"seed={variant.seed}")
    if variant.holdout:
        # Everything before the holdout year trains, with a small val split for checkpointing.
        overrides += ["data.train_frac=0.85", "data.val_frac=0.1"]
    command = [
        sys.executable, "-m", "stage1.cli", "train", "--config", str(REPO / "configs" / f"{variant.config}.yaml"),
        "--data_dir", str(train_dir), "--output_dir", str(run_dir), *overrides,
    ]  # fmt: skip
    print(f"[{name}] {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    log = run_dir / "train.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    train_s = time.perf_counter() - started
    eval_dir, split = (
        (dirs[f"year_{variant.holdout}"], "all") if variant.holdout else (train_dir, "test")
    )
    started = time.perf_counter()
    metrics = evaluate_checkpoint(
        run_dir / "checkpoints" / "stage1_best.pth",
        eval_dir,
        split=split,
        overrides=[f"evaluation.max_windows={max_windows}"],
        report_dir=run_dir / "eval",
    )
    summary = summarise(metrics)
    summary |= {
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - started, 1),
        "steps": _steps(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def recover_summary(run_dir: Path) -> None:
    """summary.json of a run whose evaluation finished but whose summary was not written (the
    process died after ``evaluate_checkpoint``): training time from the run's own files (config
    written at the start, export at the end)."""
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    summary = summarise(metrics)
    train_s = (run_dir / "checkpoints" / "stage1_best.pth").stat().st_mtime - (
        run_dir / "config.yaml"
    ).stat().st_mtime
    summary |= {
        "train_s": round(train_s, 1),
        "eval_s": metrics.get("elapsed_s"),
        "steps": _steps(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _steps(run_dir: Path) -> int | None:
    from stage1.training import read_scalars

    scalars = read_scalars(run_dir)
    steps = [step for step, _ in scalars.get("train/loss_step", [])]
    return max(steps) + 1 if steps else None


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    """The table's figures from one metrics JSON."""
    per_tf, mean = metrics["per_tf"], metrics["mean"]
    base = next(iter(per_tf))
    interior = per_tf[base]["interior"]["features"]
    uncovered = {
        tf: entry.get("uncovered", {}).get("features", {}).get("close", {}).get("skill_bridge")
        for tf, entry in list(per_tf.items())[1:]
    }
    probe = metrics["probe"]
    return {
        "n_windows": metrics["n_windows"],
        "skill_last": mean.get("skill_last"),
        "skill_interp": mean.get("skill_interp"),
        "skill_bridge": mean.get("skill_bridge"),
        "skill_best": mean.get("skill_best"),
        "per_tf_best": {tf: e.get("skill_best") for tf, e in per_tf.items()},
        "base_interior": {f: interior[f]["skill_bridge"] for f in ("close", "high", "low")},
        "uncovered_close_bridge": uncovered,
        "right_edge_fresh": {
            tf: e["right_edge"].get("close_skill_fresh") for tf, e in per_tf.items()
        },
        "probe_vol_r2": {kind: scores.get("vol_r2") for kind, scores in probe.items()},
        "alarms": len(metrics["alarms"]),
    }


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def write_table(path: Path, rows: dict[str, dict[str, Any]], max_windows: int) -> None:
    lines = [
        "# Results: does pretraining beat the naive rules?",
        "",
        f"Produced by `benchmarks/quality.py` on {date.today().isoformat()}; machine: {_machine()}.",
        f"Real USDJPY M1 2017-2019 (`../shared/data`), {max_windows:,} evenly spaced test windows "
        "per run (the same windows and synchronised masks, `evaluation.seed` 1234, for every "
        "variant of one data directory). Skill = 1 - MAE_model / MAE_baseline on hidden bars, "
        "mean over timeframes; `best` takes the best baseline per timeframe and feature "
        "(last, interp, bridge, agg). m1 interior: hidden m1 bars with a visible m1 bar after "
        "them, vs bridge. Uncovered: hidden coarse bars with no visible finer bar inside them, "
        "close vs bridge (worst coarse timeframe). Probe: ridge R² of the log realised "
        "volatility of the next `evaluation.probe_horizon_bars` base bars (30 for cpu and demo) "
        "from the mean-pooled embedding. Train minutes are wall time with one torch thread.",
        "",
        "| variant | what changes | train min | steps | skill last / interp / bridge / best "
        "| m1 interior close / high / low | worst uncovered close | vol R² encoder / raw / "
        "random / enc+raw | alarms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        variant = VARIANTS.get(name)
        interior = row["base_interior"]
        uncovered = [v for v in row["uncovered_close_bridge"].values() if v is not None]
        probe = row["probe_vol_r2"]
        lines.append(
            f"| `{name}` | {variant.note if variant else ''} | {row['train_s'] / 60:.1f} | "
            f"{row['steps']} | {_f(row['skill_last'])} / {_f(row['skill_interp'])} / "
            f"{_f(row['skill_bridge'])} / {_f(row['skill_best'])} | {_f(interior['close'])} / "
            f"{_f(interior['high'])} / {_f(interior['low'])} | "
            f"{_f(min(uncovered)) if uncovered else 'n/a'} | "
            + " / ".join(_f(probe.get(k)) for k in ("encoder", "raw", "random", "encoder+raw"))
            + f" | {row['alarms']} |"
        )
    table = "\n".join(lines[2:]) + "\n"  # below the title
    text = f"{lines[0]}\n\n{START}\n{table}{END}\n"
    if path.exists():
        # Keep what a person wrote around the table (the reading of it); replace the table.
        old = path.read_text()
        if START in old and END in old:
            text = old[: old.index(START)] + f"{START}\n{table}" + old[old.index(END) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, default=REPO.parent / "shared/data/usdjpy_m1_2017_2019.parquet"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument("--max_windows", type=int, default=15_000)
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md")
    parser.add_argument("--reuse", action="store_true", help="keep finished variants")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if not args.source.exists():
        parser.error(f"--source {args.source}: file not found")
    holdouts = {VARIANTS[v].holdout for v in args.variants if VARIANTS[v].holdout}
    dirs = prepare_data(args.source, args.out / "data", {h for h in holdouts if h})
    rows: dict[str, dict[str, Any]] = {}
    for name in args.variants:
        summary_path = args.out / name / "summary.json"
        if (
            args.reuse
            and not summary_path.exists()
            and (args.out / name / "eval/metrics.json").exists()
        ):
            recover_summary(args.out / name)
        if args.reuse and summary_path.exists():
            rows[name] = json.loads(summary_path.read_text())
        else:
            rows[name] = run_variant(name, VARIANTS[name], dirs, args.out, args.max_windows)
        print(f"[{name}] {json.dumps(rows[name])}", flush=True)
        write_table(args.results, rows, args.max_windows)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
