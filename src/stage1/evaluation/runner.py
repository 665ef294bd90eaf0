"""``stage1 evaluate``: every window of a split, masked with a fixed seed, scored against naive
baselines; linear probes; leak alarms; metrics JSON and report.

Pipeline: ``load_checkpoint`` → config (the checkpoint's; ``--config`` / overrides only change
``evaluation.*`` and ``data.cache_dir``) → the same sampler / FeatureEngineer / TFNormalizer
code as training, with the CHECKPOINT's normaliser statistics, so any data directory works →
masks from ``MaskingStrategy.generate`` seeded with ``evaluation.seed`` → model → metrics.

The passes over the data live in :mod:`stage1.evaluation.passes`, the meaning of every number in
:mod:`stage1.evaluation.definitions`; this module assembles the metrics JSON and the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from stage1.checkpoint import load_checkpoint
from stage1.config import as_config, config_hash, config_to_dict, load_config
from stage1.data.dataset import Stage1Dataset, build_sampler, build_splits
from stage1.data.instruments import DataDirs, find_instruments
from stage1.data.masking import evaluation_masking
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.errors import ConfigError, DataValidationError
from stage1.evaluation.alarms import leak_alarms
from stage1.evaluation.definitions import DEFINITIONS
from stage1.evaluation.metrics import MetricAccumulator, pip_size
from stage1.evaluation.passes import (
    EVAL_BATCH_SIZE,
    _evenly_spaced,
    random_model_like,
    reconstruct_split,
    run_probes,
)
from stage1.evaluation.report import write_report
from stage1.utils import atomic_write_text

UNSYNC_MAX_WINDOWS = 20_000
OVERRIDABLE_PREFIXES = ("evaluation.", "data.cache_dir", "data.instruments")


def evaluation_config(
    ckpt_config: DictConfig, config_path: str | None, overrides: Sequence[str]
) -> DictConfig:
    """The checkpoint's config with ``evaluation.*`` and ``data.cache_dir`` taken from
    ``config_path`` and ``overrides``; the shapes of data and model never change."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith(OVERRIDABLE_PREFIXES):
            raise ConfigError(
                f"override {item!r}: evaluate accepts only evaluation.* and data.cache_dir; "
                "data and model settings come from the checkpoint"
            )
    values = config_to_dict(ckpt_config)
    if config_path is not None:
        user = load_config(config_path, overrides)
        values["evaluation"] = config_to_dict(user)["evaluation"]
        values["data"]["cache_dir"] = user.data.cache_dir
        if config_hash(user, ("data", "model")) != config_hash(ckpt_config, ("data", "model")):
            print(
                f"stage1 evaluate: note: data/model settings of {config_path} differ from the "
                "checkpoint's; using the checkpoint's",
                file=sys.stderr,
            )
    elif overrides:
        merged = OmegaConf.merge(OmegaConf.create(values), OmegaConf.from_dotlist(list(overrides)))
        values = OmegaConf.to_container(merged)  # type: ignore[assignment]
    return as_config(values)


def default_report_dir(ckpt: str | Path, split: str) -> Path:
    """``<ckpt dir>/../eval_<split>`` (the run directory when the checkpoint is in checkpoints/)."""
    return Path(ckpt).resolve().parent.parent / f"eval_{split}"


def instrument_pips(sampler: MultiTFWindowSampler, data_dir: DataDirs) -> list[float]:
    """Pip of every instrument of ``sampler``: its manifest's ``pip_size`` (``stage1 prepare``),
    else by the price level of its base closes (``pip_size``)."""
    selected = [name for name in sampler.instruments if name]
    found = {
        instrument.name: instrument
        for instrument in find_instruments(data_dir, [sampler.base_tf], selected or None)
    }
    pips = []
    for i, name in enumerate(sampler.instruments):
        manifest = found[name].manifest() if name in found else None
        if manifest and manifest.get("pip_size"):
            pips.append(float(manifest["pip_size"]))
            continue
        rows = slice(int(sampler.block_starts[i, 0]), int(sampler.block_starts[i + 1, 0]))
        close = np.asarray(sampler.timeframe_bars(0)[1][rows, 3])
        pips.append(pip_size(float(np.median(close)), name or None))
    return pips


def _describe_dirs(data_dir: DataDirs) -> str | list[str]:
    dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    resolved = [str(Path(d).resolve()) for d in dirs]
    return resolved[0] if len(resolved) == 1 else resolved


def evaluate_checkpoint(
    ckpt: str | Path,
    data_dir: DataDirs,
    split: str | None = None,
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``ckpt`` on ``data_dir``; write the metrics JSON and the report; return the
    metrics dict (see SPEC §6 and ``DEFINITIONS``)."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ckpt_config, normalizer_stats, meta = load_checkpoint(ckpt, map_location=device)
    config = evaluation_config(ckpt_config, config_path, overrides)
    split = split or str(config.evaluation.split)
    normalizer = TFNormalizer.from_dict(normalizer_stats)
    sampler = build_sampler(data_dir, config)
    splits = build_splits(sampler, config)
    datasets = {
        name: Stage1Dataset(None, config, name, normalizer, sampler=sampler, splits=splits)
        for name in {split, "train"}
    }
    evaluated = datasets[split]
    if len(evaluated) == 0:
        raise DataValidationError(
            f"{data_dir}: the {split} split has no windows (split fractions and embargo leave "
            "none); evaluate another split or use more data"
        )
    base_open, base_ohlc = sampler.timeframe_bars(0)
    base_close = np.asarray(base_ohlc[:, 3], dtype=np.float64)
    base_open_ns = np.asarray(base_open, dtype=np.int64)
    pips = instrument_pips(sampler, data_dir)
    # Pooled pips only where every instrument has the same pip (mixed price units otherwise).
    pip = pips[0] if len(set(pips)) == 1 else None

    sync = bool(config.evaluation.sync_masks)
    max_windows = config.evaluation.max_windows
    scored = None if max_windows is None else _evenly_spaced(np.arange(len(evaluated)), max_windows)
    by_instrument: dict[int, MetricAccumulator] = {}
    accumulator, samples = reconstruct_split(
        model, evaluated, config, device, sync, scored, by_instrument
    )
    main = accumulator.result(pip=pip)
    per_instrument = {}
    for i, name in enumerate(sampler.instruments):
        if i in by_instrument:
            result = by_instrument[i].result(pip=pips[i])
            per_instrument[name or "data"] = {
                "n_windows": result["n_windows"], "pip": pips[i],
                "per_tf": result["per_tf"], "mean": result["mean"],
            }  # fmt: skip
    models = {
        "encoder": model,
        "random": random_model_like(config, int(config.evaluation.seed), device, normalizer),
    }
    probe = run_probes(
        datasets["train"], evaluated, models, base_close, base_open_ns, config, device
    )
    metrics: dict[str, Any] = {
        "split": split,
        "n_windows": main["n_windows"],
        "per_tf": main["per_tf"],
        "mean": main["mean"],
        "per_instrument": per_instrument,
        "instruments": list(sampler.instruments),
        "probe": probe,
        "alarms": leak_alarms(main["per_tf"], probe),
        "checkpoint": str(Path(ckpt).resolve()),
        "checkpoint_meta": {k: v for k, v in meta.items() if k != "versions"},
        "data_dir": _describe_dirs(data_dir),
        "config_hash": config_hash(config, ("data", "model", "masking", "evaluation")),
        "masking": {
            "synchronised": sync,
            "seed": int(config.evaluation.seed),
            "mask_ratio": evaluation_masking(
                config, sampler.timeframes, sampler.seq_len
            ).mask_ratio,
            "span_min_bars": int(config.masking.span_min_bars),
            "span_max_bars": int(config.masking.span_max_bars),
            "batch_size": EVAL_BATCH_SIZE,
        },
        "pip": pip,
        "definitions": DEFINITIONS,
    }
    if not sync:
        metrics["alarms"].append(
            "masks are NOT synchronised across timeframes (evaluation.sync_masks=false): visible "
            "coarse bars reveal hidden fine bars, so skills are optimistic"
        )
    else:
        # The comparison pass runs on an evenly spaced subset: it only has to show the size of
        # the gap, and a full second pass would double the cost of every evaluation.
        limit = UNSYNC_MAX_WINDOWS if max_windows is None else min(max_windows, UNSYNC_MAX_WINDOWS)
        subset = _evenly_spaced(np.arange(len(evaluated)), limit)
        unsync = reconstruct_split(model, evaluated, config, device, False, subset)[0]
        unsync_result = unsync.result(pip=pip)
        metrics["unsynchronised"] = {
            "note": "masks NOT synchronised across timeframes: coarse bars overlapping hidden base "
            "spans stay visible and reveal them; optimistic, for comparison only (evenly spaced "
            f"subset of at most {UNSYNC_MAX_WINDOWS:,} windows of the split)",
            "n_windows": unsync_result["n_windows"],
            "per_tf": unsync_result["per_tf"],
            "mean": unsync_result["mean"],
        }
    metrics["elapsed_s"] = round(time.perf_counter() - started, 2)

    report_path = Path(report_dir) if report_dir else default_report_dir(ckpt, split)
    output_path = Path(output) if output else report_path / "metrics.json"
    atomic_write_text(output_path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_report(report_path, metrics, samples)
    return metrics


def _summary_line(metrics: dict[str, Any]) -> str:
    mean, probe = metrics["mean"], metrics["probe"]

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:+.3f}"

    return (
        f"{metrics['split']}: {metrics['n_windows']:,} windows | mean skill vs "
        f"last {fmt(mean.get('skill_last'))}, interp {fmt(mean.get('skill_interp'))}, "
        f"bridge {fmt(mean.get('skill_bridge'))}, agg {fmt(mean.get('skill_agg'))} (coarse "
        f"tfs), best {fmt(mean.get('skill_best'))} | "
        f"vol R² encoder {fmt(probe['encoder'].get('vol_r2'))} / raw "
        f"{fmt(probe['raw'].get('vol_r2'))} / random {fmt(probe['random'].get('vol_r2'))} | "
        f"alarms: {len(metrics['alarms'])}"
    )


def run_evaluate(args: argparse.Namespace) -> None:
    """``stage1 evaluate`` (flags in ``stage1.cli``)."""
    split = args.split
    report_dir = Path(args.report_dir) if args.report_dir else None
    metrics = evaluate_checkpoint(
        args.ckpt, args.data_dir, split, args.config, args.overrides, args.output, report_dir
    )
    report_dir = report_dir or default_report_dir(args.ckpt, metrics["split"])
    print(_summary_line(metrics))
    for alarm in metrics["alarms"]:
        print(f"ALARM: {alarm}")
    print(f"metrics: {Path(args.output) if args.output else report_dir / 'metrics.json'}")
    print(f"report:  {report_dir / 'report.html'}")
