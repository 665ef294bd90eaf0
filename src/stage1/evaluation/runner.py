"""``stage1 evaluate``: every window of a split, masked with a fixed seed, scored against naive
baselines; linear probes; leak alarms; metrics JSON and report.

Pipeline: ``load_checkpoint`` → config (the checkpoint's; ``--config`` / overrides only change
``evaluation.*`` and ``data.cache_dir``) → the same sampler / FeatureEngineer / TFNormalizer
code as training, with the CHECKPOINT's normaliser statistics, so any data directory works →
masks from ``MaskingStrategy.generate`` seeded with ``evaluation.seed`` → model → metrics.
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
from tqdm import tqdm

from stage1.checkpoint import load_checkpoint
from stage1.config import ConfigLike, as_config, config_hash, config_to_dict, load_config
from stage1.data.dataset import Stage1Dataset, build_sampler, build_splits
from stage1.data.features import FeatureEngineer
from stage1.data.instruments import DataDirs, find_instruments
from stage1.data.masking import evaluation_masking
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.timeframes import tf_ns
from stage1.errors import ConfigError, DataValidationError
from stage1.evaluation.alarms import (
    RIGHT_EDGE_SKILL_ALARM,
    RIGHT_EDGE_T_ALARM,
    SIGN_AUC_ALARM,
    leak_alarms,
)
from stage1.evaluation.metrics import CONSISTENCY_TOLERANCE_STD, MetricAccumulator, pip_size
from stage1.evaluation.probe import probe_targets, run_probe, window_summary_features
from stage1.evaluation.report import PROBE_KINDS, PlotSamples, write_report
from stage1.inference import pool_embeddings
from stage1.model.model import Stage1Model
from stage1.utils import atomic_write_text

# Fixed, so the masks (drawn batch by batch from one seeded generator) do not depend on the
# machine or on a training setting: same checkpoint + data + seed = same numbers.
EVAL_BATCH_SIZE = 256
MASK_SAMPLE_WINDOWS = 64
UNSYNC_MAX_WINDOWS = 20_000
OVERRIDABLE_PREFIXES = ("evaluation.", "data.cache_dir", "data.instruments")

DEFINITIONS = {
    "space": (
        "baselines and errors are computed in raw feature space (log price / reference price); "
        "mae is reported in normalised units (raw MAE / normaliser std of that timeframe and "
        "feature); headline mae and skills pool the price features open/high/low/close"
    ),
    "hidden_only": "every metric uses hidden bars only; visible bars are known inputs",
    "skill": "skill_X = 1 - mae_model / mae_X on the same hidden bars; skill_best uses the best "
    "baseline per feature (agg included where it exists; best_baseline names it); skill_agg and "
    "mae_agg are null on the base timeframe, and their mean is over the coarser timeframes",
    "baselines": {
        "last": "last visible bar carried forward (first visible after, for a span at position 0)",
        "interp": "linear interpolation between the visible neighbours; right edge: carry forward",
        "bridge": "hidden closes run linearly from the last visible close to the open of the next "
        "visible bar; hidden open = previous close; high/low = max/min(open, close) +/- the "
        "window's median visible upper/lower wick; right edge: carry forward",
        "agg": "coarser timeframes only: a hidden bar with period P = [open, open + duration) "
        "gets the aggregate (first open, max high, min low, last close) of the composite bars "
        "(truth where visible, that timeframe's bridge where hidden) opening inside P of its "
        "source: the finest finer timeframe with a visible bar inside P whose window starts at or "
        "before P's open, else the finest finer timeframe with a visible bar inside P; when the "
        "source's window starts after P's open, the open is the coarse bridge's and high/low are "
        "max/min with the coarse bridge's; bars with no visible finer bar inside P (uncovered) "
        "get the coarse bridge; exact when every source bar inside P is visible",
    },
    "span_classes": "right_edge = hidden bars after the last visible information of the window: no "
    "visible bar of any timeframe closes at or after their close (on the base timeframe: the "
    "spans ending at the newest bar; on coarser ones, newest bars whose close no visible finer "
    "bar gives away); interior = every other hidden bar. On coarser timeframes the hidden bars are "
    "also split into covered (at least one visible bar of a finer timeframe opens inside the "
    "bar's period) and uncovered (none); the base timeframe has no covered/uncovered blocks. "
    "n_spans counts runs of a class's bars",
    "corr": "Pearson over hidden bars of close (corr_close) and delta_close (corr_delta); "
    "corr_close_interp is the interp baseline's, for scale",
    "consistency_ratio": (
        f"share of hidden higher-timeframe bars, fully covered by the base window, whose "
        f"reconstructed close is within {CONSISTENCY_TOLERANCE_STD} x that timeframe's close std "
        "(normaliser) of the close of the last base bar inside it (composite: truth where visible, "
        "reconstruction where hidden)"
    ),
    "spectrum_error": "mean |log10 power| difference of the close's first differences, composite "
    "series vs truth, per window with hidden bars (spectrum_error_interp: the interp baseline)",
    "pip": "0.01 when the median close is above 20 (JPY-quoted pairs), else 0.0001",
    "probe": (
        "targets from the base timeframe after the anchor (labels only, never in a window): log "
        "realised volatility log sqrt(sum r^2) of the next probe_horizon_bars log close returns "
        "(ridge -> vol_r2) and their sign (logistic -> sign_acc, sign_auc); anchors whose horizon "
        "is incomplete or spans a gap (> 2 x horizon in time) are skipped; fitted on an evenly "
        "spaced subset of at most probe_max_train_windows train windows (lambda chosen on the "
        "last 20 % of them), scored on an evenly spaced subset of at most as many windows of the "
        "evaluated split. encoder: mean over latent steps of the unmasked encoding, concatenated "
        "over timeframes; encoder+raw: both concatenated; raw: per timeframe the newest bar's normalised features + the window's "
        "log realised volatility and log range; random: the same model, freshly initialised"
    ),
    "close_skill_fresh": "right_edge.close_skill_fresh = 1 - MAE_model / MAE_fresh over right-edge "
    "closes, fresh = the close of the newest visible bar of any timeframe (the last known price, "
    "the best guess of a martingale); on the base timeframe it equals the last baseline; "
    "close_skill_fresh_t = t statistic of the per-bar gain |e_fresh| - |e_model| (null below two "
    "bars)",
    "alarms": f"right_edge.close_skill_fresh > {RIGHT_EDGE_SKILL_ALARM} with close_skill_fresh_t "
    f">= {RIGHT_EDGE_T_ALARM} on any timeframe (a few dozen bars do not make evidence); sign "
    f"probe AUC > {SIGN_AUC_ALARM} for any probe",
}


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


def _evenly_spaced(positions: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``positions``, evenly spaced over them (deterministic)."""
    if len(positions) <= limit:
        return positions
    return positions[np.unique(np.linspace(0, len(positions) - 1, limit).round().astype(np.int64))]


def random_model_like(
    config: ConfigLike, seed: int, device: torch.device, normalizer: TFNormalizer
) -> Stage1Model:
    """A freshly initialised Stage1Model of the same config and normaliser (seeded; global RNG
    untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Stage1Model(config)
    model.set_normalizer(normalizer.mean, normalizer.std)
    return model.to(device).eval()


@torch.inference_mode()
def probe_features(
    dataset: Stage1Dataset,
    positions: np.ndarray,
    models: dict[str, Stage1Model],
    device: torch.device,
    desc: str,
) -> dict[str, np.ndarray]:
    """Pooled per-window features for the probes: ``{'raw': [n, n_tf*8], name: [n, n_tf*d]}``
    for each model in ``models``: the unmasked encoding pooled as ``encode(pool='mean')`` gives it
    to the RL agent (encoder half only)."""
    chunks: dict[str, list[np.ndarray]] = {"raw": [], **{name: [] for name in models}}
    normalizer = dataset.normalizer
    for start in tqdm(range(0, len(positions), EVAL_BATCH_SIZE), desc=desc, unit="batch"):
        batch = dataset.get_batch(positions[start : start + EVAL_BATCH_SIZE])
        features = batch["features"]
        raw = normalizer.denormalize(features)
        chunks["raw"].append(window_summary_features(raw.numpy(), features.numpy()))
        for name, model in models.items():
            encoded = model.encode(features.to(device), times=batch["times"].to(device))
            pooled = pool_embeddings(encoded, "mean").float()
            chunks[name].append(pooled.cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def run_probes(
    train: Stage1Dataset,
    evaluated: Stage1Dataset,
    models: dict[str, Stage1Model],
    base_close: np.ndarray,
    base_open_ns: np.ndarray,
    config: ConfigLike,
    device: torch.device,
) -> dict[str, Any]:
    """``{kind: {vol_r2, sign_acc, sign_auc, n_train, n_test, ...}}`` for every ``PROBE_KINDS``:
    encoder, raw, random and encoder+raw (the two concatenated)."""
    config = as_config(config)
    horizon = int(config.evaluation.probe_horizon_bars)
    limit = int(config.evaluation.probe_max_train_windows)
    bar_ns = tf_ns(train.sampler.base_tf)
    sets = {}
    for name, dataset in (("train", train), ("test", evaluated)):
        sampler = dataset.sampler
        end_rows = sampler.end_rows[dataset.window_ids, 0]
        row_end = sampler.base_block_end(dataset.window_ids)
        log_vol, sign, valid = probe_targets(
            base_close, base_open_ns, end_rows, horizon, bar_ns, row_end
        )
        positions = _evenly_spaced(np.flatnonzero(valid), limit)
        feats = probe_features(dataset, positions, models, device, f"probe features ({name})")
        sets[name] = (feats, log_vol[positions], sign[positions])
    (train_x, train_vol, train_sign), (test_x, test_vol, test_sign) = sets["train"], sets["test"]
    for feats in (train_x, test_x):
        # Does the embedding add anything to the hand-made features? Both, side by side.
        feats["encoder+raw"] = np.concatenate([feats["encoder"], feats["raw"]], axis=1)
    return {
        kind: run_probe(train_x[kind], train_vol, train_sign, test_x[kind], test_vol, test_sign)
        for kind in PROBE_KINDS
    }


@torch.inference_mode()
def reconstruct_split(
    model: Stage1Model,
    dataset: Stage1Dataset,
    config: ConfigLike,
    device: torch.device,
    sync: bool,
    positions: np.ndarray | None = None,
    per_instrument: dict[int, MetricAccumulator] | None = None,
) -> tuple[MetricAccumulator, PlotSamples]:
    """Mask and reconstruct the windows at ``positions`` of ``dataset`` (default: EVERY window,
    in order), accumulate the metrics, and keep a few evenly spaced windows for the plots.

    Masks come from one generator seeded with ``evaluation.seed``, batch after batch, with
    ``sync`` choosing calendar-synchronised masks. ``per_instrument``: also accumulate each
    instrument's windows on their own, into ``per_instrument[instrument index]`` (filled in).
    """
    config = as_config(config)
    normalizer, engineer = dataset.normalizer, FeatureEngineer(config)
    std = normalizer.std.double().numpy()
    accumulator = MetricAccumulator(dataset.sampler.timeframes, std)
    generator = torch.Generator(device=device).manual_seed(int(config.evaluation.seed))
    positions = np.arange(len(dataset)) if positions is None else np.asarray(positions)
    n_plot = min(int(config.evaluation.n_plot_windows), len(positions))
    plot_rows = set(np.linspace(0, len(positions) - 1, n_plot).round().astype(int).tolist())
    kept: dict[str, list[Any]] = {k: [] for k in ("ids", "truth", "pred", "interp", "masks")}
    mask_sample: list[np.ndarray] = []
    masking = evaluation_masking(config, dataset.sampler.timeframes, dataset.sampler.seq_len)
    label = "synchronised" if sync else "unsynchronised"
    progress = tqdm(total=len(positions), desc=f"evaluate {dataset.split} ({label})", unit="win")
    for start in range(0, len(positions), EVAL_BATCH_SIZE):
        batch = dataset.get_batch(positions[start : start + EVAL_BATCH_SIZE])
        truth = normalizer.denormalize(batch["targets"]).double()
        masks = masking.generate(
            batch["times"].to(device), generator=generator, sync=sync, right_edge=0.0
        )
        out = model(batch["features"].to(device), masks, batch["times"].to(device))
        out = out["reconstructed"].float().cpu()
        pred = normalizer.denormalize(out).double()
        masks_np = masks.cpu().numpy()
        arrays = (
            truth.numpy(), pred.numpy(), masks_np, batch["times"].numpy(),
            engineer.to_prices(truth, batch["ref_price"]).numpy(),
            engineer.to_prices(pred, batch["ref_price"]).numpy(),
        )  # fmt: skip
        interp = accumulator.update(*arrays)
        if per_instrument is not None:
            owners = dataset.sampler.instrument_of(batch["window_ids"].numpy())
            for owner in np.unique(owners):
                rows = owners == owner
                if int(owner) not in per_instrument:
                    per_instrument[int(owner)] = MetricAccumulator(dataset.sampler.timeframes, std)
                per_instrument[int(owner)].update(*(a[rows] for a in arrays))
        if start < MASK_SAMPLE_WINDOWS:
            mask_sample.append(masks_np[: MASK_SAMPLE_WINDOWS - start])
        rows = [r - start for r in range(start, start + len(masks_np)) if r in plot_rows]
        for key, values in (
            ("ids", batch["window_ids"].numpy()), ("truth", truth.numpy()),
            ("pred", pred.numpy()), ("interp", interp), ("masks", masks_np),
        ):  # fmt: skip
            kept[key].extend(values[rows])
        progress.update(len(masks_np))
    progress.close()
    n_tf, seq_len = len(dataset.sampler.timeframes), dataset.sampler.seq_len
    samples = PlotSamples(
        timeframes=list(dataset.sampler.timeframes),
        window_ids=[int(i) for i in kept["ids"]],
        truth=np.array(kept["truth"]).reshape(-1, n_tf, seq_len, 6),
        pred=np.array(kept["pred"]).reshape(-1, n_tf, seq_len, 6),
        interp=np.array(kept["interp"]).reshape(-1, n_tf, seq_len, 6),
        masks=np.array(kept["masks"], dtype=bool).reshape(-1, n_tf, seq_len),
        mask_sample=np.concatenate(mask_sample)
        if mask_sample
        else np.zeros((0, n_tf, seq_len), dtype=bool),
    )
    return accumulator, samples


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
