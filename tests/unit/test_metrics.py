"""Metrics on hidden bars, skill, alarms and linear probes: the evaluation must not flatter."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from test_baselines import features_from_ohlc, random_bars

from stage1.data.features import CLOSE, FEATURE_NAMES
from stage1.data.timeframes import NS_PER_MINUTE
from stage1.evaluation.alarms import leak_alarms
from stage1.evaluation.baselines import all_baselines
from stage1.evaluation.measures import (
    consistency_counts,
    gain_t,
    log_spectrum_error,
    mae_on_hidden,
    pearson,
    pearson_from_sums,
    pearson_sums,
    skill,
)
from stage1.evaluation.metrics import (
    MetricAccumulator,
    count_spans,
    find_spans,
    freshest_visible_close,
    mean_over_timeframes,
    pip_size,
    span_class_masks,
)
from stage1.evaluation.probe import (
    logistic_fit,
    probe_targets,
    r2_score,
    ridge_fit,
    roc_auc,
    run_probe,
    window_summary_features,
)

TIMEFRAMES = ["m1", "m5"]
SEQ_LEN = 12


def multi_tf_batch(seed: int, n: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of m1 and m5 bars cut from one continuous m1 path per window.

    Returns raw features ``[n, 2, L, 6]`` (log price relative to the base window's first open),
    bool masks ``[n, 2, L]`` (1-2 random spans per row, base position 0 visible) and open times
    ``[n, 2, L]`` (int64 ns). The m5 bars aggregate the m1 path, so they are consistent.
    """
    rng = np.random.default_rng(seed)
    m1 = random_bars(rng, n, 5 * SEQ_LEN)
    m5 = np.stack(
        [
            m1[:, ::5, 0],
            m1[..., 1].reshape(n, SEQ_LEN, 5).max(axis=2),
            m1[..., 2].reshape(n, SEQ_LEN, 5).min(axis=2),
            m1[:, 4::5, 3],
        ],
        axis=-1,
    )
    base = m1[:, -SEQ_LEN:]
    ref = base[:, :1, :1]
    features = np.stack([features_from_ohlc(base - ref), features_from_ohlc(m5 - ref)], axis=1)
    start = (np.arange(n) * 1000 * NS_PER_MINUTE)[:, None]
    times = np.stack(
        [
            start + (4 * SEQ_LEN + np.arange(SEQ_LEN)) * NS_PER_MINUTE,
            start + np.arange(SEQ_LEN) * 5 * NS_PER_MINUTE,
        ],
        axis=1,
    )
    masks = np.zeros((n, 2, SEQ_LEN), dtype=bool)
    for row in masks.reshape(-1, SEQ_LEN):
        for _ in range(rng.integers(1, 3)):
            start_pos = int(rng.integers(1, SEQ_LEN))
            row[start_pos : start_pos + int(rng.integers(1, 5))] = True
    # Synchronise as evaluation does: base minute 4L + p lies in m5 bar (4L + p) // 5.
    for p in range(SEQ_LEN):
        masks[:, 1, (4 * SEQ_LEN + p) // 5] |= masks[:, 0, p]
    return features, masks, times


def feature_std() -> np.ndarray:
    return np.full((2, 6), 2e-3)


def evaluate(truth, pred, masks, times, pip=None, **prices):
    acc = MetricAccumulator(TIMEFRAMES, feature_std())
    acc.update(truth, pred, masks, times, **prices)
    return acc.result(pip=pip)


def test_find_spans_and_count_spans():
    row = np.array([True, False, True, True, False, False, True])
    assert find_spans(row) == [(0, 1), (2, 4), (6, 7)]
    assert find_spans(np.zeros(5, dtype=bool)) == []
    assert count_spans(np.stack([row, np.ones(7, dtype=bool)])) == 4


def test_right_edge_bars_are_those_after_the_last_visible_information():
    minute = NS_PER_MINUTE
    # Anchor at minute 18: m1 bars open at 12..17, m3 bars at 0, 3, ..., 15.
    times = np.stack([np.arange(12, 18) * minute, np.arange(0, 6) * 3 * minute])[None]
    masks = np.zeros((1, 2, 6), dtype=bool)
    masks[0, 0, 4:] = True  # the newest two m1 bars (minutes 16-18)
    masks[0, 1, 5] = True  # the m3 bar 15-18 overlapping them (synchronised)
    right = span_class_masks(masks, times, ["m1", "m3"])["right_edge"]
    assert right[0, 0].tolist() == [False] * 4 + [True, True]
    assert right[0, 1].tolist() == [False] * 5 + [True]
    # Hiding only the newest m3 bar: the visible m1 bar closing at minute 18 gives its close
    # away, so it is interior although its span ends at the newest m3 bar.
    masks[0, 0] = False
    classes = span_class_masks(masks, times, ["m1", "m3"])
    assert not classes["right_edge"].any() and classes["interior"][0, 1, 5]


def test_freshest_visible_close_is_the_newest_visible_price_over_all_timeframes():
    minute = NS_PER_MINUTE
    times = np.stack([np.arange(12, 18) * minute, np.arange(0, 6) * 3 * minute])[None]
    close = np.arange(12.0).reshape(1, 2, 6)
    masks = np.zeros((1, 2, 6), dtype=bool)
    masks[0, 0, 3:] = True  # m1 visible up to the bar closing at minute 15
    masks[0, 1, 5] = True
    # The m3 bar 12-15 (close[1, 4]) closes as late as the newest visible m1 bar; either is fine.
    assert freshest_visible_close(close, masks, times, ["m1", "m3"])[0] in (
        close[0, 0, 2],
        close[0, 1, 4],
    )
    masks[0, 1, 4] = True
    assert freshest_visible_close(close, masks, times, ["m1", "m3"])[0] == close[0, 0, 2]


def test_right_edge_skill_against_the_last_known_price_equals_last_on_the_base_timeframe():
    truth, masks, times = multi_tf_batch(11, n=64)
    pred = truth + np.random.default_rng(11).normal(0, 1e-3, truth.shape)
    entry = evaluate(truth, pred, masks, times)["per_tf"]["m1"]["right_edge"]
    assert entry["n_hidden_bars"] > 0
    assert entry["close_skill_fresh"] == pytest.approx(entry["features"]["close"]["skill_last"])


def test_mae_on_hidden_ignores_visible_positions():
    rng = np.random.default_rng(0)
    truth, pred = rng.normal(size=(2, 4, 10, 6))
    masks = rng.random((4, 10)) < 0.3
    changed = pred.copy()
    changed[~masks] += 100.0
    np.testing.assert_array_equal(
        mae_on_hidden(pred, truth, masks), mae_on_hidden(changed, truth, masks)
    )
    assert np.isnan(mae_on_hidden(pred, truth, np.zeros((4, 10), dtype=bool))).all()


def test_skill_definition():
    assert skill(0.5, 1.0) == 0.5
    assert skill(2.0, 1.0) == -1.0
    assert math.isnan(skill(0.0, 0.0))


def test_perfect_model_has_skill_one_everywhere():
    truth, masks, times = multi_tf_batch(0)
    result = evaluate(truth, truth, masks, times)
    for entry in result["per_tf"].values():
        for block in (entry, entry["interior"], entry["right_edge"]):
            for key in ("skill_last", "skill_interp", "skill_bridge", "skill_best"):
                assert block[key] == 1.0
            assert block["mae"] == 0.0
        assert entry["corr_close"] == pytest.approx(1.0)
        assert entry["spectrum_error"] == pytest.approx(0.0, abs=1e-9)
    assert result["per_tf"]["m5"]["consistency_ratio"] == 1.0
    assert result["mean"]["skill_best"] == 1.0


def test_counts_equal_the_number_of_hidden_bars_and_spans():
    truth, masks, times = multi_tf_batch(1)
    pred = truth + np.random.default_rng(1).normal(0, 1e-3, truth.shape)
    result = evaluate(truth, pred, masks, times)
    for k, tf in enumerate(TIMEFRAMES):
        entry = result["per_tf"][tf]
        assert entry["n_hidden_bars"] == int(masks[:, k].sum())
        assert entry["n_spans"] == sum(len(find_spans(row)) for row in masks[:, k])
        assert (
            entry["interior"]["n_hidden_bars"] + entry["right_edge"]["n_hidden_bars"]
            == entry["n_hidden_bars"]
        )
        assert entry["right_edge"]["n_hidden_bars"] > 0
    assert result["mean"]["n_hidden_bars"] == int(masks.sum())
    assert result["n_windows"] == len(truth)


def test_changing_a_visible_prediction_changes_nothing():
    truth, masks, times = multi_tf_batch(2)
    rng = np.random.default_rng(2)
    pred = truth + rng.normal(0, 1e-3, truth.shape)
    changed = np.where(masks[..., None], pred, rng.normal(0, 1.0, truth.shape))
    assert evaluate(truth, pred, masks, times) == evaluate(truth, changed, masks, times)


def test_a_model_equal_to_a_baseline_has_zero_skill_against_it():
    truth, masks, times = multi_tf_batch(3)
    pred = np.stack([all_baselines(truth[:, k], masks[:, k])["interp"] for k in range(2)], axis=1)
    entry = evaluate(truth, pred, masks, times)["per_tf"]["m1"]
    assert entry["skill_interp"] == 0.0
    assert entry["skill_best"] <= 0.0
    assert entry["features"]["close"]["skill_interp"] == 0.0


def test_mae_is_reported_in_normalised_units_and_prices():
    truth, masks, times = multi_tf_batch(4)
    pred = truth + 0.5 * 2e-3  # half a normaliser std on every feature
    ref = 110.0
    truth_prices = ref * np.exp(truth[..., :4])
    result = evaluate(
        truth, pred, masks, times, pip=0.01,
        truth_prices=truth_prices, pred_prices=truth_prices + 0.02,
    )  # fmt: skip
    entry = result["per_tf"]["m1"]
    assert entry["mae"] == pytest.approx(0.5)
    assert entry["features"]["body_ratio"]["mae"] == pytest.approx(0.5)
    assert entry["mae_price"] == pytest.approx(0.02)
    assert entry["mae_pips"] == pytest.approx(2.0)


def test_leaky_model_trips_the_right_edge_alarm_and_an_honest_one_does_not():
    truth, masks, times = multi_tf_batch(5, n=64)
    honest = np.stack([all_baselines(truth[:, k], masks[:, k])["bridge"] for k in range(2)], axis=1)
    assert leak_alarms(evaluate(truth, honest, masks, times)["per_tf"], {}) == []
    # The leaky "model" guesses like an honest one but returns the true values on right-edge
    # spans, as if it had seen the newest bars.
    right_edge = span_class_masks(masks, times, TIMEFRAMES)["right_edge"]
    leaky = np.where(right_edge[..., None], truth, honest)
    result = evaluate(truth, leaky, masks, times)
    alarms = leak_alarms(result["per_tf"], {})
    assert any(a.startswith("m1:") and "right-edge" in a for a in alarms)
    assert result["per_tf"]["m1"]["interior"]["skill_bridge"] == 0.0


def test_a_right_edge_gain_on_a_handful_of_bars_is_no_evidence():
    """Skill above 1 % on a few bars is noise unless the per-bar gain is significant (t >= 3)."""

    def entry(gains: np.ndarray) -> dict:
        sums = np.array([gains.size, gains.sum(), gains @ gains])
        right_edge = {"close_skill_fresh": 0.14, "close_skill_fresh_t": gain_t(sums)}
        return {"h1": {"right_edge": {**right_edge, "n_hidden_bars": gains.size}}}

    rng = np.random.default_rng(0)
    noisy = rng.normal(0.1, 1.0, size=15)  # a lucky average over 15 bars
    assert gain_t(np.array([15, noisy.sum(), noisy @ noisy])) < 3
    assert leak_alarms(entry(noisy), {}) == []
    steady = np.abs(rng.normal(1.0, 0.1, size=15))  # better on every bar: a leak
    assert len(leak_alarms(entry(steady), {})) == 1
    assert np.isnan(gain_t(np.array([1.0, 1.0, 1.0])))  # one bar: nothing to judge


def test_sign_probe_auc_above_threshold_is_an_alarm():
    assert leak_alarms({}, {"raw": {"sign_auc": 0.53}}) == []
    alarms = leak_alarms({}, {"encoder": {"sign_auc": 0.61}, "raw": {"sign_auc": None}})
    assert len(alarms) == 1 and alarms[0].startswith("probe.encoder")


def test_batches_accumulate_exactly_like_one_pass():
    truth, masks, times = multi_tf_batch(6)
    pred = truth + np.random.default_rng(6).normal(0, 1e-3, truth.shape)
    acc = MetricAccumulator(TIMEFRAMES, feature_std())
    for part in (slice(0, 10), slice(10, None)):
        acc.update(truth[part], pred[part], masks[part], times[part])
    one = evaluate(truth, pred, masks, times)
    two = acc.result()
    assert two["n_windows"] == one["n_windows"]
    for key in ("mae", "skill_interp", "skill_best", "corr_close", "corr_delta", "spectrum_error"):
        assert two["per_tf"]["m1"][key] == pytest.approx(one["per_tf"]["m1"][key], rel=1e-9)


def test_pearson_matches_numpy_and_sums_add_up():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(2, 200))
    y += x
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    summed = pearson_sums(x[:50], y[:50]) + pearson_sums(x[50:], y[50:])
    assert pearson_from_sums(summed) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson(np.ones(5), x[:5]))


def test_consistency_counts_agreement_within_tolerance():
    truth, masks, times = multi_tf_batch(8)
    masks[:, 1] = False
    masks[:, 1, -2:] = True  # the two m5 bars the 12-minute base window covers
    base_close, tf_close = truth[:, 0, :, CLOSE], truth[:, 1, :, CLOSE]
    args = (times[:, 0], "m1")
    agree, checked = consistency_counts(
        base_close, *args, tf_close, times[:, 1], masks[:, 1], "m5", 1e-9
    )
    assert (agree, checked) == (2 * len(truth), 2 * len(truth))
    off = tf_close + 1.0
    agree, checked = consistency_counts(base_close, *args, off, times[:, 1], masks[:, 1], "m5", 0.5)
    assert (agree, checked) == (0, 2 * len(truth))
    masks[:, 1, -2:] = False
    masks[:, 1, :3] = True  # m5 bars before the base window: not covered, not checked
    assert consistency_counts(
        base_close, *args, tf_close, times[:, 1], masks[:, 1], "m5", 1e-9
    ) == (0, 0)


def test_log_spectrum_error_is_zero_for_the_truth_and_positive_for_a_flat_guess():
    close = np.cumsum(np.random.default_rng(9).normal(0, 1e-3, (4, 32)), axis=1)
    assert np.allclose(log_spectrum_error(close, close), 0.0)
    flat = close.copy()
    flat[:, 10:20] = close[:, 9:10]
    assert (log_spectrum_error(flat, close) > 0.1).all()


def test_mean_over_timeframes_sums_counts_and_skips_undefined():
    per_tf: dict[str, dict[str, Any]] = {
        "m1": {"mae": 1.0, "n_spans": 3, "consistency_ratio": None, "x": {"skill": 0.2}},
        "m5": {"mae": 3.0, "n_spans": 4, "consistency_ratio": 0.5, "x": {"skill": 0.4}},
    }
    assert mean_over_timeframes(per_tf) == {
        "mae": 2.0, "n_spans": 7, "consistency_ratio": 0.5, "x": {"skill": pytest.approx(0.3)}
    }  # fmt: skip


def test_pip_size_rule():
    assert pip_size(108.5) == 0.01
    assert pip_size(1.12) == 0.0001


def test_result_lists_every_feature_and_span_class():
    truth, masks, times = multi_tf_batch(10)
    entry = evaluate(truth, truth * 0.9, masks, times)["per_tf"]["m5"]
    assert set(entry["features"]) == set(FEATURE_NAMES)
    assert entry["features"]["close"]["best_baseline"] in ("last", "interp", "bridge", "agg")
    for name in ("interior", "right_edge", "covered", "uncovered"):
        assert {
            "mae", "skill_last", "skill_interp", "skill_bridge", "skill_agg", "skill_best"
        } <= set(entry[name])  # fmt: skip


# ---- probes -------------------------------------------------------------------------------


def brute_force_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_from_ranks():
    labels = np.array([0, 0, 1, 1, 0, 1])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7]), labels) == 1.0
    assert roc_auc(-np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7]), labels) == 0.0
    assert roc_auc(np.zeros(6), labels) == 0.5
    rng = np.random.default_rng(11)
    scores, labels = rng.integers(0, 5, 300).astype(float), rng.integers(0, 2, 300)
    assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))
    assert math.isnan(roc_auc(np.arange(3.0), np.ones(3)))


def test_ridge_recovers_a_linear_target():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(500, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 4.0
    w, b = ridge_fit(x, y, 1e-8)
    np.testing.assert_allclose(w, [1.0, -2.0, 0.5, 0.0, 3.0], atol=1e-5)
    assert b == pytest.approx(4.0, abs=1e-5)
    assert r2_score(y, x @ w + b) == pytest.approx(1.0)


def test_logistic_probe_on_separable_data_has_auc_one():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] - x[:, 1] > 0).astype(float)
    w, b = logistic_fit(x, y, 1e-3)
    assert roc_auc(x @ w + b, y) == 1.0
    assert ((x @ w + b > 0) == y).mean() > 0.97


def test_probe_scores_signal_high_and_noise_near_chance():
    rng = np.random.default_rng(14)
    n_train, n_test = 600, 300
    signal = rng.normal(size=(n_train + n_test, 4))
    vol = signal[:, 0] + 0.3 * rng.normal(size=n_train + n_test)
    sign = (signal[:, 1] > 0).astype(np.int64)
    good = run_probe(
        signal[:n_train],
        vol[:n_train],
        sign[:n_train],
        signal[n_train:],
        vol[n_train:],
        sign[n_train:],
    )
    assert good["vol_r2"] > 0.8 and good["sign_auc"] > 0.95 and good["sign_acc"] > 0.9
    assert (good["n_train"], good["n_test"]) == (n_train, n_test)
    noise = rng.normal(size=(n_train + n_test, 4))
    bad = run_probe(
        noise[:n_train],
        vol[:n_train],
        sign[:n_train],
        noise[n_train:],
        vol[n_train:],
        sign[n_train:],
    )
    assert bad["vol_r2"] < 0.05 and abs(bad["sign_auc"] - 0.5) < 0.1


def test_probe_targets_use_only_bars_after_the_anchor():
    close = np.exp(np.array([0.0, 0.1, 0.3, 0.3, 0.3, 0.2, 0.1, 0.1]))
    open_ns = np.arange(8) * NS_PER_MINUTE
    open_ns[6:] += 100 * NS_PER_MINUTE  # a data gap before bar 6
    log_vol, sign, valid = probe_targets(
        close, open_ns, np.array([0, 1, 2, 3, 5, 6]), 2, NS_PER_MINUTE
    )
    # 2: flat horizon; 5: a gap inside the horizon; 6: horizon past the end of the data
    assert valid.tolist() == [True, True, False, True, False, False]
    assert log_vol[0] == pytest.approx(0.5 * math.log(0.1**2 + 0.2**2))
    assert sign.tolist() == [1, 1, 0, 0, 0, 0]
    assert log_vol[3] == pytest.approx(math.log(0.1))


def test_window_summary_features_shape_and_realised_volatility():
    truth, _, _ = multi_tf_batch(15, n=5)
    summary = window_summary_features(truth, truth / 2e-3)
    assert summary.shape == (5, 2 * 8)
    expected = np.log(np.sqrt((truth[:, 0, 1:, 4] ** 2).sum(axis=1)))
    np.testing.assert_allclose(summary[:, 6], expected, rtol=1e-6)
