"""MultiTFWindowSampler and chronological_splits: no look-ahead, freshness, splits, cache, errors."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1.data.io import aggregate_bars, load_tf_data
from stage1.data.sampler import OHLC_COLUMNS, MultiTFWindowSampler
from stage1.data.splits import _assert_no_shared_bars, chronological_splits
from stage1.data.synthetic import generate_m1
from stage1.data.timeframes import tf_ns
from stage1.errors import DataValidationError

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]
SEED_LAYOUT_TFS = ["m30", "h1", "h4", "d"]


def make_frames(n_rows: int, timeframes: list[str], seed: int = 0) -> dict[str, pd.DataFrame]:
    """Synthetic M1 bars (weekends, short gaps) aggregated to ``timeframes`` in memory."""
    m1 = generate_m1(n_rows, seed=seed)
    return {tf: m1 if tf == "m1" else aggregate_bars(m1, tf) for tf in timeframes}


def open_ns(df: pd.DataFrame) -> np.ndarray:
    return df.index.as_unit("ns").asi8


# --------------------------------------------------------------------- shared checks
def assert_no_look_ahead(sampler: MultiTFWindowSampler, frames: dict[str, pd.DataFrame]) -> None:
    """Every window of every timeframe, vectorised: the newest bar closes at or before the
    anchor, and the bar after it (if any) closes after the anchor (no complete bar left out)."""
    anchors = sampler.anchor_ns
    for k, tf in enumerate(sampler.timeframes):
        close = open_ns(frames[tf]) + tf_ns(tf)
        end = sampler.end_rows[:, k]
        assert (end >= sampler.seq_len - 1).all(), tf
        assert (close[end] <= anchors).all(), f"{tf}: a bar closes after its anchor"
        has_next = end + 1 < len(close)
        assert (close[end[has_next] + 1] > anchors[has_next]).all(), (
            f"{tf}: a complete bar newer than the window's newest was left out"
        )
        bound = anchors - sampler.staleness_factor * tf_ns(tf)
        assert (close[end] >= bound).all(), f"{tf}: stale newest bar"


def assert_windows_match_frames(
    sampler: MultiTFWindowSampler, frames: dict[str, pd.DataFrame], n_samples: int = 25
) -> None:
    """get_window on sampled windows equals the newest seq_len complete bars of each frame."""
    rng = np.random.default_rng(0)
    for i in rng.choice(len(sampler), size=min(n_samples, len(sampler)), replace=False):
        anchor = sampler.anchor_times[i]
        window = sampler.get_window(int(i))
        assert list(window) == sampler.timeframes
        for tf, bars in window.items():
            close = frames[tf].index + pd.Timedelta(tf_ns(tf), "ns")
            expected = frames[tf][list(OHLC_COLUMNS)][close <= anchor].iloc[-sampler.seq_len :]
            assert len(bars) == sampler.seq_len
            assert (bars.index + pd.Timedelta(tf_ns(tf), "ns") <= anchor).all()
            pd.testing.assert_frame_equal(bars, expected, check_names=False, check_freq=False)


# --------------------------------------------------------------------- synthetic data
@pytest.fixture(scope="module")
def synthetic_frames(synthetic_data_dir: Path) -> dict[str, pd.DataFrame]:
    return load_tf_data(synthetic_data_dir, TIMEFRAMES)


@pytest.fixture(scope="module")
def synthetic_sampler(synthetic_frames: dict[str, pd.DataFrame]) -> MultiTFWindowSampler:
    return MultiTFWindowSampler(synthetic_frames, seq_len=16)


def test_no_bar_closes_after_anchor_synthetic(synthetic_sampler, synthetic_frames) -> None:
    assert len(synthetic_sampler) > 1000
    assert_no_look_ahead(synthetic_sampler, synthetic_frames)
    assert_windows_match_frames(synthetic_sampler, synthetic_frames)


def test_anchor_times_are_base_bar_closes(synthetic_sampler, synthetic_frames) -> None:
    anchors = synthetic_sampler.anchor_times
    assert str(anchors.dtype) == "datetime64[ns, UTC]"
    assert anchors.is_monotonic_increasing and anchors.is_unique
    base_open = synthetic_frames["m1"].index
    assert anchors.isin(base_open + pd.Timedelta(minutes=1)).all()
    np.testing.assert_array_equal(anchors.asi8, synthetic_sampler.anchor_ns)


def test_every_valid_anchor_is_indexed_brute_force() -> None:
    """An independent per-anchor loop decides validity; the sampler must agree exactly."""
    frames = make_frames(12_000, ["m1", "m15", "h1", "h4"], seed=3)
    seq_len, staleness = 8, 1.0
    sampler = MultiTFWindowSampler(frames, seq_len, staleness_factor=staleness)
    expected = []
    closes = {tf: open_ns(df) + tf_ns(tf) for tf, df in frames.items()}
    for anchor in closes["m1"]:
        ok = True
        for tf, close in closes.items():
            complete = close[close <= anchor]
            if len(complete) < seq_len or complete[-1] < anchor - staleness * tf_ns(tf):
                ok = False
                break
        if ok:
            expected.append(anchor)
    np.testing.assert_array_equal(sampler.anchor_ns, np.array(expected))


def test_weekend_windows_wait_for_a_fresh_bar(synthetic_frames) -> None:
    """Right after the weekly open no window exists until the h4 bar covering it closed."""
    sampler = MultiTFWindowSampler(synthetic_frames, seq_len=16)
    base = open_ns(synthetic_frames["m1"])
    week_open = base[1:][np.diff(base) > 24 * 3600 * 10**9]
    assert len(week_open) >= 3
    h4_close = open_ns(synthetic_frames["h4"]) + tf_ns("h4")
    for t in week_open:
        first_fresh = h4_close[np.searchsorted(h4_close, t, side="right")]
        after = sampler.anchor_ns[sampler.anchor_ns > t]
        assert after[0] >= first_fresh
    # With an unbounded staleness factor those anchors do become windows.
    lenient = MultiTFWindowSampler(synthetic_frames, seq_len=16, staleness_factor=1e6)
    assert len(lenient) > len(sampler)
    assert_no_look_ahead(lenient, synthetic_frames)


def test_gather_matches_get_window(synthetic_sampler) -> None:
    ids = np.array([0, 7, len(synthetic_sampler) - 1])
    ohlc, times = synthetic_sampler.gather(ids)
    n_tf, seq_len = len(TIMEFRAMES), synthetic_sampler.seq_len
    assert ohlc.shape == (3, n_tf, seq_len, 4) and ohlc.dtype == np.float64
    assert times.shape == (3, n_tf, seq_len) and times.dtype == np.int64
    for b, i in enumerate(ids):
        window = synthetic_sampler.get_window(int(i))
        for k, tf in enumerate(synthetic_sampler.timeframes):
            np.testing.assert_array_equal(ohlc[b, k], window[tf].to_numpy())
            np.testing.assert_array_equal(times[b, k], window[tf].index.as_unit("ns").asi8)
    assert (np.diff(times, axis=-1) > 0).all()  # oldest → newest


def test_naive_index_is_read_as_utc() -> None:
    frames = make_frames(6_000, ["m1", "m5", "h1"])
    naive = {tf: df.tz_localize(None) for tf, df in frames.items()}
    np.testing.assert_array_equal(
        MultiTFWindowSampler(naive, 8).end_rows, MultiTFWindowSampler(frames, 8).end_rows
    )


def test_microsecond_index_gives_the_same_windows() -> None:
    """pandas 3 may hold datetime64[us]: int64 views must still be nanoseconds."""
    frames = make_frames(6_000, ["m1", "m5", "h1"])
    micro = {tf: df.set_axis(df.index.as_unit("us")) for tf, df in frames.items()}
    a, b = MultiTFWindowSampler(micro, 8), MultiTFWindowSampler(frames, 8)
    np.testing.assert_array_equal(a.end_rows, b.end_rows)
    np.testing.assert_array_equal(a.anchor_ns, b.anchor_ns)


# --------------------------------------------------------------------- splits
@pytest.fixture(scope="module")
def long_frames() -> dict[str, pd.DataFrame]:
    """About 20 weeks: room for three splits with an h4 embargo at seq_len=16."""
    return make_frames(150_000, TIMEFRAMES, seed=1)


def assert_splits_disjoint_with_embargo(
    sampler: MultiTFWindowSampler, splits: dict[str, np.ndarray], embargo_ns: int
) -> None:
    first_open = sampler.first_open_ns()
    assert all(len(ids) for ids in splits.values())
    order = ["train", "val", "test"]
    for earlier, later in itertools.pairwise(order):
        last_anchor = sampler.anchor_ns[splits[earlier]].max()
        assert first_open[splits[later]].min() >= last_anchor + embargo_ns, (earlier, later)
        for k in range(len(sampler.timeframes)):
            rows_before = sampler.end_rows[splits[earlier], k]
            rows_after = sampler.end_rows[splits[later], k] - (sampler.seq_len - 1)
            assert rows_before.max() < rows_after.min()
    ids = np.concatenate([splits[name] for name in order])
    assert (np.diff(ids) > 0).all()  # chronological and no window in two splits


def test_splits_are_chronological_disjoint_with_embargo(long_frames) -> None:
    sampler = MultiTFWindowSampler(long_frames, seq_len=16)
    embargo = 16 * tf_ns("h4")
    splits = chronological_splits(sampler, 0.7, 0.15, embargo)
    assert_splits_disjoint_with_embargo(sampler, splits, embargo)
    assert len(splits["train"]) == int(len(sampler) * 0.7)
    # A larger embargo drops more windows; the rule still holds.
    wider = chronological_splits(sampler, 0.7, 0.15, 3 * embargo)
    assert len(wider["val"]) < len(splits["val"])
    assert_splits_disjoint_with_embargo(sampler, wider, 3 * embargo)


def test_split_overlap_check_can_fail(long_frames) -> None:
    sampler = MultiTFWindowSampler(long_frames, seq_len=16)
    overlapping = {"train": np.arange(0, 100), "val": np.arange(100, 200), "test": np.arange(0)}
    with pytest.raises(AssertionError, match="share bars"):
        _assert_no_shared_bars(sampler, overlapping)


def test_empty_split_after_embargo_is_a_clear_error(synthetic_frames) -> None:
    sampler = MultiTFWindowSampler(synthetic_frames, seq_len=16)
    with pytest.raises(DataValidationError, match=r"val split: all \d+ windows .* embargo"):
        chronological_splits(sampler, 0.7, 0.15, 30 * 24 * 3600 * 10**9)


# --------------------------------------------------------------------- real data
@pytest.mark.real_data
def test_real_data_windows_without_look_ahead_and_splits(real_data_dir: Path) -> None:
    frames = load_tf_data(real_data_dir, TIMEFRAMES)
    sampler = MultiTFWindowSampler(frames, seq_len=48)
    assert len(sampler) > 1_000_000
    assert_no_look_ahead(sampler, frames)
    assert_windows_match_frames(sampler, frames, n_samples=10)
    embargo = 48 * tf_ns("h4")
    splits = chronological_splits(sampler, 0.7, 0.15, embargo)
    assert_splits_disjoint_with_embargo(sampler, splits, embargo)


@pytest.mark.real_data
def test_seed_layout_files_give_valid_windows(seed_layout_dir: Path) -> None:
    frames = load_tf_data(seed_layout_dir, SEED_LAYOUT_TFS)
    sampler = MultiTFWindowSampler(frames, seq_len=48)
    assert sampler.base_tf == "m30"
    assert len(sampler) > 80_000
    assert sampler.anchor_times[0] > pd.Timestamp("2017-01-03", tz="UTC")
    assert_no_look_ahead(sampler, frames)
    assert_windows_match_frames(sampler, frames, n_samples=10)


# --------------------------------------------------------------------- errors
def test_too_few_rows_names_the_timeframe() -> None:
    frames = make_frames(3_000, ["m1", "h4"])
    n_h4 = len(frames["h4"])
    with pytest.raises(DataValidationError, match=rf"h4: only {n_h4} bars, seq_len=48 needs 48"):
        MultiTFWindowSampler(frames, seq_len=48)


def test_zero_valid_windows_names_the_rule() -> None:
    """h4 bars that end long before the m1 bars: every anchor has a stale h4 bar."""
    early = make_frames(20_000, ["m1", "h4"], seed=0)
    late = generate_m1(3_000, seed=1, start="2021-06-06 22:00")
    frames = {"m1": late, "h4": early["h4"]}
    with pytest.raises(DataValidationError, match=r"0 valid windows .*stale h4 bar") as info:
        MultiTFWindowSampler(frames, seq_len=8)
    assert "\n" not in str(info.value)


def test_zero_valid_windows_for_lack_of_history() -> None:
    frames = make_frames(3_000, ["m1", "h4"])
    frames["m1"] = frames["m1"].iloc[:300]  # ends before 8 h4 bars have closed
    with pytest.raises(DataValidationError, match=r"0 valid windows .*lack 8 h4 bars of history"):
        MultiTFWindowSampler(frames, seq_len=8)


def test_integer_index_is_rejected() -> None:
    frames = make_frames(3_000, ["m1", "h1"])
    frames["h1"] = frames["h1"].reset_index()
    with pytest.raises(DataValidationError, match="h1: bars must be indexed by a DatetimeIndex"):
        MultiTFWindowSampler(frames, seq_len=8)


# --------------------------------------------------------------------- cache
def test_cache_is_reused_and_equals_a_cold_build(tmp_path: Path, monkeypatch) -> None:
    frames = make_frames(8_000, ["m1", "m5", "h1"])
    cold = MultiTFWindowSampler(frames, 8)
    first = MultiTFWindowSampler(frames, 8, cache_dir=tmp_path)
    assert first.cache_path is not None and first.cache_path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]  # no temp files left

    def no_rebuild(self):
        raise AssertionError("index rebuilt although a valid cache exists")

    monkeypatch.setattr(MultiTFWindowSampler, "_build_index", no_rebuild)
    cached = MultiTFWindowSampler(frames, 8, cache_dir=tmp_path)
    np.testing.assert_array_equal(cached.end_rows, cold.end_rows)
    np.testing.assert_array_equal(cached.anchor_ns, cold.anchor_ns)


@pytest.mark.parametrize(
    "change",
    ["seq_len", "staleness_factor", "timeframes", "shifted_time", "dropped_bar"],
)
def test_cache_rebuilt_when_data_or_a_parameter_changes(tmp_path: Path, change: str) -> None:
    frames = make_frames(8_000, ["m1", "m5", "h1"])
    params = {"seq_len": 8, "staleness_factor": 1.0}
    original = MultiTFWindowSampler(frames, cache_dir=tmp_path, **params)
    changed = dict(frames)
    if change == "seq_len":
        params["seq_len"] = 9
    elif change == "staleness_factor":
        params["staleness_factor"] = 2.0
    elif change == "timeframes":
        changed = {tf: frames[tf] for tf in ("m1", "h1")}
    elif change == "shifted_time":  # one h1 bar a minute later: same shape, other content
        index = frames["h1"].index.to_numpy().copy()
        index[50] += np.timedelta64(1, "m")
        changed["h1"] = frames["h1"].set_axis(pd.DatetimeIndex(index, name="timestamp"))
    else:
        changed["m5"] = frames["m5"].drop(frames["m5"].index[100])
    rebuilt = MultiTFWindowSampler(changed, cache_dir=tmp_path, **params)
    assert rebuilt.cache_path != original.cache_path
    assert len(list(tmp_path.glob("windows_*.npy"))) == 2
    cold = MultiTFWindowSampler(changed, **params)
    np.testing.assert_array_equal(rebuilt.end_rows, cold.end_rows)


def test_prices_do_not_change_the_cache_key(tmp_path: Path) -> None:
    """The index depends only on times: new prices reuse the index but return new prices."""
    frames = make_frames(8_000, ["m1", "h1"])
    first = MultiTFWindowSampler(frames, 8, cache_dir=tmp_path)
    doubled = {tf: df * 2.0 for tf, df in frames.items()}
    second = MultiTFWindowSampler(doubled, 8, cache_dir=tmp_path)
    assert second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.gather([5])[0], 2.0 * first.gather([5])[0])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_content"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path: Path, damage: str) -> None:
    frames = make_frames(8_000, ["m1", "m5", "h1"])
    first = MultiTFWindowSampler(frames, 8, cache_dir=tmp_path)
    assert first.cache_path is not None
    # `first` maps the file; damaging it in place (what atomic writes never do) would pull the
    # pages from under that mapping, so keep a copy and drop the mapping first.
    expected = np.array(first.end_rows)
    del first.end_rows, first.anchor_ns
    if damage == "garbage":
        first.cache_path.write_bytes(b"not a numpy file")
    elif damage == "truncated":
        first.cache_path.write_bytes(first.cache_path.read_bytes()[:200])
    else:
        np.save(first.cache_path, np.zeros((3, 2), dtype=np.int64))
    with pytest.warns(UserWarning, match=rf"{first.cache_path.name}.*rebuilding"):
        rebuilt = MultiTFWindowSampler(frames, 8, cache_dir=tmp_path)
    np.testing.assert_array_equal(rebuilt.end_rows, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is valid again
        MultiTFWindowSampler(frames, 8, cache_dir=tmp_path)
