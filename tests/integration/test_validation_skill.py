"""Training trains what the evaluation scores: synchronised masks by default, right-edge spans in
training only, and validation skill equal to `stage1 evaluate`'s accumulator on the same windows
and masks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule
from stage1.evaluation.metrics import MetricAccumulator
from stage1.training import Stage1LightningModule, build_trainer

SPLITS = ["data.train_frac=0.4", "data.val_frac=0.3", "data.limit_train_windows=64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def module_and_data(synthetic_data_dir: Path) -> tuple[Stage1LightningModule, Stage1DataModule]:
    config = load_config("configs/test.yaml", [*SPLITS, "training.limit_val_batches=3"])
    datamodule = Stage1DataModule(synthetic_data_dir, config)
    datamodule.setup("fit")
    assert datamodule.normalizer is not None
    L.seed_everything(0, verbose=False)
    module = Stage1LightningModule(config, datamodule.normalizer.to_dict())
    for decoder in module.model.decoders:  # a model that differs from its bridge prior
        torch.nn.init.normal_(decoder.head.weight, std=0.05)
    return module, datamodule


def test_training_masks_are_synchronised_by_default(module_and_data) -> None:
    module, datamodule = module_and_data
    assert load_config("configs/base.yaml").masking.sync_tf is True
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    masks = module._masks(batch, 0, "train")
    resynced = module.masking._sync(masks, batch["times"])
    assert torch.equal(masks, resynced), "every coarse bar over a hidden fine bar is hidden"
    unsynced = module.masking.generate(batch["times"], torch.Generator().manual_seed(0), sync=False)
    assert not torch.equal(unsynced, module.masking._sync(unsynced, batch["times"]))


def test_right_edge_share_applies_to_training_masks_only(module_and_data) -> None:
    module, datamodule = module_and_data
    ids = next(iter(datamodule.train_dataloader()))
    times = datamodule.on_after_batch_transfer(ids, 0)["times"]
    times = times.repeat(16, 1, 1)  # 512 windows: shares are measurable
    masking = module.masking

    def newest_hidden(ratio: float) -> float:
        masks = masking.generate(times, torch.Generator().manual_seed(1), right_edge=ratio)
        return float(masks[:, 0, -1].float().mean())

    natural, always = newest_hidden(0.0), newest_hidden(1.0)
    assert always == 1.0, "ratio 1: every base row ends in a hidden span"
    assert natural < 0.2
    assert abs(newest_hidden(0.5) - (0.5 + 0.5 * natural)) < 0.08
    # Validation (and `stage1 evaluate`) place spans at random whatever the training share is.
    batch = {"times": times}
    val = module._masks(batch, 0, "val")
    assert masking.right_edge_ratio > 0
    assert float(val[:, 0, -1].float().mean()) < 0.2


def test_validation_skill_equals_the_evaluation_accumulator(module_and_data, tmp_path) -> None:
    module, datamodule = module_and_data
    trainer = build_trainer(module.config, tmp_path, accelerator="cpu")
    logged = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    # The evaluation's path: the dataset's normaliser, evaluate's accumulator, the same masks.
    normalizer = datamodule.normalizer
    assert normalizer is not None
    accumulator = MetricAccumulator(datamodule.sampler.timeframes, normalizer.std.double().numpy())
    module.eval()
    with torch.no_grad():
        for batch_idx, ids in enumerate(datamodule.val_dataloader()):
            if batch_idx == 3:
                break
            batch = datamodule.on_after_batch_transfer(ids, 0)
            masks = module._masks(batch, batch_idx, "val")
            out = module.model(batch["features"], masks, batch["times"])["reconstructed"]
            accumulator.update(
                normalizer.denormalize(batch["targets"]).double().numpy(),
                normalizer.denormalize(out).double().numpy(),
                masks.numpy(),
                batch["times"].numpy(),
            )
    expected = accumulator.result()
    for name in ("bridge", "interp", "last"):
        assert logged[f"val/skill_{name}"] == pytest.approx(
            expected["mean"][f"skill_{name}"], abs=1e-5
        )
        for tf, entry in expected["per_tf"].items():
            if entry[f"skill_{name}"] is not None:
                assert logged[f"val/skill_{name}_{tf}"] == pytest.approx(
                    entry[f"skill_{name}"], abs=1e-5
                )
    assert np.isfinite(logged["val/skill_bridge"]) and logged["val/skill_bridge"] != 0.0
