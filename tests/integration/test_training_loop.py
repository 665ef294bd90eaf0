"""`stage1 train` through the real CLI on CPU: fast_dev_run, learning (overfit), exact resume,
two-process DDP, bf16-mixed, the exported model, and the failures a user can hit."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from omegaconf import DictConfig

import stage1.training as training
from stage1.checkpoint import load_checkpoint
from stage1.cli import main
from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule, Stage1Dataset
from stage1.data.masking import MaskingStrategy
from stage1.data.normalization import TFNormalizer
from stage1.errors import TrainingDivergedError
from stage1.module import Stage1LightningModule, one_cycle_pct_start
from stage1.training import read_scalars

# Splits that fit the synthetic fixture's weeks with the test config's 64 h embargo.
SPLITS = ["data.train_frac=0.4", "data.val_frac=0.3"]
# Two optimizer steps and two validation batches per epoch: seconds per epoch on 2 CPU cores.
SHORT = ["data.limit_train_windows=64", "training.limit_val_batches=2"]
# configs/overfit_test.yaml shrunk to 8 fixed windows, one full batch per step, no validation:
# the STFT log-magnitude term only falls once reconstruction is nearly exact (~1000 steps).
OVERFIT = [
    "data.limit_train_windows=8",
    "training.batch_size=8",
    "training.max_epochs=1200",
    "training.limit_val_batches=0",
    "training.scheduler.max_lr=1e-2",
]
# Three SHORT epochs (6 steps), logging and profiling often enough to show in 6 steps.
THREE_EPOCHS = [
    *SHORT,
    "training.max_epochs=3",
    "training.log_every_n_steps=1",
    "training.profile_every_n_steps=2",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(data_dir: Path, out: Path, *args: str, config: str = "test") -> int:
    """`stage1 train` in this process (flags first, then key=value overrides)."""
    flags = [a for a in args if "=" not in a]
    overrides = [a for a in args if a not in flags]
    argv = ["train", "--config", config, "--data_dir", str(data_dir), "--output_dir", str(out)]
    return main([*argv, *flags, *SPLITS, *overrides])


def last_checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def three_epoch_run(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 3-epoch run of the test config (2 steps per epoch)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train(synthetic_data_dir, out, *THREE_EPOCHS) == 0
    return out


def test_fast_dev_run_writes_config_and_stats_but_no_export(
    synthetic_data_dir: Path, tmp_path: Path
) -> None:
    assert train(synthetic_data_dir, tmp_path, "--fast_dev_run") == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["experiment_name"] == "stage1_test"
    assert saved["data"]["train_frac"] == 0.4, "the resolved config includes CLI overrides"
    assert (tmp_path / "normalizer_stats.json").is_file()
    assert not (tmp_path / "checkpoints" / "stage1_best.pth").exists()


def test_run_logs_every_loss_component_per_tf_mae_lr_and_memory(three_epoch_run: Path) -> None:
    scalars = read_scalars(three_epoch_run)
    timeframes = load_config("test").data.timeframes
    for stage in ("train", "val"):
        suffix = "_epoch" if stage == "train" else ""
        for name in ("loss", "huber", "stft", "cross_tf", "amp_phase"):
            assert f"{stage}/{name}{suffix}" in scalars
        for tf in timeframes:
            assert f"{stage}/mae_{tf}{suffix}" in scalars
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay", "memory/rss_mb"} <= scalars.keys()
    assert len(scalars["val/loss"]) == 3, "one validation per epoch"
    lrs = [value for _, value in scalars["lr-AdamW/decay"]]
    assert max(lrs) == pytest.approx(load_config("test").training.scheduler.max_lr, rel=0.5)
    assert lrs[-1] < max(lrs), "One-Cycle anneals the learning rate"


def test_exported_model_equals_the_trained_model(
    three_epoch_run: Path, synthetic_data_dir: Path
) -> None:
    ckpt_dir = three_epoch_run / "checkpoints"
    blob = torch.load(ckpt_dir / "stage1_best.pth", weights_only=True)
    assert blob["format"] == "stage1-export-v1"
    assert not [k for k in blob["model_state_dict"] if "_orig_mod" in k or "module." in k]
    assert blob["config"] == yaml.safe_load((three_epoch_run / "config.yaml").read_text())
    best = torch.load(ckpt_dir / "stage1_best.ckpt", weights_only=True)
    best_score = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert blob["best_loss"] == pytest.approx(float(best_score["best_model_score"]))
    assert blob["epoch"] == best["epoch"]

    # The trained module as Lightning rebuilds it from its own checkpoint (hparams only).
    trained = Stage1LightningModule.load_from_checkpoint(
        ckpt_dir / "stage1_best.ckpt", map_location="cpu", weights_only=True
    ).eval()
    exported, config, normalizer_stats, meta = load_checkpoint(ckpt_dir / "stage1_best.pth")
    assert meta["source"] == "export"
    val = Stage1Dataset(synthetic_data_dir, config, "val", TFNormalizer.from_dict(normalizer_stats))
    batch = val.get_batch(range(8))
    masks = torch.stack([val[i]["masks"] for i in range(8)])
    with torch.no_grad():
        expected = trained(batch["features"], masks)
        actual = exported(batch["features"], masks)
    for key in ("reconstructed", "encoded"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


class _CrashAtEpoch(L.Callback):
    """Stands in for a killed process: dies when epoch ``epoch`` starts (after the previous
    epoch's last.ckpt is written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at epoch {self.epoch}")


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(
    three_epoch_run: Path,
    synthetic_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tolerance: none. On CPU (deterministic) the resumed run's weights, optimizer state,
    scheduler and best score are bit-for-bit those of the uninterrupted run."""
    build_trainer = training.build_trainer

    def crashing_trainer(*args: object, **kwargs: object) -> L.Trainer:
        trainer = build_trainer(*args, **kwargs)  # type: ignore[arg-type]
        trainer.callbacks.append(_CrashAtEpoch(2))  # type: ignore[attr-defined]
        return trainer

    monkeypatch.setattr(training, "build_trainer", crashing_trainer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(synthetic_data_dir, tmp_path, *THREE_EPOCHS)
    monkeypatch.setattr(training, "build_trainer", build_trainer)
    assert last_checkpoint(tmp_path)["epoch"] == 1, "killed after two of three epochs"

    assert train(synthetic_data_dir, tmp_path, "--resume", *THREE_EPOCHS) == 0
    resumed, uninterrupted = last_checkpoint(tmp_path), last_checkpoint(three_epoch_run)
    assert (resumed["epoch"], resumed["global_step"]) == (2, 6)
    assert resumed["global_step"] == uninterrupted["global_step"]
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for a, b in zip(
        resumed["optimizer_states"][0]["state"].values(),
        uninterrupted["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(
            a["exp_avg_sq"], b["exp_avg_sq"]
        )
    assert resumed["lr_schedulers"] == uninterrupted["lr_schedulers"]
    scores = [
        next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
        for ckpt in (resumed, uninterrupted)
    ]
    assert torch.equal(scores[0]["best_model_score"], scores[1]["best_model_score"])


@pytest.mark.slow
def test_overfit_config_drives_training_loss_down_90_percent(
    synthetic_data_dir: Path, tmp_path: Path
) -> None:
    """Proof that model + loss can learn: the overfit config on a small fixed subset, predicting
    hidden bars from scratch (``model.prior=none``; measured: loss x 0.008). With the default agg
    prior the loss starts at the prior's error and halves in these 1 200 steps (0.0008 -> 0.0004):
    a correction of a naive fill is not a memoriser; its learning is measured against the
    baselines on real data instead (benchmarks/quality.py, docs/RESULTS.md)."""
    argv = [*OVERFIT, "model.prior=none"]
    assert train(synthetic_data_dir, tmp_path, *argv, config="overfit_test") == 0
    scalars = read_scalars(tmp_path)
    first = scalars["train/loss_step"][0][1]
    final = scalars["train/loss_epoch"][-1][1]
    assert math.isfinite(final)
    assert final <= 0.1 * first, f"training loss fell only from {first:.4f} to {final:.4f}"


@pytest.mark.slow
def test_two_cpu_processes_with_ddp(synthetic_data_dir: Path, tmp_path: Path) -> None:
    """Lightning's 'ddp' re-launches the command line, so this runs the real console entry."""
    argv = [sys.executable, "-m", "stage1.cli", "train", "--config", "test"]
    argv += ["--data_dir", str(synthetic_data_dir), "--output_dir", str(tmp_path)]
    argv += ["--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"]
    argv += [*SPLITS, *SHORT, "training.max_epochs=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert (tmp_path / "checkpoints" / "stage1_best.pth").is_file()
    # Global batch 32 over 2 processes: 16 windows each, 32 per optimizer step, 2 steps.
    assert last_checkpoint(tmp_path)["global_step"] == 2


def test_bf16_mixed_precision_runs_on_cpu(synthetic_data_dir: Path, tmp_path: Path) -> None:
    args = ("--precision", "bf16-mixed", *SHORT, "training.max_epochs=1")
    args += ("training.log_every_n_steps=1",)
    assert train(synthetic_data_dir, tmp_path, *args) == 0
    assert last_checkpoint(tmp_path)["hyper_parameters"]["config"]["training"]["precision"] == (
        "bf16-mixed"
    )
    scalars = read_scalars(tmp_path)
    losses = [value for tag in ("train/loss_step", "val/loss") for _, value in scalars[tag]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_resume_without_last_checkpoint_is_a_one_line_error(
    synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(synthetic_data_dir, tmp_path, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "last.ckpt" in err and "--resume" in err
    assert len(err.splitlines()) == 1


def test_resume_into_a_different_model_is_refused(
    three_epoch_run: Path, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = train(synthetic_data_dir, three_epoch_run, "--resume", *SHORT, "model.d_model=32")
    assert rc == 2
    assert "same data.* and model.* settings" in capsys.readouterr().err


def test_unusable_trainer_flags_are_a_one_line_error(
    synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(synthetic_data_dir, tmp_path, "--strategy", "no_such_strategy") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stage1 train: error: --accelerator/--devices/--strategy")
    assert "no_such_strategy" in err and len(err.splitlines()) == 1


def diverging_module(
    data_dir: Path, config: DictConfig, bad_step: int
) -> tuple[Stage1DataModule, Stage1LightningModule]:
    """A real module whose training loss turns NaN at optimizer step ``bad_step``."""
    datamodule = Stage1DataModule(data_dir, config)
    datamodule.setup("fit")
    assert datamodule.normalizer is not None
    module = Stage1LightningModule(config, datamodule.normalizer.to_dict())
    real_forward = module.criterion.forward

    def poisoned(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        losses = real_forward(*args, **kwargs)
        if module.training and module.global_step == bad_step:
            losses["total"] = losses["total"] * float("nan")
        return losses

    module.criterion.forward = poisoned  # type: ignore[method-assign]
    return datamodule, module


def test_a_diverging_run_stops_naming_the_first_non_finite_step(
    synthetic_data_dir: Path, tmp_path: Path
) -> None:
    """The NaN at step 2 is read back at the next metric read (every log_every_n_steps = 4
    batches), so the run stops after batch 3, names step 2 and saves no checkpoint."""
    config = load_config(
        "test", [*SPLITS, "training.log_every_n_steps=4", "training.limit_val_batches=0"]
    )
    datamodule, module = diverging_module(synthetic_data_dir, config, bad_step=2)
    trainer = training.build_trainer(config, tmp_path, accelerator="cpu")
    with pytest.raises(
        TrainingDivergedError, match=r"train loss is nan at global step 2 \(epoch 0, batch 2\)"
    ):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4  # checked at the cadence, not after every step
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))


def test_the_step_masks_sync_through_the_batch_parents(synthetic_data_dir: Path) -> None:
    """Training and validation masks of a batch with ``parents`` (nesting timeframes) are the
    ones the search over its times gives."""
    config = load_config("test", SPLITS)
    datamodule, module = diverging_module(synthetic_data_dir, config, bad_step=-1)
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    searched = {key: value for key, value in batch.items() if key != "parents"}
    assert "parents" in batch
    for stage in ("train", "val"):
        masks = module._masks(batch, 0, stage)
        assert torch.equal(masks, module._masks(searched, 0, stage)) and masks[:, 1:].any()


def test_training_step_reads_nothing_back_from_the_device(
    synthetic_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No .item(), .cpu(), .tolist(), .numpy() or Python truth test of a tensor in the step:
    each would make the host wait for the GPU every step."""
    config = load_config("test", SPLITS)
    datamodule, module = diverging_module(synthetic_data_dir, config, bad_step=-1)
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)

    def refuse(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training_step read a tensor back to the host")

    # The masks' CPU-only shortcut reads a count back (free there); run their accelerator path.
    monkeypatch.setattr(MaskingStrategy, "read_back_devices", ())

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss = module.training_step(batch, 0)
    monkeypatch.undo()
    assert math.isfinite(loss.item())


def test_training_step_leaves_the_batch_features_untouched(synthetic_data_dir: Path) -> None:
    """A batch's ``targets`` is its ``features`` tensor (no copy): the step, backward
    included, must mask a copy, or the loss would compare the reconstruction with the
    masked input."""
    config = load_config("test", SPLITS)
    datamodule, module = diverging_module(synthetic_data_dir, config, bad_step=-1)
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert batch["targets"] is batch["features"]
    before = batch["features"].clone()
    module.training_step(batch, 0).backward()
    assert torch.equal(batch["features"], before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_waits_for_nothing(synthetic_data_dir: Path) -> None:
    """On the GPU, batch building, masks, forward, loss and the NaN bookkeeping of a step
    queue work without a host sync (CUDA's sync debug mode raises on any) once the first step
    has put the constants on the device."""
    config = load_config("test", SPLITS)
    datamodule, module = diverging_module(synthetic_data_dir, config, bad_step=-1)
    module = module.cuda()
    ids = next(iter(datamodule.train_dataloader()))["window_ids"].cuda()
    warm_up = datamodule.on_after_batch_transfer({"window_ids": ids}, 0)  # moves the bars once
    module.training_step(warm_up, 0)  # and makes the per-device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = datamodule.on_after_batch_transfer({"window_ids": ids}, 0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("pct_start", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_one_cycle_schedule_runs_for_any_number_of_steps(pct_start: float) -> None:
    """OneCycleLR divides by zero when pct_start * total_steps == 1 (e.g. 10 steps at 0.1)."""
    for total_steps in range(1, 64):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=1e-3,
            total_steps=total_steps,
            pct_start=one_cycle_pct_start(pct_start, total_steps),
            cycle_momentum=False,
        )
        for _ in range(total_steps):
            optimizer.step()
            schedule.step()
