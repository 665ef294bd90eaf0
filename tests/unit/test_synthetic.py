"""stage1.data.synthetic: deterministic, valid, FX-like M1 bars and derived data directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1.data.io import OHLC, load_tf_data, validate_bars
from stage1.data.synthetic import generate_m1, write_synthetic_dataset

MINUTE_NS = 60_000_000_000


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return generate_m1(60_000, seed=11)  # about eight weeks


def _log_returns(bars: pd.DataFrame) -> np.ndarray:
    return np.diff(np.log(bars["close"].to_numpy()))


def test_same_seed_same_bars_other_seed_other_bars() -> None:
    pd.testing.assert_frame_equal(generate_m1(5_000, seed=4), generate_m1(5_000, seed=4))
    assert not generate_m1(5_000, seed=4).equals(generate_m1(5_000, seed=5))


def test_layout_matches_load_tf_data(bars: pd.DataFrame) -> None:
    assert len(bars) == 60_000
    assert str(bars.index.dtype) == "datetime64[ns, UTC]" and bars.index.name == "timestamp"
    assert list(bars.columns) == list(OHLC) and (bars.dtypes == np.float64).all()
    assert bars.index[0] == pd.Timestamp("2020-01-05 22:00", tz="UTC")


def test_bars_pass_validation_on_a_tick_grid(bars: pd.DataFrame) -> None:
    validate_bars(bars, "synthetic")
    ticks = bars[list(OHLC)].to_numpy() / 0.001
    np.testing.assert_allclose(ticks, np.round(ticks), atol=1e-6)
    assert bars["low"].min() > 80 and bars["high"].max() < 140


def test_weekend_is_closed_from_friday_2100_to_sunday_2200(bars: pd.DataFrame) -> None:
    minute_of_week = bars.index.day_of_week * 1440 + bars.index.hour * 60 + bars.index.minute
    closed = (minute_of_week >= 4 * 1440 + 21 * 60) & (minute_of_week < 6 * 1440 + 22 * 60)
    assert not closed.any()
    steps = np.diff(bars.index.asi8) // MINUTE_NS
    opens = bars.index[1:][steps > 24 * 60]
    assert len(opens) == 8
    assert all(t.day_name() == "Sunday" and t.hour == 22 and t.minute == 0 for t in opens)


def test_short_gaps_inside_trading_hours(bars: pd.DataFrame) -> None:
    steps = np.diff(bars.index.asi8) // MINUTE_NS
    short = steps[(steps > 1) & (steps <= 16)]
    assert 5 <= len(short) <= 40
    assert np.mean(steps == 1) > 0.99


def test_volatility_clusters(bars: pd.DataFrame) -> None:
    size = np.abs(_log_returns(bars))
    for lag in (1, 30, 240):
        assert np.corrcoef(size[:-lag], size[lag:])[0, 1] > 0.05, lag


def test_intraday_seasonality(bars: pd.DataFrame) -> None:
    returns = pd.Series(_log_returns(bars), index=bars.index[1:])
    by_hour = returns.groupby(returns.index.hour).std()
    assert by_hour[[13, 14]].mean() > 2 * by_hour[[20, 21]].mean()


def test_write_synthetic_dataset_runs_prepare(tmp_path: Path) -> None:
    out = write_synthetic_dataset(tmp_path / "data", n_rows=3_000, timeframes=["m1", "h1"], seed=2)
    assert out == tmp_path / "data"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timeframes"] == ["m1", "h1"]
    assert "synthetic_m1_seed2_n3000" in manifest["source"]["path"]
    frames = load_tf_data(out, ["m1", "h1"])
    pd.testing.assert_frame_equal(frames["m1"], generate_m1(3_000, seed=2), check_freq=False)


def test_synthetic_data_dir_fixture_loads(synthetic_data_dir: Path) -> None:
    frames = load_tf_data(synthetic_data_dir, ["m1", "m5", "m15", "m30", "h1", "h4"])
    assert len(frames["m1"]) == 30_000
    assert [len(f) for f in frames.values()] == sorted(
        (len(f) for f in frames.values()), reverse=True
    )
