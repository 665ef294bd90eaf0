"""The cross-timeframe baseline ``agg`` and the covered / uncovered split of hidden coarse bars."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_baselines import features_from_ohlc

from stage1.data.features import CLOSE, HIGH, LOW, OPEN
from stage1.data.io import aggregate_bars
from stage1.data.synthetic import generate_m1
from stage1.data.timeframes import tf_ns
from stage1.evaluation.agg import baseline_agg
from stage1.evaluation.baselines import PRICE_FEATURES, baseline_bridge
from stage1.evaluation.metrics import MetricAccumulator

TIMEFRAMES = ["m1", "m5", "m15"]
SEQ_LEN = 20
PRICE = list(PRICE_FEATURES)


def real_windows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Windows cut from synthetic M1 bars and their real aggregates, as the sampler cuts them:
    per timeframe the ``SEQ_LEN`` newest bars complete at the anchor (the close of an M1 bar).

    Returns raw features ``[n, 3, L, 6]`` (log price / the base window's first open) and open
    times ``[n, 3, L]`` (int64 ns).
    """
    m1 = generate_m1(6_000, seed=seed)
    frames = {tf: m1 if tf == "m1" else aggregate_bars(m1, tf) for tf in TIMEFRAMES}
    opens = {tf: pd.DatetimeIndex(f.index).as_unit("ns").asi8 for tf, f in frames.items()}
    anchors = opens["m1"][np.linspace(2_000, 5_900, n).astype(int)] + tf_ns("m1")
    values = np.empty((n, len(TIMEFRAMES), SEQ_LEN, 6))
    times = np.empty((n, len(TIMEFRAMES), SEQ_LEN), dtype=np.int64)
    for i, anchor in enumerate(anchors):
        for k, tf in enumerate(TIMEFRAMES):
            end = np.searchsorted(opens[tf] + tf_ns(tf), anchor, side="right")
            rows = slice(end - SEQ_LEN, end)
            ohlc = frames[tf][["open", "high", "low", "close"]].to_numpy()[rows]
            if k == 0:
                ref = ohlc[0, 0]
            values[i, k] = features_from_ohlc(np.log(ohlc / ref)[None])[0]
            times[i, k] = opens[tf][rows]
    return values, times


def synchronised_masks(times: np.ndarray, seed: int) -> np.ndarray:
    """Random spans in every timeframe, then every coarser bar overlapping a hidden base bar
    hidden too (as ``stage1 evaluate`` masks)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros(times.shape, dtype=bool)
    for row in masks.reshape(-1, SEQ_LEN):
        for _ in range(rng.integers(1, 3)):
            start = int(rng.integers(1, SEQ_LEN))
            row[start : start + int(rng.integers(1, 6))] = True
    for k, tf in enumerate(TIMEFRAMES[1:], start=1):
        base_open, coarse_open = times[:, 0], times[:, k]
        overlaps = (base_open[:, None, :] >= coarse_open[:, :, None]) & (
            base_open[:, None, :] < coarse_open[:, :, None] + tf_ns(tf)
        )  # [n, L_coarse, L_base]
        masks[:, k] |= (overlaps & masks[:, 0, None, :]).any(axis=2)
    return masks


def test_agg_never_reads_hidden_values_of_any_timeframe():
    values, times = real_windows(24)
    masks = synchronised_masks(times, seed=1)
    tampered = values.copy()
    tampered[masks] = np.random.default_rng(1).normal(0, 1, (int(masks.sum()), 6))
    guess, covered = baseline_agg(values, masks, times, TIMEFRAMES)
    guess_t, covered_t = baseline_agg(tampered, masks, times, TIMEFRAMES)
    assert covered[:, 1:].any() and (masks[:, 1:] & ~covered[:, 1:]).any()
    np.testing.assert_array_equal(covered, covered_t)
    np.testing.assert_array_equal(guess[masks], guess_t[masks])


def test_agg_equals_the_true_ohlc_of_a_coarse_bar_whose_finer_bars_are_all_visible():
    values, times = real_windows(16)
    masks = np.zeros(times.shape, dtype=bool)
    # Hide m15 bars that the m5 window holds entirely (m5 window: 100 min = 6+ m15 bars), and
    # leave every m1 and m5 bar visible: their aggregate IS the m15 bar.
    masks[:, 2, -4:-1] = True
    guess, covered = baseline_agg(values, masks, times, TIMEFRAMES)
    assert covered[:, 2, -4:-1].all()
    np.testing.assert_allclose(guess[masks][:, PRICE], values[masks][:, PRICE], atol=1e-12)
    # ... while the coarse bridge alone cannot be exact there (the check above is not vacuous).
    bridge = baseline_bridge(values[:, 2], masks[:, 2])
    assert np.abs(bridge[masks[:, 2]][:, PRICE] - values[:, 2][masks[:, 2]][:, PRICE]).max() > 1e-5


def test_agg_is_exact_on_m5_bars_sourced_from_visible_m1_bars_despite_hidden_m5_neighbours():
    values, times = real_windows(8)
    masks = np.zeros(times.shape, dtype=bool)
    masks[:, 1, -3:-1] = True  # two m5 bars inside the m1 window (20 minutes = 4 m5 bars)
    masks[:, 2, -1] = True
    guess, _ = baseline_agg(values, masks, times, TIMEFRAMES)
    np.testing.assert_allclose(guess[:, 1, -3:-1][..., PRICE], values[:, 1, -3:-1][..., PRICE])


def test_uncovered_bars_get_the_bridge_and_partly_covered_ones_the_bridge_open():
    values, times = real_windows(8)
    masks = np.zeros(times.shape, dtype=bool)
    masks[:, 2, :3] = True  # m15 bars older than every finer window: uncovered
    masks[:, 0, :] = True
    masks[:, 0, 0] = False
    masks[:, 1, :] = True
    masks[:, 1, -1] = False  # only the newest m5 bar visible
    guess, covered = baseline_agg(values, masks, times, TIMEFRAMES)
    bridge = baseline_bridge(values[:, 2], masks[:, 2])
    assert not covered[:, 2, :3].any()
    np.testing.assert_array_equal(guess[:, 2, :3], bridge[:, :3])
    np.testing.assert_array_equal(covered[:, 0], np.zeros_like(masks[:, 0]))


def test_covered_means_a_visible_finer_bar_opens_inside_the_period():
    minute = tf_ns("m1")
    # Anchor at minute 18: m1 bars open at minutes 12..17, m3 bars at 0, 3, ..., 15.
    times = np.stack([np.arange(12, 18) * minute, np.arange(0, 6) * 3 * minute])[None]
    values = features_from_ohlc(np.cumsum(np.full((2, 6, 4), 1e-4), axis=1))[None]
    masks = np.zeros((1, 2, 6), dtype=bool)
    masks[0, 0, 0:3] = True  # minutes 12, 13, 14: the whole m3 bar 12-15
    masks[0, 1, [1, 4, 5]] = True  # 3-6 (before the m1 window), 12-15 (all hidden), 15-18
    _, covered = baseline_agg(values, masks, times, ["m1", "m3"])
    assert covered[0, 1].tolist() == [False, False, False, False, False, True]


def accumulate(truth, pred, masks, times):
    acc = MetricAccumulator(TIMEFRAMES, np.full((len(TIMEFRAMES), 6), 2e-3))
    acc.update(truth, pred, masks, times)
    return acc.result()


def test_covered_and_uncovered_partition_the_hidden_bars_of_each_coarser_timeframe():
    values, times = real_windows(32)
    masks = synchronised_masks(times, seed=2)
    pred = values + np.random.default_rng(2).normal(0, 1e-4, values.shape)
    result = accumulate(values, pred, masks, times)
    assert "covered" not in result["per_tf"]["m1"] and "uncovered" not in result["per_tf"]["m1"]
    assert result["per_tf"]["m1"]["skill_agg"] is None
    assert result["per_tf"]["m1"]["features"]["close"]["best_baseline"] != "agg"
    for k, tf in enumerate(TIMEFRAMES[1:], start=1):
        entry = result["per_tf"][tf]
        n_covered = entry["covered"]["n_hidden_bars"]
        assert n_covered > 0 and entry["uncovered"]["n_hidden_bars"] > 0
        assert n_covered + entry["uncovered"]["n_hidden_bars"] == int(masks[:, k].sum())
        assert entry["skill_agg"] is not None
    assert result["mean"]["covered"]["n_hidden_bars"] == sum(
        result["per_tf"][tf]["covered"]["n_hidden_bars"] for tf in TIMEFRAMES[1:]
    )


def test_a_model_equal_to_agg_has_zero_skill_against_it_and_best_is_no_better():
    values, times = real_windows(32)
    masks = synchronised_masks(times, seed=3)
    agg, _ = baseline_agg(values, masks, times, TIMEFRAMES)
    result = accumulate(values, agg, masks, times)
    for tf in TIMEFRAMES[1:]:
        entry = result["per_tf"][tf]
        for block in (entry, entry["covered"], entry["interior"]):
            assert block["skill_agg"] == 0.0
            assert block["skill_best"] <= 0.0
        assert entry["uncovered"]["skill_bridge"] == 0.0  # agg is the bridge there


@pytest.mark.parametrize("feature", [OPEN, HIGH, LOW, CLOSE])
def test_agg_beats_the_coarse_bridge_on_covered_bars_of_synchronised_masks(feature):
    """What the visible finer bars give away is real: agg errs less than the coarse bridge."""
    values, times = real_windows(64)
    masks = synchronised_masks(times, seed=4)
    agg, covered = baseline_agg(values, masks, times, TIMEFRAMES)
    for k in (1, 2):
        bridge = baseline_bridge(values[:, k], masks[:, k])
        hit = covered[:, k]
        agg_err = np.abs(agg[:, k][hit][:, feature] - values[:, k][hit][:, feature]).mean()
        bridge_err = np.abs(bridge[hit][:, feature] - values[:, k][hit][:, feature]).mean()
        assert agg_err < bridge_err
