"""``stage1 check`` (and the guide's ``python3 test_components.py``): every component, in seconds.

On a small synthetic data set and the ``test`` config, each step runs one component the way the
guide uses it and checks its result (shapes, finiteness, no look-ahead, mask ratio, gradients,
an exact save/load round trip). The first failing step raises :class:`ComponentCheckError`
naming the component; the CLI prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from stage1.errors import Stage1Error

SYNTHETIC_ROWS = 60_000  # about six weeks of trading minutes: three splits with embargoes
MASK_RATIO_TOLERANCE = 0.05  # over a few hundred windows of 16 bars


class ComponentCheckError(Stage1Error):
    """A component produced a wrong result on the synthetic check data."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ComponentCheckError(message)


class _Check:
    """The steps share one temporary directory and what earlier steps built."""

    def __init__(self, work: Path) -> None:
        from stage1.config import CONFIG_DIR, as_config

        self.work = work
        # The guide's way: a plain dict from YAML, edited, then handed to the classes.
        plain = yaml.safe_load((CONFIG_DIR / "test.yaml").read_text())
        plain["training"]["batch_size"] = 16
        self.plain_config: dict[str, Any] = plain
        self.config = as_config(plain)
        self.state: dict[str, Any] = {}

    def data(self) -> str:
        from stage1.data.io import load_tf_data
        from stage1.data.synthetic import write_synthetic_dataset

        timeframes = list(self.config.data.timeframes)
        data_dir = write_synthetic_dataset(
            self.work / "data", n_rows=SYNTHETIC_ROWS, timeframes=timeframes, seed=0
        )
        tf_data = load_tf_data(data_dir, timeframes)
        _expect(set(tf_data) == set(timeframes), f"expected timeframes {timeframes}")
        self.state.update(data_dir=data_dir, tf_data=tf_data)
        return f"{SYNTHETIC_ROWS:,} M1 bars -> {len(timeframes)} timeframes"

    def sampler(self) -> str:
        from stage1.data.sampler import MultiTFWindowSampler
        from stage1.data.timeframes import tf_ns

        seq_len = int(self.config.data.seq_len)
        sampler = MultiTFWindowSampler(self.state["tf_data"], seq_len)
        _expect(len(sampler) > 0, "no valid windows")
        ids = np.linspace(0, len(sampler) - 1, 64).round().astype(np.int64)
        _, times = sampler.gather(ids)
        durations = np.array([tf_ns(tf) for tf in sampler.timeframes], dtype=np.int64)
        closes = times + durations[None, :, None]
        _expect(bool((closes <= sampler.anchor_ns[ids][:, None, None]).all()), "look-ahead bar")
        self.state["sampler"] = sampler
        return f"{len(sampler):,} windows, no bar closes after its anchor"

    def features(self) -> str:
        from stage1.data.features import FeatureEngineer

        engineer = FeatureEngineer(self.plain_config)
        features, targets = engineer.process_window(self.state["sampler"].get_window(0))
        shape = (len(self.config.data.timeframes), int(self.config.data.seq_len), 6)
        _expect(tuple(features.shape) == shape, f"features {tuple(features.shape)} != {shape}")
        _expect(bool(torch.isfinite(features).all()), "non-finite features")
        _expect(torch.equal(features, targets), "targets differ from features")
        return f"process_window -> {list(shape)}"

    def dataset(self) -> str:
        from stage1.data.dataset import Stage1Dataset

        dataset = Stage1Dataset(self.state["data_dir"], self.plain_config, split="train")
        sample = dataset[0]
        _expect(set(sample) >= {"features", "targets", "masks"}, f"sample keys {set(sample)}")
        _expect(sample["masks"].dtype == torch.bool, "masks are not bool")
        std = dataset.get_batch(range(min(len(dataset), 512)))["features"].std(dim=(0, 2))
        _expect(bool(((std > 0.3) & (std < 3)).all()), f"normalised std far from 1: {std}")
        self.state["dataset"] = dataset
        return f"{len(dataset):,} train windows, normalised (TFNormalizer fit on train)"

    def masking(self) -> str:
        dataset = self.state["dataset"]
        step = max(1, len(dataset) // 300)
        masks = torch.stack([dataset[i]["masks"] for i in range(0, len(dataset), step)])
        ratio = masks.float().mean(dim=(0, 2))
        target = float(self.config.masking.mask_ratio)
        off = float((ratio[0] - target).abs())
        _expect(off <= MASK_RATIO_TOLERANCE, f"base mask ratio {float(ratio[0]):.3f} vs {target}")
        # Synchronised masks hide more of the coarser timeframes, never less.
        low = ratio < target - MASK_RATIO_TOLERANCE
        _expect(not bool(low.any()), f"mask ratio per TF {ratio.tolist()} below {target}")
        shown = ", ".join(f"{r:.2f}" for r in ratio.tolist())
        return (
            f"mask ratio per TF [{shown}] (target {target}, sync_tf={self.config.masking.sync_tf})"
        )

    def model_and_loss(self) -> str:
        from stage1.losses import Stage1CombinedLoss
        from stage1.model.model import Stage1Model
        from stage1.module import LOSS_PARTS

        torch.manual_seed(0)
        model = Stage1Model(self.plain_config)
        normalizer = self.state["dataset"].normalizer
        model.set_normalizer(normalizer.mean, normalizer.std)  # as training does
        batch = self.state["dataset"].get_batch(range(16))
        masks = self.state["dataset"].masking.generate(batch["times"], parents=batch.get("parents"))
        out = model(batch["features"], masks, batch["times"])
        n_tf, seq_len = len(self.config.data.timeframes), int(self.config.data.seq_len)
        want = (16, n_tf, model.latent_len, model.d_model)
        _expect(tuple(out["reconstructed"].shape) == (16, n_tf, seq_len, 6), "reconstructed shape")
        _expect(tuple(out["encoded"].shape) == want, f"encoded {tuple(out['encoded'].shape)}")
        criterion = Stage1CombinedLoss(self.plain_config, normalizer.mean, normalizer.std)
        forecast = None
        if model.forecast_head is not None:  # as training does: from the full window
            predicted = model.forecast(model.encode(batch["features"], None, batch["times"]))
            forecast = (predicted, batch["future_log_vol"], batch["future_valid"])
        losses = criterion(
            out["reconstructed"], batch["targets"], masks, batch["times"], out.get("scale"),
            forecast,
        )  # fmt: skip
        _expect(set(losses) == {"total", *LOSS_PARTS}, "loss keys")
        _expect(all(bool(torch.isfinite(v)) for v in losses.values()), f"loss {losses}")
        losses["total"].backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None]
        _expect(not missing, f"no gradient for {missing[:3]}")
        self.state["model"] = model
        params = sum(p.numel() for p in model.parameters())
        return f"forward + loss {float(losses['total'].detach()):.3f} + backward, {params:,} parameters"

    def checkpoint(self) -> str:
        from stage1.checkpoint import export_checkpoint
        from stage1.model.model import Stage1Model

        model = self.state["model"].eval()
        path = self.work / "stage1_best.pth"
        normalizer = self.state["dataset"].normalizer
        export_checkpoint(path, model.state_dict(), self.config, normalizer.to_dict(), 0, None)
        # The guide's deployment snippet, verbatim apart from the file name.
        checkpoint = torch.load(path)
        restored = Stage1Model(checkpoint["config"])
        restored.load_state_dict(checkpoint["model_state_dict"])
        restored.eval()
        batch = self.state["dataset"].get_batch(range(4))
        x, times = batch["features"], batch["times"]
        with torch.no_grad():
            same = torch.equal(
                model(x, None, times)["encoded"], restored(x, None, times)["encoded"]
            )
        _expect(same, "reloaded model gives different outputs")
        self.state["checkpoint"] = path
        return "export -> torch.load -> Stage1Model(checkpoint['config']): identical outputs"

    def inference(self) -> str:
        from stage1.inference import Stage1InferenceEngine

        engine = Stage1InferenceEngine(self.state["checkpoint"], device="cpu")
        features = engine.extract_features(self.state["tf_data"])
        want = (1, len(engine.timeframes), engine.latent_len, engine.d_model)
        _expect(tuple(features.shape) == want, f"extract_features {tuple(features.shape)}")
        _expect(bool(torch.isfinite(features).all()), "non-finite embedding")
        return f"Stage1InferenceEngine.extract_features -> {list(want)}"


def run_checks(print_line: Callable[[str], None] = print) -> float:
    """Run every component check; return the seconds taken. Raises ComponentCheckError."""
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage1_check_") as tmp:
        check = _Check(Path(tmp))
        steps = [
            ("data", check.data),
            ("sampler", check.sampler),
            ("features", check.features),
            ("dataset", check.dataset),
            ("masking", check.masking),
            ("model + loss", check.model_and_loss),
            ("checkpoint", check.checkpoint),
            ("inference", check.inference),
        ]
        for name, step in steps:
            start = time.perf_counter()
            try:
                detail = step()
            except ComponentCheckError as exc:
                raise ComponentCheckError(f"{name}: {exc}") from exc
            print_line(f"  ok  {name:<13} {detail} ({time.perf_counter() - start:.1f} s)")
    return time.perf_counter() - total


def run_check(args: argparse.Namespace) -> None:
    """CLI entry point: print one line per component and the total time."""
    seconds = run_checks(lambda line: print(line, flush=True))
    print(f"stage1 check: every component OK in {seconds:.1f} s")
