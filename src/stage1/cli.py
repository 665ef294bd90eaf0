"""The ``stage1`` command: parse arguments, call the library, print one line on failure.

Each sub-command's work lives in its module (``run_prepare`` in ``stage1.data.prepare``,
``run_train`` in ``stage1.training``, ...); this file only defines flags and dispatches, and
imports the heavy modules lazily so ``stage1 --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "prepare": ("stage1.data.prepare", "run_prepare"),
    "train": ("stage1.training", "run_train"),
    "evaluate": ("stage1.evaluation", "run_evaluate"),
    "encode": ("stage1.encode", "run_encode"),
    "demo": ("stage1.demo", "run_demo"),
    "check": ("stage1.check", "run_check"),
}


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="M1 CSV/Parquet -> one Parquet per timeframe + manifest.json",
        description=(
            "Convert raw M1 bars (CSV or Parquet; generic, HistData ASCII or MetaTrader layout) "
            "into a derived data directory: one <tf>.parquet per timeframe (bars labelled by "
            "open time, OHLC first/max/min/last, gaps kept) and manifest.json. Timestamps are "
            "converted from --tz to UTC; the report shows where the weekly FX open lands so a "
            "wrong time zone is caught. Nothing is written when validation fails."
        ),
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="M1 file(s) of one instrument (.csv, .txt or .parquet), or a quoted glob such as "
        "'DAT_ASCII_EURUSD_M1_20*.csv'; concatenated in time order",
    )
    p.add_argument(
        "--instrument",
        default=None,
        help="instrument name for the manifest (default: from the file names, e.g. "
        "DAT_ASCII_EURUSD_M1_2019 -> EURUSD; required when they do not name one)",
    )
    p.add_argument(
        "--overlap",
        default="error",
        choices=["error", "identical"],
        help="input files whose periods overlap: error (default), or identical (a bar several "
        "files hold is kept once if they agree exactly; any difference is an error)",
    )
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--tz", default="UTC", help="time zone of the input timestamps (IANA name)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "generic", "histdata", "mt"],
        help="input layout (default: detect)",
    )
    p.add_argument(
        "--timeframes",
        nargs="+",
        default=["m1", "m5", "m15", "m30", "h1", "h4"],
        help="timeframes to derive (default: m1 m5 m15 m30 h1 h4)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument(
        "--config",
        required=config_required,
        help="YAML config (path, or a shipped name: test, demo, base, ...)",
    )
    p.add_argument(
        "--data_dir",
        required=True,
        action="append",
        help="derived data directory (see stage1 prepare): one instrument's, or a root with one "
        "directory per instrument; repeat the flag for several",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. data.seq_len=32",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain the encoder (Lightning); exports checkpoints/stage1_best.pth",
        description="Train Stage 1 by masked reconstruction with the given config.",
    )
    _add_config_args(p)
    p.add_argument("--output_dir", default=None, help="run directory (default: runs/<experiment>)")
    p.add_argument("--max_epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None, help="global batch size")
    p.add_argument("--devices", default=None, help="number of devices (or 'auto')")
    p.add_argument("--accelerator", default=None, help="cpu, gpu, auto")
    p.add_argument("--strategy", default=None, help="e.g. ddp")
    p.add_argument("--num_nodes", type=int, default=None)
    p.add_argument("--precision", default=None, help="32, 16-mixed, bf16-mixed")
    p.add_argument("--fast_dev_run", action="store_true", help="one batch of train/val, no export")
    p.add_argument(
        "--resume", action="store_true", help="resume from <output_dir>/checkpoints/last.ckpt"
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="skill vs naive baselines, linear probe, plots and report",
        description=(
            "Evaluate a checkpoint on every window of a split: metrics on hidden positions, "
            "skill against last/interp/bridge baselines, linear probes, leak alarms, report."
        ),
    )
    _add_config_args(p, config_required=False)
    p.add_argument("--ckpt", required=True, help="stage1_best.pth export or Lightning .ckpt")
    p.add_argument("--split", default=None, choices=["test", "val", "train", "all"])
    p.add_argument(
        "--output", default=None, help="metrics JSON (default: <report_dir>/metrics.json)"
    )
    p.add_argument("--report_dir", default=None, help="plots + report.html (default: beside ckpt)")


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="write encoder embeddings for every valid anchor (for the RL agent)",
        description="Encode every valid window in a time range with a trained checkpoint.",
    )
    p.add_argument("--ckpt", required=True, help="stage1_best.pth export or Lightning .ckpt")
    p.add_argument(
        "--data_dir",
        required=True,
        action="append",
        help="derived data directory, or a root of instrument directories (one output file per "
        "instrument: <out>_<INSTRUMENT>.parquet); repeat the flag for several",
    )
    p.add_argument("--out", required=True, help="output .parquet, or .npy (+ _timestamps.npy)")
    p.add_argument("--start", default=None, help="first anchor time (UTC), e.g. 2019-06-01")
    p.add_argument("--end", default=None, help="last anchor time (UTC)")
    p.add_argument(
        "--pool", default=None, choices=["mean", "last", "flatten"], help="one vector per anchor"
    )
    p.add_argument(
        "--batch_size", type=int, default=None, help="windows per model call (128 CPU, 4096 GPU)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end: data -> prepare -> train -> evaluate -> encode",
        description=(
            "Run the whole pipeline on synthetic M1 bars (default) or on your data, with "
            "configs/demo.yaml on CPU, and print where the checkpoint, report and embeddings are."
        ),
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--data_dir", default=None, help="use an already derived data directory")
    p.add_argument("--input", default=None, help="use a raw M1 file (runs stage1 prepare)")
    p.add_argument("--tz", default="UTC", help="time zone of --input timestamps")
    p.add_argument("--config", default="demo", help="config (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _add_check(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "check",
        help="seconds-long smoke check of every component on synthetic data",
        description=(
            "Run every component once on a small synthetic data set with the test config "
            "(data, sampler, features, dataset, masking, model + loss, checkpoint, inference) "
            "and check each result; the guide's 'python3 test_components.py'."
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stage1",
        description=(
            "Stage 1: pretrain a multi-timeframe encoder on FX OHLC bars by masked "
            "reconstruction, evaluate it honestly, and encode windows for an RL agent."
        ),
        epilog="Run 'stage1 <command> --help' for a command's flags.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add in (_add_prepare, _add_train, _add_evaluate, _add_encode, _add_demo, _add_check):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from stage1.errors import Stage1Error

    module_name, func_name = COMMANDS[args.command]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        func(args)
    except (Stage1Error, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"stage1 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stage1 {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
