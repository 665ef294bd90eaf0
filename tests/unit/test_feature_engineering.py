"""FeatureEngineer: feature formulas, scale invariance, reference price, inverse to prices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stage1.config import load_config
from stage1.data.features import (
    BODY_RATIO,
    CLOSE,
    DELTA_CLOSE,
    FEATURE_NAMES,
    HIGH,
    LOW,
    OPEN,
    FeatureEngineer,
)
from stage1.data.io import load_tf_data
from stage1.data.sampler import MultiTFWindowSampler

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


@pytest.fixture(scope="module")
def engineer() -> FeatureEngineer:
    return FeatureEngineer(load_config("test"))


@pytest.fixture(scope="module")
def synthetic_sampler(synthetic_data_dir: Path) -> MultiTFWindowSampler:
    return MultiTFWindowSampler(load_tf_data(synthetic_data_dir, TIMEFRAMES), seq_len=16)


@pytest.fixture(scope="module")
def real_sampler(real_data_dir: Path) -> MultiTFWindowSampler:
    return MultiTFWindowSampler(load_tf_data(real_data_dir, TIMEFRAMES), seq_len=48)


def sample_ohlc(sampler: MultiTFWindowSampler, n: int = 512) -> np.ndarray:
    ids = np.random.default_rng(0).choice(len(sampler), size=n, replace=False)
    return sampler.gather(np.sort(ids))[0]


def test_feature_order_is_the_contract() -> None:
    assert FEATURE_NAMES == ("open", "high", "low", "close", "delta_close", "body_ratio")
    assert (OPEN, HIGH, LOW, CLOSE, DELTA_CLOSE, BODY_RATIO) == (0, 1, 2, 3, 4, 5)


def test_features_by_hand(engineer: FeatureEngineer) -> None:
    """Two timeframes, three bars, values written out from the formulas."""
    ohlc = np.array(
        [
            [
                [100.0, 101.0, 99.0, 100.5],
                [100.5, 100.5, 100.5, 100.5],
                [100.5, 102.0, 100.0, 101.0],
            ],
            [[98.0, 100.0, 97.0, 99.0], [99.0, 101.0, 98.5, 100.0], [100.0, 102.0, 99.5, 101.0]],
        ]
    )[None]
    features, targets = engineer.process_batch(ohlc)
    assert features.shape == (1, 2, 3, 6) and features.dtype == torch.float32
    ref = 100.0  # open of the base timeframe's oldest bar
    expected = np.zeros((2, 3, 6))
    expected[..., :4] = np.log(ohlc[0] / ref)
    log_close = np.log(ohlc[0, :, :, 3])
    expected[:, 0, 4] = np.log(ohlc[0, :, 0, 3] / ohlc[0, :, 0, 0])
    expected[:, 1:, 4] = np.diff(log_close, axis=1)
    expected[0, :, 5] = [0.5 / 2.0, 0.0, 0.5 / 2.0]  # the flat bar (high == low) gives 0
    expected[1, :, 5] = [1.0 / 3.0, 1.0 / 2.5, 1.0 / 2.5]
    np.testing.assert_allclose(features[0].numpy(), expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(features, targets) and features.data_ptr() != targets.data_ptr()
    assert engineer.reference_prices(ohlc).item() == ref


def test_process_window_equals_process_batch(engineer, synthetic_sampler) -> None:
    window = synthetic_sampler.get_window(123)
    features, targets = engineer.process_window(window)
    assert features.shape == (len(TIMEFRAMES), 16, 6) and features.dtype == torch.float32
    batch, _ = engineer.process_batch(synthetic_sampler.gather([123])[0])
    assert torch.equal(features, batch[0]) and torch.equal(targets, batch[0])


def test_process_window_rejects_a_missing_timeframe(engineer, synthetic_sampler) -> None:
    window = synthetic_sampler.get_window(0)
    del window["h1"]
    with pytest.raises(ValueError, match="h1"):
        engineer.process_window(window)


def test_tensor_and_array_inputs_agree(engineer, synthetic_sampler) -> None:
    ohlc = sample_ohlc(synthetic_sampler, 64)
    from_array, _ = engineer.process_batch(ohlc)
    from_tensor, _ = engineer.process_batch(torch.from_numpy(ohlc))
    assert torch.equal(from_array, from_tensor)


def assert_scale_invariant(engineer: FeatureEngineer, ohlc: np.ndarray) -> None:
    base, _ = engineer.process_batch(ohlc)
    for factor in (1000.0, 0.01, 7.3):
        scaled, _ = engineer.process_batch(ohlc * factor)
        torch.testing.assert_close(scaled, base, rtol=1e-6, atol=1e-9)
    # Not vacuous: a non-uniform change (one timeframe only) does change the features.
    bent = ohlc.copy()
    bent[:, -1] *= 1.01
    assert not torch.allclose(engineer.process_batch(bent)[0], base, atol=1e-6)


def test_scale_invariance_synthetic(engineer, synthetic_sampler) -> None:
    assert_scale_invariant(engineer, sample_ohlc(synthetic_sampler))


@pytest.mark.real_data
def test_scale_invariance_real(real_sampler) -> None:
    engineer = FeatureEngineer(load_config("test", ["data.seq_len=48"]))
    assert_scale_invariant(engineer, sample_ohlc(real_sampler))


def assert_invertible(engineer: FeatureEngineer, ohlc: np.ndarray) -> None:
    features, _ = engineer.process_batch(ohlc)
    ref = engineer.reference_prices(ohlc)
    assert ref.dtype == torch.float64 and ref.shape == (len(ohlc),)
    prices = engineer.to_prices(features, ref)
    assert prices.dtype == torch.float64
    np.testing.assert_allclose(prices.numpy(), ohlc, rtol=1e-7)


def test_features_invert_to_prices_synthetic(engineer, synthetic_sampler) -> None:
    assert_invertible(engineer, sample_ohlc(synthetic_sampler))


@pytest.mark.real_data
def test_features_invert_to_prices_real(engineer, real_sampler) -> None:
    assert_invertible(engineer, sample_ohlc(real_sampler))


def test_reference_is_the_base_oldest_open(engineer, synthetic_sampler) -> None:
    """Changing any other bar leaves every other bar's price features untouched."""
    ohlc = sample_ohlc(synthetic_sampler, 8)
    base, _ = engineer.process_batch(ohlc)
    changed = ohlc.copy()
    changed[:, 2, 5] *= 1.05  # one m15 bar
    features, _ = engineer.process_batch(changed)
    diff = (features != base).any(-1)
    assert diff[:, 2, 5].all()
    diff[:, 2, 5] = False
    diff[:, 2, 6] = False  # its successor's delta_close depends on it
    assert not diff.any()
    np.testing.assert_array_equal(engineer.reference_prices(ohlc).numpy(), ohlc[:, 0, 0, 0])


def test_window_from_dataframes_with_extra_columns(engineer) -> None:
    index = pd.date_range("2021-01-04", periods=4, freq="1min", tz="UTC")
    bars = pd.DataFrame(
        {"open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "volume": 3.0}, index=index
    )
    small = FeatureEngineer(load_config("test", ["data.timeframes=[m1]"]))
    features, _ = small.process_window({"m1": bars})
    assert features.shape == (1, 4, 6)
    assert engineer.timeframes == TIMEFRAMES
