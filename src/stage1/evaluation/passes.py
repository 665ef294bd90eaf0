"""The model's passes over a split for ``stage1 evaluate``: the seeded masked reconstruction
pass (metrics, and a few windows for the plots) and the probe pass (pooled window features of
the trained model and of a freshly initialised one, then the linear probes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stage1.config import ConfigLike, as_config
from stage1.data.dataset import Stage1Dataset
from stage1.data.features import FeatureEngineer
from stage1.data.masking import evaluation_masking
from stage1.data.normalization import TFNormalizer
from stage1.data.timeframes import tf_ns
from stage1.evaluation.metrics import MetricAccumulator
from stage1.evaluation.probe import probe_targets, run_probe, window_summary_features
from stage1.evaluation.report import PROBE_KINDS, PlotSamples
from stage1.inference import pool_embeddings
from stage1.model.model import Stage1Model

# Fixed, so the masks (drawn batch by batch from one seeded generator) do not depend on the
# machine or on a training setting: same checkpoint + data + seed = same numbers.
EVAL_BATCH_SIZE = 256
MASK_SAMPLE_WINDOWS = 64


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
        parents = batch.get("parents")
        masks = masking.generate(
            batch["times"].to(device), generator=generator, sync=sync, right_edge=0.0,
            parents=None if parents is None else parents.to(device),
        )  # fmt: skip
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
