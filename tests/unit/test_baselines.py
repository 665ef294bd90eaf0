"""Naive baselines of SPEC §6: what each guesses, and that they only read visible bars."""

from __future__ import annotations

import numpy as np
import pytest

from stage1.data.features import BODY_RATIO, CLOSE, DELTA_CLOSE, HIGH, LOW, OPEN
from stage1.evaluation.baselines import (
    PRICE_FEATURES,
    all_baselines,
    baseline_bridge,
    baseline_interp,
    baseline_last,
    median_wicks,
    neighbour_indices,
)

PRICE = list(PRICE_FEATURES)


def features_from_ohlc(log_ohlc: np.ndarray) -> np.ndarray:
    """Raw features ``[N, L, 6]`` from log OHLC ``[N, L, 4]`` (same definitions as the pipeline)."""
    out = np.zeros((*log_ohlc.shape[:2], 6))
    out[..., :4] = log_ohlc
    out[:, 1:, DELTA_CLOSE] = np.diff(log_ohlc[..., CLOSE], axis=1)
    out[:, 0, DELTA_CLOSE] = log_ohlc[:, 0, CLOSE] - log_ohlc[:, 0, OPEN]
    prices = np.exp(log_ohlc)
    span = prices[..., HIGH] - prices[..., LOW]
    body = prices[..., CLOSE] - prices[..., OPEN]
    out[..., BODY_RATIO] = np.divide(body, span, out=np.zeros_like(span), where=span > 0)
    return out


def random_bars(rng: np.random.Generator, n: int, seq_len: int) -> np.ndarray:
    """Random-walk bars: log OHLC ``[n, L, 4]`` with open = previous close and random wicks."""
    close = np.cumsum(rng.normal(0, 1e-3, (n, seq_len)), axis=1)
    open_ = np.concatenate([np.zeros((n, 1)), close[:, :-1]], axis=1)
    high = np.maximum(open_, close) + rng.uniform(0, 5e-4, (n, seq_len))
    low = np.minimum(open_, close) - rng.uniform(0, 5e-4, (n, seq_len))
    return np.stack([open_, high, low, close], axis=-1)


def random_masks(rng: np.random.Generator, n: int, seq_len: int, right_edge: bool) -> np.ndarray:
    """1-3 random spans per row; position 0 always visible; optionally no right-edge span."""
    masks = np.zeros((n, seq_len), dtype=bool)
    for row in masks:
        for _ in range(rng.integers(1, 4)):
            start = int(rng.integers(1, seq_len - 2))
            row[start : start + int(rng.integers(1, 6))] = True
        if not right_edge:
            row[-1] = False
    return masks


def test_neighbour_indices_point_at_the_visible_bars_around_each_span():
    masks = np.array([[True, False, True, True, False, True]])
    prev, next_ = neighbour_indices(masks)
    assert prev.tolist() == [[-1, 1, 1, 1, 4, 4]]
    assert next_.tolist() == [[1, 1, 4, 4, 4, 6]]


def test_interp_baseline_is_exact_on_series_linear_inside_each_hidden_span():
    rng = np.random.default_rng(0)
    log_ohlc = random_bars(rng, 64, 30)
    masks = random_masks(rng, 64, 30, right_edge=False)
    # Make every feature exactly linear between the visible neighbours of each span.
    prev, next_ = neighbour_indices(masks)
    positions = np.arange(30)[None, :]
    weight = ((positions - prev) / np.maximum(next_ - prev, 1))[..., None]
    left = np.take_along_axis(log_ohlc, prev.clip(0)[..., None], axis=1)
    right = np.take_along_axis(log_ohlc, next_.clip(max=29)[..., None], axis=1)
    linear = np.where(masks[..., None], left + (right - left) * weight, log_ohlc)
    values = features_from_ohlc(linear)
    guess = baseline_interp(values, masks)
    np.testing.assert_allclose(guess[masks][:, PRICE], values[masks][:, PRICE], atol=1e-12)
    assert np.abs(guess[..., PRICE] - values[..., PRICE])[masks].max() < 1e-12


def test_interp_baseline_is_not_exact_on_a_random_walk():
    """The exactness above is a property of the series, not a tautology of the test."""
    rng = np.random.default_rng(1)
    values = features_from_ohlc(random_bars(rng, 64, 30))
    masks = random_masks(rng, 64, 30, right_edge=False)
    guess = baseline_interp(values, masks)
    assert np.abs(guess - values)[masks][:, CLOSE].mean() > 1e-4


def test_bridge_is_exact_when_closes_run_to_the_next_open_with_constant_wicks():
    seq_len = 24
    rng = np.random.default_rng(2)
    masks = random_masks(rng, 32, seq_len, right_edge=False)
    close = np.cumsum(rng.normal(0, 1e-3, (32, seq_len)), axis=1)
    prev, next_ = neighbour_indices(masks)
    positions = np.arange(seq_len)[None, :]
    # Next visible open = its previous close (continuous market), so the bridge's target is
    # the close of the last hidden bar; closes in between run linearly to it.
    last_hidden_close = np.take_along_axis(close, (next_ - 1).clip(0, seq_len - 1), axis=1)
    left = np.take_along_axis(close, prev.clip(0), axis=1)
    n_hidden = next_ - prev - 1
    bridged = left + (last_hidden_close - left) * (positions - prev) / np.maximum(n_hidden, 1)
    close = np.where(masks, bridged, close)
    open_ = np.concatenate([np.zeros((32, 1)), close[:, :-1]], axis=1)
    high = np.maximum(open_, close) + 3e-4
    low = np.minimum(open_, close) - 2e-4
    values = features_from_ohlc(np.stack([open_, high, low, close], axis=-1))
    guess = baseline_bridge(values, masks)
    np.testing.assert_allclose(guess[masks], values[masks], atol=1e-9)


def test_bridge_hidden_open_is_previous_close_and_wicks_are_visible_medians():
    rng = np.random.default_rng(3)
    values = features_from_ohlc(random_bars(rng, 16, 20))
    masks = random_masks(rng, 16, 20, right_edge=True)
    guess = baseline_bridge(values, masks)
    composite_prev_close = np.concatenate([guess[:, :1, CLOSE], guess[:, :-1, CLOSE]], axis=1)
    np.testing.assert_allclose(guess[..., OPEN][masks], composite_prev_close[masks])
    upper, lower = median_wicks(values, masks)
    top = np.maximum(guess[..., OPEN], guess[..., CLOSE])
    bottom = np.minimum(guess[..., OPEN], guess[..., CLOSE])
    np.testing.assert_allclose(
        (guess[..., HIGH] - top)[masks], np.broadcast_to(upper[:, None], masks.shape)[masks]
    )
    np.testing.assert_allclose(
        (bottom - guess[..., LOW])[masks], np.broadcast_to(lower[:, None], masks.shape)[masks]
    )


def test_last_carries_the_previous_bar_and_uses_the_next_one_at_position_zero():
    values = features_from_ohlc(random_bars(np.random.default_rng(4), 1, 8))
    masks = np.array([[True, True, False, False, True, True, False, True]])
    guess = baseline_last(values, masks)
    for t, source in [(0, 2), (1, 2), (4, 3), (5, 3), (7, 6)]:
        np.testing.assert_allclose(guess[0, t, PRICE], values[0, source, PRICE])


@pytest.mark.parametrize("baseline", [baseline_last, baseline_interp, baseline_bridge])
def test_right_edge_spans_carry_the_last_close_forward(baseline):
    rng = np.random.default_rng(5)
    values = features_from_ohlc(random_bars(rng, 8, 16))
    masks = np.zeros((8, 16), dtype=bool)
    masks[:, 11:] = True
    guess = baseline(values, masks)
    np.testing.assert_allclose(guess[:, 11:, CLOSE], np.repeat(values[:, 10:11, CLOSE], 5, axis=1))


@pytest.mark.parametrize("name", ["last", "interp", "bridge"])
def test_baselines_never_read_hidden_values(name):
    rng = np.random.default_rng(6)
    values = features_from_ohlc(random_bars(rng, 32, 24))
    masks = random_masks(rng, 32, 24, right_edge=True)
    tampered = values.copy()
    tampered[masks] = rng.normal(0, 1, (int(masks.sum()), 6))
    np.testing.assert_array_equal(
        all_baselines(values, masks)[name][masks], all_baselines(tampered, masks)[name][masks]
    )


@pytest.mark.parametrize("name", ["last", "interp", "bridge"])
def test_baselines_keep_visible_values_and_derive_delta_and_body_from_their_ohlc(name):
    rng = np.random.default_rng(7)
    values = features_from_ohlc(random_bars(rng, 16, 20))
    masks = random_masks(rng, 16, 20, right_edge=True)
    guess = all_baselines(values, masks)[name]
    np.testing.assert_array_equal(guess[~masks], values[~masks])
    derived = features_from_ohlc(guess[..., :4])
    np.testing.assert_allclose(guess[masks][:, DELTA_CLOSE], derived[masks][:, DELTA_CLOSE])
    np.testing.assert_allclose(
        guess[masks][:, BODY_RATIO], np.clip(derived[masks][:, BODY_RATIO], -1, 1)
    )


def test_fully_hidden_row_falls_back_to_the_reference_price():
    values = features_from_ohlc(random_bars(np.random.default_rng(8), 1, 6))
    masks = np.ones((1, 6), dtype=bool)
    for guess in all_baselines(values, masks).values():
        np.testing.assert_array_equal(guess[0, :, PRICE], 0.0)
