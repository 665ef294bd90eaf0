"""Stage1Dataset and Stage1DataModule: windows → features → normalised batches.

Batches are assembled whole, on the device that uses them, by :class:`DeviceBatchBuilder`: the
loaders yield only the window ids of a batch, Lightning moves them to the training device, and
``Stage1DataModule.on_after_batch_transfer`` builds the batch there (gather, features and
normalisation as torch ops on the sampler's bars, which moved to that device once). A batch is
a dict (ARCHITECTURE.md):
``features``/``targets`` float32 ``[B, n_tf, seq_len, 6]`` (normalised, unmasked),
``times`` int64 ``[B, n_tf, seq_len]``, ``ref_price`` float64 ``[B]``, ``window_ids`` int64
``[B]``; when the timeframes nest also ``parents`` int64 ``[B, n_tf - 1, seq_len]``
(``DeviceBatchBuilder.parents``, for the masks' sync). Masks for training are drawn by the
LightningModule on the batch's device; ``Stage1Dataset[i]`` adds reproducible ``masks`` for
inspection and debugging.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stage1.config import ConfigLike, as_config
from stage1.data.device_batch import DeviceBatchBuilder
from stage1.data.instruments import DataDirs, balanced_order, find_instruments, load_bar_blocks
from stage1.data.masking import MaskingStrategy
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.splits import chronological_splits
from stage1.data.timeframes import NS_PER_MINUTE, sort_timeframes, tf_ns
from stage1.errors import ConfigError

SPLITS = ("train", "val", "test", "all")
# Normalisation statistics converge long before this many windows; more only costs time.
MAX_FIT_WINDOWS = 50_000
FIT_CHUNK_WINDOWS = 1024  # bounds the float64 temporaries of the fit to ~15 MB

Batch = dict[str, torch.Tensor]


def embargo_ns(config: ConfigLike) -> int:
    """Gap between splits: the largest of ``data.embargo_minutes``, the longest timeframe's
    window span and twice the longest forecast horizon (``model.forecast_horizons``, base bars:
    a train window's labels then never reach into the next split)."""
    config = as_config(config)
    data = config.data
    span = max(data.seq_len * tf_ns(tf) for tf in data.timeframes)
    horizons = list(config.model.forecast_horizons)
    base = tf_ns(sort_timeframes(list(data.timeframes))[0])
    labels = 2 * max(horizons, default=0) * base
    return max((data.embargo_minutes or 0) * NS_PER_MINUTE, span, labels)


def build_sampler(data_dir: DataDirs, config: ConfigLike) -> MultiTFWindowSampler:
    """Index the windows of ``data_dir`` for ``config.data.timeframes``: one instrument's
    directory, a root of instrument directories, or several of either (``data.instruments``
    selects; see ``stage1.data.instruments``); memory-mapped with ``data.cache_dir``."""
    data = as_config(config).data
    selected = None if data.instruments is None else list(data.instruments)
    instruments = find_instruments(data_dir, data.timeframes, selected)
    blocks = load_bar_blocks(instruments, data.timeframes, data.cache_dir)
    return MultiTFWindowSampler.from_blocks(
        blocks, data.seq_len, staleness_factor=data.staleness_factor, cache_dir=data.cache_dir
    )


def build_splits(sampler: MultiTFWindowSampler, config: ConfigLike) -> dict[str, np.ndarray]:
    """Chronological train/val/test window ids with the config's embargo (see ``embargo_ns``)."""
    data = as_config(config).data
    return chronological_splits(sampler, data.train_frac, data.val_frac, embargo_ns(config))


def fit_normalizer(
    sampler: MultiTFWindowSampler,
    train_ids: np.ndarray,
    seed: int,
    max_windows: int = MAX_FIT_WINDOWS,
    builder: DeviceBatchBuilder | None = None,
) -> TFNormalizer:
    """Fit a TFNormalizer on the features of train windows only: all of them, or a random
    subset of ``max_windows`` drawn with ``seed`` (deterministic), streamed in chunks.
    ``builder``: the sampler's batch builder, if one exists already (else one is made)."""
    ids = np.asarray(train_ids)
    if len(ids) > max_windows:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=max_windows, replace=False))
    builder = builder or DeviceBatchBuilder(sampler)
    chunks = (
        builder.features(ids[i : i + FIT_CHUNK_WINDOWS], normalize=False)
        for i in range(0, len(ids), FIT_CHUNK_WINDOWS)
    )
    normalizer = TFNormalizer(sampler.timeframes).fit(chunks)
    # The whole train split's period (not only the fitted subset): what "out of sample" means.
    oldest, newest = sampler.period_ns(train_ids)
    normalizer.train_period = (
        pd.Timestamp(oldest, tz="UTC").isoformat(),
        pd.Timestamp(newest, tz="UTC").isoformat(),
    )
    return normalizer


class Stage1Dataset(Dataset[Batch]):
    """Windows of one split (``train``, ``val``, ``test`` or ``all``) as normalised features.

    Reads ``data_dir`` and builds the sampler and splits, unless ``sampler`` and ``splits`` are
    given (``Stage1DataModule`` builds them once and shares them, and its CPU ``builder``).
    Without a ``normalizer`` one is fitted on the train split. ``window_ids`` are the split's
    windows (ids into ``sampler``). Batches are built on the CPU (``builder``'s device).
    """

    def __init__(
        self,
        data_dir: DataDirs | None,
        config: ConfigLike,
        split: str,
        normalizer: TFNormalizer | None = None,
        *,
        sampler: MultiTFWindowSampler | None = None,
        splits: dict[str, np.ndarray] | None = None,
        builder: DeviceBatchBuilder | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
        config = as_config(config)
        if sampler is None:
            if data_dir is None:
                raise ValueError("Stage1Dataset needs data_dir or a sampler")
            sampler = build_sampler(data_dir, config)
        if splits is None:
            splits = build_splits(sampler, config)
        self.config = config
        self.split = split
        self.sampler = sampler
        self.splits = splits
        self.builder = builder or DeviceBatchBuilder(
            sampler, horizons=list(config.model.forecast_horizons)
        )
        self.masking = MaskingStrategy(config.masking, sampler.timeframes, sampler.seq_len)
        self.window_ids: npt.NDArray[np.int64] = (
            np.arange(len(sampler), dtype=np.int64) if split == "all" else splits[split]
        )
        limit = config.data.limit_train_windows
        if split == "train" and limit is not None:
            self.window_ids = self.window_ids[:limit]
        if normalizer is None:
            train_ids = splits["train"] if limit is None else splits["train"][:limit]
            normalizer = fit_normalizer(sampler, train_ids, config.seed, builder=self.builder)
        self.normalizer = normalizer
        self.builder.set_normalizer(normalizer)

    def __len__(self) -> int:
        return len(self.window_ids)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Batch of the split's windows at ``indices`` (positions in this split), vectorised."""
        return self.builder.batch(self.window_ids[np.asarray(indices, dtype=np.int64)])

    def __getitem__(self, i: int) -> Batch:
        """One window (no batch dim) plus ``masks`` drawn with seed ``config.seed + i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} {self.split} windows")
        i = i % len(self)
        batch = self.get_batch([i])
        generator = torch.Generator().manual_seed(int(self.config.seed) + i)
        parents = batch.pop("parents", None)  # the sync's helper, not one of the guide's keys
        batch["masks"] = self.masking.generate(batch["times"], generator=generator, parents=parents)
        return {key: value[0] for key, value in batch.items()}


class WindowBatchSampler(Sampler[np.ndarray]):
    """Yields arrays of dataset positions, one per batch, for this rank's shard.

    ``shuffle=True`` (training): a permutation seeded by ``seed + epoch`` (``set_epoch`` is
    called by Lightning each epoch), the same on every rank, cut into ``world_size`` strided
    shards of equal size (at most ``world_size - 1`` windows left out per epoch, different ones
    each epoch), then into batches; the last batch may be smaller. With ``groups`` (the
    instrument of every position) the epoch draws every group equally often instead
    (``balanced_order``: ``data.instrument_mixing=uniform``).
    ``shuffle=False`` (evaluation): every window exactly once, in order; the windows are split
    into contiguous shards and each shard into the same number of near-equal batches
    (``ceil(shard / batch_size)``), so all ranks run the same number of steps.
    """

    def __init__(
        self,
        n_windows: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        groups: np.ndarray | None = None,
    ) -> None:
        self.n_windows = n_windows
        self.groups = groups
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> Iterator[np.ndarray]:
        if self.shuffle:
            rng = np.random.default_rng(self.seed + self.epoch)
            if self.groups is None:
                # rng.permutation(n), in int32 when it fits: the same order, half the memory
                # (an epoch of tens of millions of windows).
                order = np.arange(
                    self.n_windows, dtype=np.int32 if self.n_windows < 2**31 else np.int64
                )
                rng.shuffle(order)
            else:
                order = balanced_order(self.groups, rng)
            usable = self.n_windows // self.world_size * self.world_size
            shard = order[self.rank : usable : self.world_size]
            # Sorted within a batch: the gather then walks memory forwards (order is irrelevant).
            # One batch at a time: an epoch of ids is large for many instruments.
            return (
                np.sort(shard[i : i + self.batch_size])
                for i in range(0, len(shard), self.batch_size)
            )
        if self.n_windows == 0:
            return iter([])
        shards = np.array_split(np.arange(self.n_windows), self.world_size)
        n_batches = -(-len(shards[0]) // self.batch_size)  # shard 0 is the largest
        return iter([b for b in np.array_split(shards[self.rank], n_batches) if len(b)])

    def __iter__(self) -> Iterator[np.ndarray]:
        # A generator: the order is drawn at the first batch, after Lightning's set_epoch (on
        # --resume the iterator is created before the epoch counter is restored).
        yield from self._batches()

    def __len__(self) -> int:
        if self.shuffle:  # without drawing the permutation
            return -(-(self.n_windows // self.world_size) // self.batch_size)
        return sum(1 for _ in self._batches())


class _WindowIds(Dataset[Batch]):
    """Indexed by a whole array of positions: the batch's window ids, ``{'window_ids': [B]}``
    (``Stage1DataModule.on_after_batch_transfer`` builds the batch from them)."""

    def __init__(self, dataset: Stage1Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: np.ndarray) -> Batch:
        return {"window_ids": torch.from_numpy(self.dataset.window_ids[indices])}

    def __len__(self) -> int:
        return len(self.dataset)


class Stage1DataModule(L.LightningDataModule):
    """Train/val/test loaders over ONE sampler; DDP-safe without a DistributedSampler.

    Build the Trainer with ``use_distributed_sampler=False``: each rank takes its own shard
    (rank and world size from the attached trainer, else 0 and 1) with a per-device batch of
    ``training.batch_size // world_size``. Val and test loaders cover every window exactly once.

    Loaders yield ``{'window_ids': [B]}`` only; ``on_after_batch_transfer`` (called by
    Lightning after moving them to the device, or by hand) turns them into the full batch on
    that device. The sampler's bars go to each device once (``builder(device)``).
    """

    def __init__(
        self, data_dir: DataDirs, config: ConfigLike, normalizer: TFNormalizer | None = None
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.config = as_config(config)
        self.normalizer = normalizer
        self.sampler: MultiTFWindowSampler | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.datasets: dict[str, Stage1Dataset] = {}
        self._builders: dict[torch.device, DeviceBatchBuilder] = {}
        # Batches carry the forecast labels when the model has a forecast head.
        self.horizons = [int(h) for h in self.config.model.forecast_horizons]

    def setup(self, stage: str | None = None) -> None:
        """Build the sampler, splits, normaliser and datasets (once; later calls are no-ops)."""
        if self.sampler is not None:
            return
        sampler = build_sampler(self.data_dir, self.config)
        self.splits = build_splits(sampler, self.config)
        builder = DeviceBatchBuilder(sampler, horizons=self.horizons)

        def dataset(split: str) -> Stage1Dataset:
            return Stage1Dataset(
                None, self.config, split, self.normalizer,
                sampler=sampler, splits=self.splits, builder=builder,
            )  # fmt: skip

        self.datasets = {"train": dataset("train")}
        self.normalizer = self.datasets["train"].normalizer
        for split in ("val", "test"):
            self.datasets[split] = dataset(split)
        self._builders = {builder.device: builder}
        self.sampler = sampler

    def builder(self, device: str | torch.device) -> DeviceBatchBuilder:
        """The batch builder on ``device`` (the bars are moved there on the first call)."""
        if not self.datasets:
            self.setup()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._builders:
            assert self.sampler is not None
            self._builders[device] = DeviceBatchBuilder(
                self.sampler, self.normalizer, device, horizons=self.horizons
            )
        return self._builders[device]

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """``{'window_ids'}`` on a device → the full batch, built on that device."""
        ids = batch["window_ids"]
        return self.builder(ids.device).batch(ids)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        rank, world_size = self._rank_and_world()
        batch_size = self.config.training.batch_size // world_size
        if batch_size < 1:
            raise ConfigError(
                f"training.batch_size: {self.config.training.batch_size} is smaller than the "
                f"{world_size} devices it is split across"
            )
        dataset = self.datasets[split]
        mix_uniform = self.config.data.instrument_mixing == "uniform"
        groups = None
        if shuffle and mix_uniform and len(dataset.sampler.instruments) > 1:
            groups = dataset.sampler.instrument_of(dataset.window_ids)
        batches = WindowBatchSampler(
            len(dataset), batch_size, shuffle, int(self.config.seed), rank, world_size, groups
        )
        cfg = self.config.dataloader
        workers = int(cfg.num_workers)
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = {
                "persistent_workers": bool(cfg.persistent_workers),
                "prefetch_factor": int(cfg.prefetch_factor),
            }
        return DataLoader(
            _WindowIds(dataset),
            batch_size=None,
            sampler=batches,
            num_workers=workers,
            pin_memory=bool(cfg.pin_memory) and torch.cuda.is_available(),
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
