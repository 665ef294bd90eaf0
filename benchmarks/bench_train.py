"""Training throughput on CPU: samples/s of full Lightning training steps (data loading,
masking, forward, loss, backward, clipping, AdamW, One-Cycle, logging) for the `test` and
`demo` configs on synthetic data, and the same-run ratio to a bare PyTorch step (model + loss +
backward + optimizer on a pre-built batch), which shows what the trainer and data path add.

    python benchmarks/bench_train.py [--configs test demo] [--steps 30] [--warmup 5] [--threads N]

Prints the median over the timed steps (after warm-up). Never used as a test assertion.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule
from stage1.data.synthetic import write_synthetic_dataset
from stage1.losses import Stage1CombinedLoss
from stage1.module import Stage1LightningModule, mask_generator
from stage1.training import build_trainer

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


class StepTimer(L.Callback):
    """Wall time between consecutive train-batch starts: one whole iteration each."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.starts.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        deltas = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]
        return deltas[warmup:]


def lightning_step_s(config, data_dir: Path, out_dir: Path, steps: int, warmup: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per training iteration through build_trainer (the `stage1 train` path)."""
    config.training.max_epochs = 1
    config.training.limit_train_batches = float(steps + warmup + 1)
    config.training.limit_val_batches = 0.0
    L.seed_everything(config.seed, verbose=False)
    datamodule = Stage1DataModule(data_dir, config)
    datamodule.setup("fit")
    assert datamodule.normalizer is not None
    module = Stage1LightningModule(config, datamodule.normalizer.to_dict())
    trainer = build_trainer(config, out_dir, accelerator="cpu")
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, TQDMProgressBar):
            callback.disable()  # keep stdout for the figures
    timer = StepTimer()
    trainer.callbacks.append(timer)  # type: ignore[attr-defined]
    trainer.fit(module, datamodule=datamodule)
    return statistics.median(timer.step_times(warmup))


def bare_step_s(config, data_dir: Path, steps: int, warmup: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of model + loss + backward + AdamW on one pre-built batch (the floor)."""
    datamodule = Stage1DataModule(data_dir, config)
    datamodule.setup("fit")
    assert datamodule.normalizer is not None
    module = Stage1LightningModule(config, datamodule.normalizer.to_dict())
    batch = datamodule.datasets["train"].get_batch(range(config.training.batch_size))
    generator = mask_generator(torch.device("cpu"), 0)
    masks = module.masking.generate(batch["times"], generator, parents=batch.get("parents"))
    criterion: Stage1CombinedLoss = module.criterion
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        out = module.model(batch["features"], masks, batch["times"])
        loss = criterion(
            out["reconstructed"], batch["targets"], masks, batch["times"], out.get("scale")
        )["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["test", "demo"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic M1 rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # figures only on stdout
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# bench_train: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_synthetic_dataset(Path(tmp) / "data", args.rows, TIMEFRAMES, seed=0)
        for name in args.configs:
            # Splits that leave val/test windows after the embargo on a few weeks of data.
            config = load_config(name, ["data.train_frac=0.6", "data.val_frac=0.2"])
            batch = config.training.batch_size
            full = lightning_step_s(config, data_dir, Path(tmp) / name, args.steps, args.warmup)
            bare = bare_step_s(config, data_dir, args.steps, args.warmup)
            print(
                f"{name:>5}: batch {batch:>4}  {batch / full:8.0f} samples/s "
                f"({full * 1e3:6.1f} ms/step)   bare model step {batch / bare:8.0f} samples/s "
                f"({bare * 1e3:6.1f} ms)   full/bare time {full / bare:4.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
