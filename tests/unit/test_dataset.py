"""Stage1Dataset and Stage1DataModule: batches, reproducible masks, sharding, loader settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from stage1.config import load_config
from stage1.data.dataset import (
    Stage1DataModule,
    Stage1Dataset,
    WindowBatchSampler,
    embargo_ns,
)
from stage1.data.features import FeatureEngineer
from stage1.data.normalization import TFNormalizer
from stage1.data.synthetic import write_synthetic_dataset
from stage1.data.timeframes import NS_PER_MINUTE, tf_ns
from stage1.errors import ConfigError, DataValidationError

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]
BATCH = 512  # large enough that a pass over every split takes few batches


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 17 weeks of synthetic M1: three splits survive the h4 embargo at seq_len=16."""
    out = tmp_path_factory.mktemp("dataset") / "data"
    return write_synthetic_dataset(out, n_rows=120_000, timeframes=TIMEFRAMES, seed=0)


@pytest.fixture(scope="module")
def config():
    return load_config("test", [f"training.batch_size={BATCH}"])


@pytest.fixture(scope="module")
def datamodule(data_dir: Path, config) -> Stage1DataModule:
    dm = Stage1DataModule(data_dir, config)
    dm.setup()
    return dm


def test_item_has_the_guides_keys_shapes_and_types(datamodule: Stage1DataModule) -> None:
    dataset = datamodule.datasets["train"]
    item = dataset[3]
    shapes = {key: (tuple(value.shape), value.dtype) for key, value in item.items()}
    assert shapes == {
        "features": ((6, 16, 6), torch.float32),
        "targets": ((6, 16, 6), torch.float32),
        "masks": ((6, 16), torch.bool),
        "times": ((6, 16), torch.int64),
        "ref_price": ((), torch.float64),
        "window_ids": ((), torch.int64),
    }
    assert torch.equal(item["features"], item["targets"])
    assert item["window_ids"].item() == dataset.window_ids[3]
    assert not item["masks"][0, 0] and item["masks"].any(-1).all()


def test_item_masks_are_reproducible_and_differ_between_items(datamodule) -> None:
    dataset = datamodule.datasets["val"]
    assert torch.equal(dataset[5]["masks"], dataset[5]["masks"])
    assert torch.equal(dataset[-1]["masks"], dataset[len(dataset) - 1]["masks"])
    assert any(not torch.equal(dataset[5]["masks"], dataset[i]["masks"]) for i in range(6, 12))
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_get_batch_equals_items(datamodule) -> None:
    dataset = datamodule.datasets["test"]
    batch = dataset.get_batch([0, 10, 20])
    for b, i in enumerate([0, 10, 20]):
        item = dataset[i]
        for key in ("features", "targets", "times", "ref_price", "window_ids"):
            assert torch.equal(batch[key][b], item[key]), key
    assert batch["ref_price"].dtype == torch.float64


def test_features_are_normalised_with_train_stats(datamodule) -> None:
    train = datamodule.datasets["train"]
    batch = train.get_batch(np.arange(0, len(train), 7))
    z = batch["features"]
    assert z.mean(dim=(0, 2)).abs().max() < 0.1
    assert ((z.std(dim=(0, 2)) - 1).abs() < 0.1).all()
    engineer = FeatureEngineer(datamodule.config)
    raw = engineer.process_batch(train.sampler.gather(batch["window_ids"].numpy())[0])[0]
    torch.testing.assert_close(train.normalizer.denormalize(z), raw, rtol=1e-4, atol=1e-7)


def test_normalizer_records_the_train_period_and_keeps_it_through_a_dict(datamodule) -> None:
    sampler, train_ids = datamodule.sampler, datamodule.splits["train"]
    period = datamodule.normalizer.train_period
    assert period is not None
    assert pd.Timestamp(period[0]).value == sampler.first_open_ns(train_ids).min()
    assert pd.Timestamp(period[1]).value == sampler.anchor_ns[train_ids[-1]]
    # The period ends before any val window starts (it is the in-sample period).
    assert pd.Timestamp(period[1]).value < sampler.anchor_ns[datamodule.splits["val"][0]]
    restored = TFNormalizer.from_dict(datamodule.normalizer.to_dict())
    assert restored.train_period == period


def test_datamodule_shares_one_sampler_and_normalizer(datamodule) -> None:
    datasets = datamodule.datasets
    assert all(d.sampler is datamodule.sampler for d in datasets.values())
    assert all(d.normalizer is datamodule.normalizer for d in datasets.values())
    for split, ids in datamodule.splits.items():
        np.testing.assert_array_equal(datasets[split].window_ids, ids)
    embargo = embargo_ns(datamodule.config)
    sampler = datamodule.sampler
    first_open = sampler.first_open_ns()
    for earlier, later in (("train", "val"), ("val", "test")):
        last_anchor = sampler.anchor_ns[datamodule.splits[earlier][-1]]
        assert first_open[datamodule.splits[later]].min() >= last_anchor + embargo


def test_embargo_is_the_longest_window_span_or_the_config(config) -> None:
    assert embargo_ns(config) == 16 * tf_ns("h4")
    longer = load_config("test", ["data.embargo_minutes=20000"])
    assert embargo_ns(longer) == 20000 * NS_PER_MINUTE


def test_standalone_dataset_equals_the_datamodules(data_dir, config, datamodule) -> None:
    dataset = Stage1Dataset(data_dir, config, "val")
    np.testing.assert_array_equal(dataset.window_ids, datamodule.splits["val"])
    assert torch.equal(dataset.normalizer.mean, datamodule.normalizer.mean)
    assert torch.equal(dataset[4]["features"], datamodule.datasets["val"][4]["features"])


def test_limit_train_windows_keeps_the_first_n(data_dir) -> None:
    config = load_config("test", ["data.limit_train_windows=100"])
    dm = Stage1DataModule(data_dir, config)
    dm.setup()
    np.testing.assert_array_equal(dm.datasets["train"].window_ids, dm.splits["train"][:100])
    seen = np.concatenate([b["window_ids"].numpy() for b in dm.train_dataloader()])
    assert sorted(seen) == sorted(dm.splits["train"][:100])


# --------------------------------------------------------------------- loaders
def planned_ids(loader, dataset: Stage1Dataset) -> list[np.ndarray]:
    """Window ids of each batch the loader will fetch (its index sampler, without features)."""
    return [dataset.window_ids[positions] for positions in loader.sampler]


def test_loader_batches_are_the_planned_windows(datamodule) -> None:
    loader = datamodule.train_dataloader()
    plan = planned_ids(loader, datamodule.datasets["train"])
    for ids_only, ids in zip(loader, plan[:3], strict=False):
        batch = datamodule.on_after_batch_transfer(ids_only, 0)
        assert batch["features"].shape == (len(ids), 6, 16, 6)
        np.testing.assert_array_equal(batch["window_ids"].numpy(), ids)
    assert len(loader) == len(plan)


def test_train_loader_shuffles_per_epoch_and_covers_the_split(datamodule) -> None:
    loader = datamodule.train_dataloader()
    train = datamodule.datasets["train"]
    assert max(len(ids) for ids in planned_ids(loader, train)) == BATCH
    epoch0 = np.concatenate(planned_ids(loader, train))
    again = np.concatenate(planned_ids(loader, train))
    loader.sampler.set_epoch(1)  # Lightning calls this at the start of every epoch
    epoch1 = np.concatenate(planned_ids(loader, train))
    np.testing.assert_array_equal(epoch0, again)
    assert not np.array_equal(epoch0, epoch1)
    assert sorted(epoch0) == sorted(epoch1) == sorted(datamodule.splits["train"])


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_loaders_visit_every_window_once_in_order(datamodule, split: str) -> None:
    loader = getattr(datamodule, f"{split}_dataloader")()
    batches = [batch["window_ids"].numpy() for batch in loader]
    np.testing.assert_array_equal(np.concatenate(batches), datamodule.splits[split])
    assert max(len(b) for b in batches) <= BATCH


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_shards_with_equal_steps(datamodule, world_size: int) -> None:
    per_rank: dict[str, list[list[np.ndarray]]] = {"train": [], "test": []}
    for rank in range(world_size):
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        try:
            for split in per_rank:
                loader = getattr(datamodule, f"{split}_dataloader")()
                per_rank[split].append(planned_ids(loader, datamodule.datasets[split]))
        finally:
            datamodule.trainer = None
    for split, ranks in per_rank.items():
        assert len({len(batches) for batches in ranks}) == 1, f"{split}: unequal step counts"
        assert max(len(b) for batches in ranks for b in batches) <= BATCH // world_size
        ids = np.concatenate([np.concatenate(batches) for batches in ranks])
        assert len(np.unique(ids)) == len(ids), f"{split}: a window on two ranks"
        expected = datamodule.splits[split]
        if split == "test":
            assert sorted(ids) == sorted(expected)  # evaluation never drops a window
        else:
            assert len(expected) - len(ids) < world_size


def test_batch_size_smaller_than_world_size_is_a_config_error(datamodule) -> None:
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=BATCH + 1)
    try:
        with pytest.raises(ConfigError, match=r"training\.batch_size"):
            datamodule.train_dataloader()
    finally:
        datamodule.trainer = None


def test_loader_settings_follow_the_config(data_dir, datamodule) -> None:
    overrides = [
        "dataloader.num_workers=2",
        "dataloader.prefetch_factor=3",
        "dataloader.persistent_workers=true",
        "dataloader.pin_memory=true",
    ]
    config = load_config("test", [*overrides, f"training.batch_size={BATCH}"])
    dm = Stage1DataModule(data_dir, config, normalizer=datamodule.normalizer)
    dm.setup()
    loader = dm.val_dataloader()
    assert loader.num_workers == 2 and loader.prefetch_factor == 3
    assert loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()  # pinning needs an accelerator
    ids = np.concatenate([b["window_ids"].numpy() for b in loader])  # batches from workers
    np.testing.assert_array_equal(ids, dm.splits["val"])
    plain = datamodule.val_dataloader()
    assert plain.num_workers == 0 and not plain.persistent_workers and plain.prefetch_factor is None


def test_window_batch_sampler_edge_cases() -> None:
    assert list(WindowBatchSampler(0, 8, shuffle=False)) == []
    batches = list(WindowBatchSampler(10, 4, shuffle=False, rank=1, world_size=2))
    assert [b.tolist() for b in batches] == [[5, 6, 7], [8, 9]]
    assert len(WindowBatchSampler(10, 4, shuffle=True, world_size=3)) == 1


# --------------------------------------------------------------------- errors
def test_unknown_split_is_a_config_error(data_dir, config) -> None:
    with pytest.raises(ConfigError, match="'valid' is not one of"):
        Stage1Dataset(data_dir, config, "valid")


def test_missing_timeframe_file_is_named(data_dir, config, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for tf in TIMEFRAMES[:-1]:
        (partial / f"{tf}.parquet").write_bytes((data_dir / f"{tf}.parquet").read_bytes())
    with pytest.raises(DataValidationError, match=r"no file for timeframe h4 .*h4\.parquet"):
        Stage1Dataset(partial, config, "train")


def test_corrupt_parquet_is_named(data_dir, config, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for tf in TIMEFRAMES:
        (broken / f"{tf}.parquet").write_bytes((data_dir / f"{tf}.parquet").read_bytes())
    (broken / "m15.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match=r"m15\.parquet: not a readable Parquet file"):
        Stage1Dataset(broken, config, "train")


def test_too_few_rows_is_a_clear_error(data_dir, config) -> None:
    long = load_config("test", ["data.seq_len=1000"])
    with pytest.raises(DataValidationError, match=r"h4: only \d+ bars, seq_len=1000 needs 1000"):
        Stage1Dataset(data_dir, long, "train")


def test_cache_dir_from_the_config(data_dir, datamodule, tmp_path: Path) -> None:
    config = load_config("test", [f"data.cache_dir={tmp_path / 'cache'}"])
    dataset = Stage1Dataset(data_dir, config, "train", datamodule.normalizer)
    assert dataset.sampler.cache_path is not None and dataset.sampler.cache_path.is_file()
    assert dataset.sampler.cache_path.parent == tmp_path / "cache"
