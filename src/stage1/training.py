"""Training: callbacks, Trainer construction and ``stage1 train`` (the LightningModule is in
:mod:`stage1.module`).

Batch size is GLOBAL: ``training.batch_size`` windows per optimizer micro-step summed over all
devices and nodes. ``Stage1DataModule`` gives each process ``batch_size // world_size`` windows
of its own shard, so changing ``--devices`` keeps the experiment (samples per step, schedule,
number of steps) the same. ``accumulate_grad_batches`` multiplies the effective batch on top.

Reproducibility: the run is seeded (``seed_everything``) and deterministic on CPU; training masks
come from a generator keyed by (seed, epoch, batch, rank) and the global RNG (dropout) is
re-seeded from the same keys each step, so a run resumed from ``last.ckpt`` (saved at epoch end)
retraces the uninterrupted run exactly, provided the loader's first resumed epoch is shuffled
for that epoch (see docs/ARCHITECTURE.md, training). Validation masks are keyed by (seed, batch,
rank) only, so val loss is comparable across epochs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import psutil
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from omegaconf import DictConfig

from stage1.checkpoint import export_checkpoint, read_checkpoint
from stage1.config import (
    ConfigLike,
    as_config,
    config_hash,
    load_config,
    save_config,
)
from stage1.data.dataset import Stage1DataModule
from stage1.data.features import CLOSE
from stage1.data.normalization import TFNormalizer
from stage1.errors import CheckpointError, ConfigError
from stage1.module import BEST_NAME, Stage1LightningModule


def _hidden_spans(hidden: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous True runs of a 1-D bool array as (start, end_exclusive)."""
    edges = np.diff(np.concatenate([[0], hidden.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def reconstruction_figure(
    targets: torch.Tensor, reconstructed: torch.Tensor, masks: torch.Tensor, timeframes: list[str]
) -> Figure:
    """Truth vs reconstruction of the (normalised) close, one panel per timeframe, hidden spans
    shaded. targets, reconstructed: ``[n_tf, L, 6]``; masks: bool ``[n_tf, L]``."""
    fig = Figure(figsize=(10, 1.8 * len(timeframes)), constrained_layout=True)
    axes = fig.subplots(len(timeframes), 1, sharex=True, squeeze=False)[:, 0]
    for k, (ax, tf) in enumerate(zip(axes, timeframes, strict=True)):
        ax.plot(targets[k, :, CLOSE].float().cpu().numpy(), color="black", label="truth")
        ax.plot(reconstructed[k, :, CLOSE].float().cpu().numpy(), color="tab:red", label="recon")
        for start, end in _hidden_spans(masks[k].cpu().numpy()):
            ax.axvspan(start - 0.5, end - 0.5, color="tab:blue", alpha=0.15, lw=0)
        ax.set_ylabel(f"{tf} close")
    axes[0].legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("bar (oldest → newest); shaded = hidden")
    return fig


class ReconstructionPlotCallback(Callback):
    """Logs truth vs reconstruction of the first validation window to TensorBoard (rank 0)."""

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        logger = trainer.logger
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not isinstance(logger, TensorBoardLogger):
            return
        assert isinstance(pl_module, Stage1LightningModule)
        fig = reconstruction_figure(
            batch["targets"][0],
            outputs["reconstructed"][0],
            outputs["masks"][0],
            pl_module.timeframes,
        )
        logger.experiment.add_figure("val/reconstruction", fig, trainer.global_step)


class MemoryMonitorCallback(Callback):
    """Logs process RSS and, on CUDA, memory allocated/reserved every ``every_n_steps`` optimizer
    steps (the guide's profile_memory_usage, as TensorBoard scalars)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = max(int(every_n_steps), 1)
        self._last_logged_step = -1
        self._process = psutil.Process()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_logged_step or trainer.logger is None:
            return
        self._last_logged_step = step
        metrics = {"memory/rss_mb": self._process.memory_info().rss / 2**20}
        if pl_module.device.type == "cuda":
            metrics["memory/gpu_allocated_mb"] = (
                torch.cuda.memory_allocated(pl_module.device) / 2**20
            )
            metrics["memory/gpu_reserved_mb"] = torch.cuda.memory_reserved(pl_module.device) / 2**20
            metrics["memory/gpu_peak_mb"] = (
                torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            )
        if trainer.is_global_zero:
            trainer.logger.log_metrics(metrics, step=step)


class ThroughputCallback(Callback):
    """Logs training speed every ``every_n_batches`` batches (rank 0): ``perf/windows_per_s``
    (this rank's windows over wall time), ``perf/step_ms`` and ``perf/data_wait_share``, the
    share of that time the host spent between one batch's end and the next one's start
    (fetching window ids, moving them, building the batch on the device).

    It synchronises the device once per interval, where Lightning reads the logged metrics back
    anyway (at ``log_every_n_steps``), so the rate covers the work the GPU really did."""

    def __init__(self, every_n_batches: int) -> None:
        self.every_n_batches = max(int(every_n_batches), 1)
        self._reset(None)

    def _reset(self, now: float | None) -> None:
        self._started, self._last_end = now, now
        self._windows = self._batches = 0
        self._wait_s = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(None)  # the gap over the epoch boundary (validation, checkpoints) is no wait

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._started is None:
            self._reset(now)
        elif self._last_end is not None:
            self._wait_s += now - self._last_end

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._windows += len(batch["window_ids"])
        self._batches += 1
        if self._batches >= self.every_n_batches and self._started is not None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            now = time.perf_counter()
            elapsed = max(now - self._started, 1e-9)
            metrics = {
                "perf/windows_per_s": self._windows / elapsed,
                "perf/step_ms": 1000 * elapsed / self._batches,
                "perf/data_wait_share": self._wait_s / elapsed,
            }
            if trainer.is_global_zero and trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=trainer.global_step)
            self._reset(now)
        else:
            self._last_end = time.perf_counter()


def _batches_or_fraction(value: float | None) -> int | float | None:
    """Config limits > 1 count batches (Lightning wants an int); <= 1 are fractions."""
    if value is None:
        return None
    return int(value) if value > 1 else float(value)


def _parse_devices(devices: str | int | None) -> int | str:
    if devices is None:
        return 1
    text = str(devices)
    return int(text) if text.isdigit() else text


def build_trainer(
    config: ConfigLike,
    output_dir: str | Path,
    *,
    devices: str | int | None = None,
    accelerator: str | None = None,
    strategy: str | None = None,
    num_nodes: int | None = None,
    fast_dev_run: bool = False,
) -> L.Trainer:
    """A Trainer from ``config.training``; CLI flags override the defaults (1 device, 'auto').

    Checkpoints go to ``<output_dir>/checkpoints/`` (``stage1_best.ckpt`` on val loss and
    ``last.ckpt``), TensorBoard logs to ``<output_dir>/logs/<experiment_name>/version_N``.
    """
    config, output_dir = as_config(config), Path(output_dir)
    train_cfg = config.training
    accelerator = accelerator or "auto"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    # Without validation, the best model is chosen on the training loss instead.
    validates = config.data.val_frac > 0 and train_cfg.limit_val_batches != 0
    monitor = "val/loss" if validates else "train/loss_epoch"
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename=BEST_NAME,
            monitor=monitor,
            mode="min",
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        EarlyStopping(monitor=monitor, mode="min", patience=train_cfg.early_stopping_patience),
        LearningRateMonitor(logging_interval="step"),
        # The bar reads the logged loss back from the device at each refresh: refreshing only
        # where metrics are logged anyway keeps the other steps free of host syncs.
        TQDMProgressBar(refresh_rate=max(int(train_cfg.log_every_n_steps), 1)),
        ReconstructionPlotCallback(),
        MemoryMonitorCallback(train_cfg.profile_every_n_steps),
        ThroughputCallback(train_cfg.log_every_n_steps),
    ]
    try:
        return L.Trainer(
            accelerator=accelerator,
            devices=_parse_devices(devices),
            strategy=strategy or "auto",
            num_nodes=num_nodes or 1,
            precision=train_cfg.precision,
            max_epochs=train_cfg.max_epochs,
            max_steps=train_cfg.max_steps,
            max_time=train_cfg.max_time,
            accumulate_grad_batches=train_cfg.accumulate_grad_batches,
            gradient_clip_val=train_cfg.gradient_clip or None,
            limit_train_batches=_batches_or_fraction(train_cfg.limit_train_batches),
            limit_val_batches=_batches_or_fraction(train_cfg.limit_val_batches),
            val_check_interval=_batches_or_fraction(train_cfg.val_check_interval),
            log_every_n_steps=train_cfg.log_every_n_steps,
            callbacks=callbacks,
            logger=TensorBoardLogger(output_dir / "logs", name=config.experiment_name),
            deterministic=on_cpu,
            use_distributed_sampler=False,  # Stage1DataModule shards by rank itself
            fast_dev_run=fast_dev_run,
        )
    except (MisconfigurationException, ValueError, TypeError) as exc:
        # Flags Lightning cannot honour here (no GPU, unknown strategy, bad device count).
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"--accelerator/--devices/--strategy/--precision: {reason}") from exc


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags that are config values, as overrides (applied after the key=value ones)."""
    flags = {
        "training.max_epochs": args.max_epochs,
        "training.batch_size": args.batch_size,
        "training.precision": args.precision,
    }
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def _resume_normalizer(path: Path, config: DictConfig) -> TFNormalizer:
    """The normaliser a run was trained with, read from its checkpoint. Refuses to resume into
    a different model or data layout (the weights and statistics would not fit)."""
    _, stored_config, normalizer_stats, _ = read_checkpoint(path)
    sections = ("data", "model")
    if config_hash(as_config(stored_config), sections) != config_hash(config, sections):
        raise ConfigError(
            f"{path}: --resume needs the same data.* and model.* settings as the checkpoint"
        )
    return TFNormalizer.from_dict(normalizer_stats)


def run_train(args: argparse.Namespace) -> None:
    """``stage1 train``: fit, then export ``<output_dir>/checkpoints/stage1_best.pth``."""
    config = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    output_dir = Path(args.output_dir or Path("runs") / config.experiment_name)
    ckpt_dir = output_dir / "checkpoints"
    resume_path, normalizer = None, None
    if args.resume:
        resume_path = ckpt_dir / "last.ckpt"
        if not resume_path.is_file():
            raise CheckpointError(f"{resume_path}: --resume needs this file from an earlier run")
        normalizer = _resume_normalizer(resume_path, config)

    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = Stage1DataModule(args.data_dir, config, normalizer)
    datamodule.setup("fit")  # fits the normaliser on the train split (unless resuming)
    assert datamodule.normalizer is not None
    normalizer_stats = datamodule.normalizer.to_dict()
    # Set from the launcher's environment before any process group exists (DDP children).
    if getattr(rank_zero_only, "rank", 0) == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        datamodule.normalizer.save_stats(output_dir / "normalizer_stats.json", config_hash(config))

    module = Stage1LightningModule(config, normalizer_stats)
    trainer = build_trainer(
        config,
        output_dir,
        devices=args.devices,
        accelerator=args.accelerator,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        fast_dev_run=args.fast_dev_run,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)
    if not trainer.is_global_zero:
        return
    if args.fast_dev_run:
        print(f"fast_dev_run finished (no checkpoints written); config in {output_dir}")
        return
    export_path = export_best(trainer, module, ckpt_dir / f"{BEST_NAME}.pth")
    print(f"run directory: {output_dir}")
    print(f"checkpoints: {ckpt_dir} (stage1_best.ckpt, last.ckpt)")
    print(f"exported model: {export_path}")
    print(f"tensorboard --logdir {output_dir / 'logs'}")


def export_best(trainer: L.Trainer, module: Stage1LightningModule, path: Path) -> Path:
    """Export the best checkpoint's weights (or the final weights when none was saved).
    ``best_loss`` is the monitored value: val/loss, or train/loss_epoch without validation."""
    callback = trainer.checkpoint_callback
    assert isinstance(callback, ModelCheckpoint)
    config, normalizer_stats = module.hparams["config"], module.hparams["normalizer_stats"]
    if not callback.best_model_path:
        state = module.model.state_dict()
        return export_checkpoint(
            path, state, config, normalizer_stats, epoch=trainer.current_epoch, best_loss=None
        )
    state, _, _, meta = read_checkpoint(callback.best_model_path)
    score = callback.best_model_score
    return export_checkpoint(
        path,
        state,
        config,
        normalizer_stats,
        epoch=int(meta["epoch"]),
        best_loss=None if score is None else float(score),
    )


def read_scalars(output_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars a run logged to TensorBoard, ``{tag: [(step, value), ...]}`` (newest version
    directory under ``<output_dir>/logs/``), for plots and checks without TensorBoard's UI."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(
        Path(output_dir).glob("logs/*/version_*"), key=lambda p: int(p.name.split("_")[1])
    )
    if not versions:
        raise FileNotFoundError(f"{output_dir}: no TensorBoard logs under logs/")
    events = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
