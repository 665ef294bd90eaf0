"""stage1.data.instruments: data roots of several instruments, one sampler over all of them,
splits at the same calendar times, memory-mapped bar cache, batch mixing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from stage1.config import load_config
from stage1.data.dataset import (
    Stage1DataModule,
    WindowBatchSampler,
    build_sampler,
    build_splits,
    embargo_ns,
)
from stage1.data.instruments import (
    balanced_order,
    find_instruments,
    load_bar_blocks,
)
from stage1.data.io import load_tf_data, write_bars
from stage1.data.sampler import MultiTFWindowSampler, split_cut_times
from stage1.data.synthetic import write_synthetic_root
from stage1.errors import ConfigError, DataValidationError

TIMEFRAMES = ["m1", "m5", "m15", "m30"]
NAMES = ["EURUSD", "GBPUSD", "USDJPY"]
CONFIG = [f"data.timeframes=[{','.join(TIMEFRAMES)}]", "data.seq_len=16"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic instruments, each starting six hours after the previous one."""
    return write_synthetic_root(
        tmp_path_factory.mktemp("root"), NAMES, 12_000, TIMEFRAMES, stagger_minutes=360
    )


@pytest.fixture(scope="module")
def config():
    return load_config("test", CONFIG)


@pytest.fixture(scope="module")
def sampler(root: Path, config) -> MultiTFWindowSampler:
    return build_sampler(root, config)


def _rows_of(sampler: MultiTFWindowSampler, ids: np.ndarray, k: int) -> tuple[int, int]:
    """Oldest and newest row of timeframe ``k`` over the windows ``ids``, by brute force."""
    rows = sampler.end_rows[ids, k]
    return int(rows.min()) - (sampler.seq_len - 1), int(rows.max())


def test_a_root_is_found_instrument_by_instrument(root: Path) -> None:
    found = find_instruments(root, TIMEFRAMES)
    assert [i.name for i in found] == NAMES
    assert [i.name for i in find_instruments(root / "GBPUSD", TIMEFRAMES)] == ["GBPUSD"]
    both = find_instruments([root / "USDJPY", root / "EURUSD"], TIMEFRAMES)
    assert [i.name for i in both] == ["EURUSD", "USDJPY"]
    assert [i.name for i in find_instruments(root, TIMEFRAMES, ["USDJPY"])] == ["USDJPY"]
    with pytest.raises(ConfigError, match=r"data.instruments: \['AUDUSD'\] not found"):
        find_instruments(root, TIMEFRAMES, ["AUDUSD"])
    with pytest.raises(DataValidationError, match="instrument EURUSD: found twice"):
        find_instruments([root, root / "EURUSD"], TIMEFRAMES)


def test_an_instrument_without_a_timeframe_names_the_instrument_and_the_file(
    root: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "root"
    for name in NAMES:
        (copy / name).mkdir(parents=True)
        for tf in TIMEFRAMES:
            if not (name == "GBPUSD" and tf == "m30"):
                (copy / name / f"{tf}.parquet").write_bytes(
                    (root / name / f"{tf}.parquet").read_bytes()
                )
    with pytest.raises(DataValidationError) as info:
        find_instruments(copy, TIMEFRAMES)
    message = str(info.value)
    assert message.startswith("instrument GBPUSD: ")
    assert "m30.parquet" in message and str(copy / "GBPUSD") in message and "\n" not in message


def test_no_window_mixes_instruments(sampler: MultiTFWindowSampler, root: Path, config) -> None:
    assert sampler.instruments == NAMES
    starts = sampler.block_starts
    owner = sampler.instrument_of(np.arange(len(sampler)))
    assert np.all(np.diff(owner) >= 0) and set(owner.tolist()) == {0, 1, 2}
    for k in range(len(TIMEFRAMES)):
        oldest = sampler.end_rows[:, k] - (sampler.seq_len - 1)
        assert np.all(oldest >= starts[owner, k]), "a window starts in another instrument's rows"
        assert np.all(sampler.end_rows[:, k] < starts[owner + 1, k])
    # Each instrument's windows are exactly the windows of that instrument alone.
    for i, name in enumerate(NAMES):
        alone = MultiTFWindowSampler(load_tf_data(root / name, TIMEFRAMES), config.data.seq_len)
        window = sampler.instrument_windows(i)
        np.testing.assert_array_equal(sampler.end_rows[window] - starts[i], alone.end_rows)
        np.testing.assert_array_equal(sampler.anchor_ns[window], alone.anchor_ns)
        ids = np.arange(window.start, window.stop, 97)
        ohlc, times = sampler.gather(ids)
        alone_ohlc, alone_times = alone.gather(ids - window.start)
        np.testing.assert_array_equal(ohlc, alone_ohlc)
        np.testing.assert_array_equal(times, alone_times)
        np.testing.assert_array_equal(sampler.instrument_of(ids), np.full(len(ids), i))


def test_splits_cut_every_instrument_at_the_same_calendar_times(
    sampler: MultiTFWindowSampler, config
) -> None:
    splits = build_splits(sampler, config)
    train_end, val_end = split_cut_times(sampler, config.data.train_frac, config.data.val_frac)
    embargo = embargo_ns(config)
    assert train_end < val_end
    for i in range(len(NAMES)):
        window = sampler.instrument_windows(i)
        mine = {
            name: ids[(ids >= window.start) & (ids < window.stop)] for name, ids in splits.items()
        }
        assert all(len(ids) for ids in mine.values()), "every instrument is in every split"
        # Every bar of every window (all timeframes) on the right side of the common cuts.
        _, train_times = sampler.gather(mine["train"])
        _, val_times = sampler.gather(mine["val"])
        _, test_times = sampler.gather(mine["test"])
        assert sampler.anchor_ns[mine["train"]].max() <= train_end
        assert val_times.min() >= train_end + embargo
        assert sampler.anchor_ns[mine["val"]].max() <= val_end
        assert test_times.min() >= val_end + embargo
        assert train_times.max() < train_end  # bars open before the anchor they close by
        # No bar of this instrument is in two splits, timeframe by timeframe (brute force).
        for k in range(len(TIMEFRAMES)):
            spans = [_rows_of(sampler, mine[name], k) for name in ("train", "val", "test")]
            assert spans[0][1] < spans[1][0] and spans[1][1] < spans[2][0]
    # The pooled cut: train holds about train_frac of all windows.
    assert abs(len(splits["train"]) / len(sampler) - config.data.train_frac) < 0.01


def test_cut_times_are_not_each_instruments_own(sampler: MultiTFWindowSampler, config) -> None:
    """The instruments start six hours apart, so cutting each one at its own 70 % would give three
    different times; the common cut gives one."""
    own = []
    for i in range(len(NAMES)):
        anchors = sampler.anchor_ns[sampler.instrument_windows(i)]
        own.append(int(anchors[int(len(anchors) * config.data.train_frac) - 1]))
    assert len(set(own)) == 3
    train_end, _ = split_cut_times(sampler, config.data.train_frac, config.data.val_frac)
    assert min(own) <= train_end <= max(own)


def test_one_instrument_gives_the_splits_of_before(root: Path, config) -> None:
    """A single-instrument sampler built through a root equals the classic sampler, splits too."""
    frames = load_tf_data(root / "USDJPY", TIMEFRAMES)
    classic = MultiTFWindowSampler(frames, config.data.seq_len)
    alone = build_sampler(root / "USDJPY", config)
    np.testing.assert_array_equal(alone.end_rows, classic.end_rows)
    n = len(classic)
    n_train = int(n * config.data.train_frac)
    splits = build_splits(alone, config)
    np.testing.assert_array_equal(splits["train"], np.arange(n_train))
    first_val = splits["val"][0]
    assert classic.first_open_ns([first_val])[0] >= classic.anchor_ns[n_train - 1] + embargo_ns(
        config
    )


def test_bar_cache_is_memory_mapped_equal_and_reused(
    root: Path, config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instruments = find_instruments(root, TIMEFRAMES)
    in_memory = load_bar_blocks(instruments, TIMEFRAMES)
    cached = load_bar_blocks(instruments, TIMEFRAMES, tmp_path)
    for k in range(len(TIMEFRAMES)):
        assert isinstance(cached.open_ns[k], np.memmap) and isinstance(cached.ohlc[k], np.memmap)
        np.testing.assert_array_equal(cached.open_ns[k], in_memory.open_ns[k])
        np.testing.assert_array_equal(cached.ohlc[k], in_memory.ohlc[k])
    np.testing.assert_array_equal(cached.starts, in_memory.starts)
    assert [p.name.startswith("bars_") for p in tmp_path.iterdir()] == [True]  # no temp dirs

    import stage1.data.instruments as module

    def no_rebuild(*args: object) -> None:
        raise AssertionError("bars rebuilt although a valid cache exists")

    monkeypatch.setattr(module, "_build_cached", no_rebuild)
    again = load_bar_blocks(instruments, TIMEFRAMES, tmp_path)
    assert again.content_key == cached.content_key
    cached_config = load_config("test", [*CONFIG, f"data.cache_dir={tmp_path}"])
    mapped = build_sampler(root, cached_config)
    assert isinstance(mapped.end_rows, np.memmap) and isinstance(mapped.anchor_ns, np.memmap)
    plain = build_sampler(root, config)
    np.testing.assert_array_equal(mapped.end_rows, plain.end_rows)
    np.testing.assert_array_equal(mapped.anchor_ns, plain.anchor_ns)
    np.testing.assert_array_equal(
        mapped.gather([0, 5, len(plain) - 1])[0], plain.gather([0, 5, len(plain) - 1])[0]
    )


def test_changed_bars_are_never_read_from_a_stale_cache(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "root"
    for name in NAMES:
        (copy / name).mkdir(parents=True)
        for tf in TIMEFRAMES:
            (copy / name / f"{tf}.parquet").write_bytes(
                (root / name / f"{tf}.parquet").read_bytes()
            )
    cache = tmp_path / "cache"
    first = load_bar_blocks(find_instruments(copy, TIMEFRAMES), TIMEFRAMES, cache)
    old_close = float(first.ohlc[1][first.starts[2, 1] + 7, 3])
    # Same file name, same rows and times: only one high differs (still a valid bar).
    path = copy / "USDJPY" / "m5.parquet"
    bars = load_tf_data(copy / "USDJPY", ["m5"])["m5"].copy()
    bars.iloc[7, bars.columns.get_loc("high")] += 0.5
    write_bars(bars, path)
    second = load_bar_blocks(find_instruments(copy, TIMEFRAMES), TIMEFRAMES, cache)
    assert second.content_key != first.content_key
    assert float(second.ohlc[1][second.starts[2, 1] + 7, 1]) == pytest.approx(
        float(bars["high"].iloc[7])
    )
    assert float(second.ohlc[1][second.starts[2, 1] + 7, 3]) == old_close
    assert len(list(cache.glob("bars_*"))) == 2


def test_corrupt_bar_cache_is_rebuilt_with_a_warning(root: Path, tmp_path: Path) -> None:
    instruments = find_instruments(root, TIMEFRAMES)
    first = load_bar_blocks(instruments, TIMEFRAMES, tmp_path)
    expected = np.array(first.ohlc[0])
    directory = next(tmp_path.glob("bars_*"))
    del first
    np.save(directory / "m1_ohlc.npy", np.zeros((3, 4)))
    with pytest.warns(UserWarning, match=r"bar cache .* is unreadable .*rebuilding"):
        rebuilt = load_bar_blocks(instruments, TIMEFRAMES, tmp_path)
    np.testing.assert_array_equal(rebuilt.ohlc[0], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_bar_blocks(instruments, TIMEFRAMES, tmp_path)


def test_balanced_order_draws_every_instrument_equally_often() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), [1000, 100, 10])
    order = balanced_order(groups, rng)
    assert len(order) == len(groups)
    counts = np.bincount(groups[order])
    assert counts.max() - counts.min() <= 1
    # Large groups are subsampled without repeats; small ones cycle through all their windows.
    big = order[groups[order] == 0]
    assert len(np.unique(big)) == len(big)
    small = order[groups[order] == 2]
    assert set(small.tolist()) == set(range(1100, 1110))
    assert np.bincount(small - 1100).max() - np.bincount(small - 1100).min() <= 1


def test_uniform_mixing_reaches_the_train_loader(root: Path) -> None:
    config = load_config(
        "test",
        [
            *CONFIG,
            "data.instrument_mixing=uniform",
            "dataloader.num_workers=0",
            "training.batch_size=64",
        ],
    )
    dm = Stage1DataModule(root, config)
    dm.setup()
    assert dm.sampler is not None
    ids = np.concatenate([b["window_ids"].numpy() for b in dm.train_dataloader()])
    counts = np.bincount(dm.sampler.instrument_of(ids), minlength=3)
    assert counts.max() - counts.min() <= 1
    by_size = load_config("test", [*CONFIG, "dataloader.num_workers=0", "training.batch_size=64"])
    dm = Stage1DataModule(root, by_size)
    dm.setup()
    ids = np.concatenate([b["window_ids"].numpy() for b in dm.train_dataloader()])
    assert len(np.unique(ids)) == len(ids) == len(dm.splits["train"])  # each window once


def test_window_batch_sampler_with_groups_keeps_rank_shards_disjoint() -> None:
    groups = np.repeat(np.arange(2), [300, 30])
    shards = [
        np.concatenate(list(WindowBatchSampler(330, 16, True, 3, rank, 2, groups)))
        for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 165
    counts = np.bincount(groups[np.concatenate(shards)])
    assert abs(int(counts[0]) - int(counts[1])) <= 1


def test_instrument_mixing_value_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"data.instrument_mixing: 'even' is not size\|uniform"):
        load_config("test", ["data.instrument_mixing=even"])


def test_probe_horizons_stop_at_the_end_of_their_instrument(sampler: MultiTFWindowSampler) -> None:
    """Rows of the next instrument follow an instrument's last bar in the shared row space; a
    probe target must not read them."""
    from stage1.evaluation.probe import probe_targets

    open_ns, ohlc = sampler.timeframe_bars(0)
    ids = np.arange(len(sampler))
    end_rows = sampler.end_rows[ids, 0]
    row_end = sampler.block_starts[sampler.instrument_of(ids) + 1, 0]
    horizon = 15
    _, _, valid = probe_targets(ohlc[:, 3], open_ns, end_rows, horizon, 60_000_000_000, row_end)
    assert valid.any()
    assert np.all(end_rows[valid] + horizon < row_end[valid])
    crossing = end_rows + horizon >= row_end
    assert crossing.any() and not valid[crossing].any()
    # Without the bound the next instrument's (earlier) bars pass the gap rule: the bug it stops.
    _, _, unbounded = probe_targets(ohlc[:, 3], open_ns, end_rows, horizon, 60_000_000_000)
    assert unbounded[crossing].any()
