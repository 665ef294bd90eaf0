"""Data-pipeline integration test (the guide's ``tests/test_stage1_data.py``).

Runs the whole path on a prepared synthetic data directory with ``configs/test.yaml``:
Stage1Dataset samples, their mask ratios, Stage1DataModule batches, and a test loader that visits
every test window exactly once. Also runnable directly: ``cd tests && python3 test_stage1_data.py [pytest flags]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule, Stage1Dataset
from stage1.data.masking import MaskingStrategy
from stage1.data.synthetic import write_synthetic_dataset

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 15 weeks of synthetic M1: enough for train/val/test with the h4 embargo."""
    out = tmp_path_factory.mktemp("pipeline") / "data"
    return write_synthetic_dataset(out, n_rows=100_000, timeframes=TIMEFRAMES, seed=4)


@pytest.fixture(scope="module")
def config():
    return load_config("test", ["training.batch_size=256"])


def test_dataset_sample_shapes(data_dir: Path, config) -> None:
    dataset = Stage1Dataset(data_dir, config, split="train")
    assert len(dataset) > 10_000
    sample = dataset[0]
    n_tf, seq_len = len(TIMEFRAMES), config.data.seq_len
    assert sample["features"].shape == (n_tf, seq_len, 6)
    assert sample["targets"].shape == (n_tf, seq_len, 6)
    assert sample["masks"].shape == (n_tf, seq_len) and sample["masks"].dtype == torch.bool
    assert torch.isfinite(sample["features"]).all()


def _ratio_per_tf(dataset: Stage1Dataset) -> torch.Tensor:
    step = len(dataset) // 1500
    masks = torch.stack([dataset[i]["masks"] for i in range(0, len(dataset), step)])
    return masks.float().mean(dim=(0, 2))


def test_dataset_mask_ratios(data_dir: Path, config) -> None:
    """Each timeframe hides mask_ratio of its bars; synchronised masks (the default) also hide
    the coarser bars that overlap hidden finer ones, so only the base timeframe stays at it."""
    target = config.masking.mask_ratio
    synced = _ratio_per_tf(Stage1Dataset(data_dir, config, split="val"))
    assert config.masking.sync_tf
    assert abs(synced[0] - target) <= 0.02 and (synced[1:] >= target - 0.02).all(), synced
    unsynced_config = load_config("test", ["training.batch_size=256", "masking.sync_tf=false"])
    unsynced = _ratio_per_tf(Stage1Dataset(data_dir, unsynced_config, split="val"))
    assert (unsynced - target).abs().max() <= 0.02, unsynced


def test_datamodule_batches_and_masks(data_dir: Path, config) -> None:
    dm = Stage1DataModule(data_dir, config)
    dm.setup("fit")
    ids = next(iter(dm.train_dataloader()))
    assert set(ids) == {"window_ids"}  # the loader yields ids; the batch is built on the device
    batch = dm.on_after_batch_transfer(ids, 0)
    n_tf, seq_len = len(TIMEFRAMES), config.data.seq_len
    assert batch["features"].shape == (256, n_tf, seq_len, 6)
    assert batch["features"].dtype == torch.float32
    assert batch["times"].shape == (256, n_tf, seq_len) and batch["times"].dtype == torch.int64
    assert batch["ref_price"].shape == (256,) and batch["window_ids"].shape == (256,)
    # What the LightningModule does on the batch's device:
    masks = MaskingStrategy(config.masking, dm.sampler.timeframes, seq_len).generate(batch["times"])
    assert masks.shape == (256, n_tf, seq_len)
    # Every window's bars close no later than its anchor (the window's end).
    anchors = torch.from_numpy(dm.sampler.anchor_ns[batch["window_ids"].numpy()])
    durations = torch.tensor([60_000_000_000 * m for m in (1, 5, 15, 30, 60, 240)])
    closes = batch["times"] + durations[None, :, None]
    assert (closes <= anchors[:, None, None]).all()


def test_test_loader_visits_every_test_window_once(data_dir: Path, config) -> None:
    dm = Stage1DataModule(data_dir, config)
    dm.setup("test")
    seen = np.concatenate([b["window_ids"].numpy() for b in dm.test_dataloader()])
    np.testing.assert_array_equal(seen, dm.splits["test"])
    assert len(seen) > 0
    assert not set(seen) & (set(dm.splits["train"]) | set(dm.splits["val"]))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
