"""Stage1LightningModule: masked-reconstruction training of :class:`Stage1Model` (masks, loss,
logging, validation skill against the naive baselines, optimizer and schedule).

Reproducibility: training masks come from a generator keyed by (seed, epoch, batch, rank) and the
global RNG (dropout) is re-seeded from the same keys each step, so a run resumed from
``last.ckpt`` retraces the uninterrupted run exactly (docs/ARCHITECTURE.md, training).
Validation masks are keyed by (seed, batch, rank) only, so val loss is comparable across epochs.

No host sync in the hot loop: a step reads nothing back from the device. The loss's finiteness
is recorded on the device (the first non-finite step since the last check) and read only where
Lightning reads metrics anyway, every ``trainer.log_every_n_steps`` batches, and before any
checkpoint is written or validation starts; a diverged run then stops with
:class:`TrainingDivergedError` naming that first step.
"""

import math
from typing import Any

import lightning as L
import numpy as np
import torch

from stage1.config import (
    ConfigLike,
    as_config,
    config_to_dict,
)
from stage1.data.masking import MaskingStrategy, evaluation_masking
from stage1.data.normalization import TFNormalizer
from stage1.data.timeframes import sort_timeframes
from stage1.errors import ConfigError, TrainingDivergedError
from stage1.evaluation.metrics import MetricAccumulator
from stage1.losses import Stage1CombinedLoss
from stage1.model.model import Stage1Model

LOSS_PARTS = ("huber", "stft", "cross_tf", "amp_phase", "forecast")
# Validation logs skill against these baselines (hidden bars, as `stage1 evaluate` scores them).
SKILL_LOGGED = ("bridge", "interp", "last")
BEST_NAME = "stage1_best"
# Tags mixed into seeds, so train masks, eval masks and dropout never share a stream.
_TRAIN_STREAM, _EVAL_STREAM, _DROPOUT_STREAM = 0, 1, 2


def mixed_seed(*keys: int) -> int:
    """One 63-bit seed from several integer keys (NumPy's SeedSequence mixes them, so nearby
    keys give unrelated streams)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return int(state) % (2**63)


def mask_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``keys``."""
    return torch.Generator(device=device).manual_seed(mixed_seed(*keys))


def _hidden_mae_per_tf(
    reconstructed: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """MAE over hidden bars and all features, per timeframe: ``[n_tf]`` (0 where none hidden).

    reconstructed, targets: ``[B, n_tf, L, 6]``; masks: bool ``[B, n_tf, L]``.
    """
    abs_err = (reconstructed.float() - targets.float()).abs().mean(-1)  # [B, n_tf, L]
    hidden = masks.float()
    return (abs_err * hidden).sum((0, 2)) / hidden.sum((0, 2)).clamp(min=1.0)


class Stage1LightningModule(L.LightningModule):
    """Masked-reconstruction training of :class:`Stage1Model`.

    ``normalizer_stats`` is ``TFNormalizer.to_dict()`` of the train split; it is stored with the
    config (both as plain dicts) in the checkpoint's hyper-parameters, so a ``.ckpt`` rebuilds
    model, loss and normaliser without pickled objects.
    """

    def __init__(self, config: ConfigLike, normalizer_stats: dict[str, Any]):
        super().__init__()
        # TF32 tensor cores for fp32 matmuls on Ampere+ GPUs (no effect on CPU). Set here, not in
        # a fit hook: Lightning checks it while placing the model, before any hook runs.
        torch.set_float32_matmul_precision("high")
        config_dict = config_to_dict(config)
        self.save_hyperparameters({"config": config_dict, "normalizer_stats": normalizer_stats})
        self.config = as_config(config_dict)
        normalizer = TFNormalizer.from_dict(normalizer_stats)
        self.timeframes = sort_timeframes(list(self.config.data.timeframes))
        self.model = Stage1Model(self.config)
        self.model.set_normalizer(normalizer.mean, normalizer.std)
        if self.config.training.compile:
            # Compiles forward in place: parameter names stay free of '_orig_mod.'.
            self.model.compile()
        self.criterion = Stage1CombinedLoss(self.config, normalizer.mean, normalizer.std)
        self.masking = MaskingStrategy(
            self.config.masking, self.timeframes, int(self.config.data.seq_len)
        )
        self.eval_masking = evaluation_masking(
            self.config, self.timeframes, int(self.config.data.seq_len)
        )
        # Per stage: (global step, epoch, batch) int64 [3] and loss of the first non-finite
        # loss since the last check, on the loss's device; step -1 = none.
        self._nonfinite: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batches_unchecked = 0

    def forward(
        self, features: torch.Tensor, masks: torch.Tensor, times: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """features ``[B, n_tf, L, 6]``, masks bool ``[B, n_tf, L]`` -> model outputs."""
        return self.model(features, masks, times)

    def _masks(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor:
        times = batch["times"]
        keys: tuple[int, ...]
        generator: torch.Generator
        if stage == "train":
            keys = (_TRAIN_STREAM, self.current_epoch, batch_idx, self.global_rank)
            generator = mask_generator(times.device, self.config.seed, *keys)
            return self.masking.generate(times, generator, parents=batch.get("parents"))
        # Validation and test place spans like `stage1 evaluate` (no forced right-edge spans).
        generator = mask_generator(
            times.device, self.config.seed, _EVAL_STREAM, batch_idx, self.global_rank
        )
        return self.eval_masking.generate(
            times, generator, right_edge=0.0, parents=batch.get("parents")
        )

    def _common_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str
    ) -> dict[str, torch.Tensor]:
        """Mask, reconstruct, score and log one batch; returns loss and the tensors plotted."""
        masks = self._masks(batch, batch_idx, stage)
        if stage == "train":
            # Dropout draws from the global RNG: re-seeding per step makes a resumed run exact
            # (Lightning skips on_train_epoch_start for the first epoch after a resume).
            torch.manual_seed(
                mixed_seed(
                    self.config.seed,
                    _DROPOUT_STREAM,
                    self.current_epoch,
                    batch_idx,
                    self.global_rank,
                )
            )
        output = self.model(batch["features"], masks, batch["times"])
        reconstructed = output["reconstructed"]
        forecast = None
        if self.model.forecast_head is not None:
            # From the FULL window's embedding, the one served to Stage 2 (a second encoder pass).
            clean = self.model.encode(batch["features"], None, batch["times"])
            forecast = (self.model.forecast(clean), batch["future_log_vol"], batch["future_valid"])
        losses = self.criterion(
            reconstructed, batch["targets"], masks, batch["times"], output.get("scale"), forecast
        )
        self._record_nonfinite(stage, losses["total"], batch_idx)
        batch_size = int(batch["features"].shape[0])
        is_train = stage == "train"
        # Averaged over ranks, so DDP curves and checkpoint choices match a one-device run.
        log_kwargs: dict[str, Any] = {
            "batch_size": batch_size,
            "on_step": is_train,
            "on_epoch": True,
            "sync_dist": True,
        }
        # The forecast term only where there is a forecast head (no flat zero curve otherwise).
        parts = [p for p in LOSS_PARTS if p != "forecast" or forecast is not None]
        values = {"loss": losses["total"], **{name: losses[name] for name in parts}}
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", **log_kwargs)
        mae = _hidden_mae_per_tf(reconstructed.detach(), batch["targets"], masks)
        for tf, value in zip(self.timeframes, mae, strict=True):
            self.log(f"{stage}/mae_{tf}", value, **log_kwargs)
        return {"loss": losses["total"], "reconstructed": reconstructed.detach(), "masks": masks}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, batch_idx, "train")["loss"]

    # ------------------------------------------------------------------ non-finite losses
    def _record_nonfinite(self, stage: str, total: torch.Tensor, batch_idx: int) -> None:
        """Keep the first non-finite ``total`` of ``stage`` since the last check, on the device
        (elementwise ops only: nothing is read back)."""
        total = total.detach().float()
        if stage not in self._nonfinite:
            none = torch.full((3,), -1, dtype=torch.int64, device=total.device)
            self._nonfinite[stage] = (none, torch.zeros_like(total))
        where, value = self._nonfinite[stage]
        here = torch.full((3,), self.global_step, dtype=torch.int64, device=total.device)
        here[1], here[2] = self.current_epoch, batch_idx
        first = ~torch.isfinite(total) & (where[0] < 0)
        self._nonfinite[stage] = (torch.where(first, here, where), torch.where(first, total, value))

    def check_finite(self, stage: str = "train") -> None:
        """Raise :class:`TrainingDivergedError` if a ``stage`` loss was non-finite since the
        last check, naming the first such step (reads one small tensor: a host sync)."""
        if stage not in self._nonfinite:
            return
        where, value = self._nonfinite.pop(stage)
        step, epoch, batch = where.tolist()
        if step >= 0:
            raise TrainingDivergedError(
                f"{stage} loss is {value.item()} at global step {step} (epoch {epoch}, batch "
                f"{batch}); lower training.scheduler.max_lr or training.gradient_clip, or check "
                "the data"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Checked where Lightning reads the logged metrics back anyway (log_every_n_steps).
        self._batches_unchecked += 1
        every = int(getattr(self.trainer, "log_every_n_steps", 1) or 1)
        if self._batches_unchecked >= every:
            self._batches_unchecked = 0
            self.check_finite("train")

    def on_train_epoch_end(self) -> None:
        self.check_finite("train")

    def on_validation_start(self) -> None:
        self.check_finite("train")  # before validation and the checkpoint that may follow it

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite("train")  # a diverged model is never saved

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        out = self._common_step(batch, batch_idx, "val")
        self._val_skill.update(*self.skill_inputs(batch, out["reconstructed"], out["masks"]))
        return out

    def skill_inputs(
        self, batch: dict[str, torch.Tensor], reconstructed: torch.Tensor, masks: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(truth, pred, masks, times)`` in raw feature space, as ``stage1 evaluate`` feeds
        its :class:`MetricAccumulator`."""
        mean = self.model.norm_mean.double()[:, None, :]
        std = self.model.norm_std.double()[:, None, :]
        truth = batch["targets"].double() * std + mean
        pred = reconstructed.double() * std + mean
        return (
            truth.cpu().numpy(),
            pred.cpu().numpy(),
            masks.cpu().numpy(),
            batch["times"].cpu().numpy(),
        )

    def on_validation_epoch_start(self) -> None:
        self._val_skill = MetricAccumulator(
            self.timeframes, self.model.norm_std.double().cpu().numpy()
        )

    def on_validation_epoch_end(self) -> None:
        """Skill against the naive baselines on the hidden bars of this validation pass, computed
        by the evaluation's own accumulator (mean over timeframes and per timeframe)."""
        self.check_finite("val")
        if self._val_skill.n_windows == 0:
            return
        result = self._val_skill.result()
        values = {f"val/skill_{name}": result["mean"].get(f"skill_{name}") for name in SKILL_LOGGED}
        for tf, entry in result["per_tf"].items():
            values |= {
                f"val/skill_{name}_{tf}": entry.get(f"skill_{name}") for name in SKILL_LOGGED
            }
        for tag, value in values.items():
            if value is not None:
                prog = tag in ("val/skill_bridge", "val/skill_interp")
                self.log(tag, float(value), prog_bar=prog, sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._common_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self.check_finite("test")

    def configure_optimizers(self) -> Any:
        """AdamW + One-Cycle. Weight decay applies to matrices only (nanoGPT's rule): decaying
        biases, norm gains and the mask embedding towards 0 only hurts."""
        train_cfg = self.config.training
        sched_cfg = train_cfg.scheduler
        if sched_cfg.interval not in ("step", "epoch"):
            raise ConfigError(
                f"training.scheduler.interval: {sched_cfg.interval!r} is not 'step' or 'epoch'"
            )
        if not 0 < sched_cfg.pct_start < 1:
            raise ConfigError(
                f"training.scheduler.pct_start: must lie in (0, 1), got {sched_cfg.pct_start}"
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {
                "name": "decay",  # LearningRateMonitor tags: lr-AdamW/decay, lr-AdamW/no_decay
                "params": [p for p in params if p.ndim >= 2],
                "weight_decay": train_cfg.optimizer.weight_decay,
            },
            {"name": "no_decay", "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        # Fused: one kernel for the whole update on CUDA (Lightning has placed the model by now).
        optimizer = torch.optim.AdamW(
            groups,
            lr=sched_cfg.max_lr,
            betas=tuple(train_cfg.optimizer.betas),
            fused=all(p.is_cuda for p in params) and bool(params),
        )
        if sched_cfg.interval == "step":
            total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        else:
            total_steps = max(int(self.trainer.max_epochs or 1), 1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=sched_cfg.max_lr,
            total_steps=total_steps,
            pct_start=one_cycle_pct_start(sched_cfg.pct_start, total_steps),
            # The config's betas hold; One-Cycle would otherwise cycle beta1 in 0.85-0.95.
            cycle_momentum=False,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": sched_cfg.interval},
        }


def one_cycle_pct_start(pct_start: float, total_steps: int) -> float:
    """``pct_start`` unless it makes OneCycleLR divide by zero: its warm-up phase ends at step
    ``pct_start * total_steps - 1``, and a phase ending at step 0 has zero length."""
    if not math.isclose(pct_start * total_steps, 1.0):
        return pct_start
    return 2 / total_steps if total_steps > 2 else 0.25
