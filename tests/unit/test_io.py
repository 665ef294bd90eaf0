"""stage1.data.io: reading derived data directories, validation rules, M1 aggregation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1.data.io import (
    EPOCH_HINT,
    OHLC,
    aggregate_bars,
    find_tf_file,
    load_tf_data,
    validate_bars,
    write_bars,
)
from stage1.data.synthetic import generate_m1
from stage1.errors import DataValidationError

# Written out by hand so the reference does not share code with the implementation.
PANDAS_RULES = {
    "m1": "1min",
    "m5": "5min",
    "m15": "15min",
    "m30": "30min",
    "h1": "1h",
    "h4": "4h",
    "d": "1D",
}


def pandas_resample(m1: pd.DataFrame, rule: str, origin: str = "start_day") -> pd.DataFrame:
    """Independent reference: pandas resample, left label/closed, empty bins dropped."""
    agg = {"open": "first", "high": "max", "low": "min", "close": "last"}
    out = m1.resample(rule, label="left", closed="left", origin=origin).agg(agg)
    return out.dropna(how="all")


def assert_ohlc_invariants(bars: pd.DataFrame) -> None:
    o, h, lo, c = (bars[name].to_numpy() for name in OHLC)
    assert np.isfinite(bars[list(OHLC)].to_numpy()).all()
    assert (lo > 0).all()
    assert (h >= np.maximum(o, c)).all()
    assert (lo <= np.minimum(o, c)).all()
    assert bars.index.is_monotonic_increasing and bars.index.is_unique


def assert_same_bars(ours: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert len(ours) == len(reference)
    np.testing.assert_array_equal(ours.index.asi8, reference.index.as_unit("ns").asi8)
    for name in OHLC:
        np.testing.assert_array_equal(ours[name].to_numpy(), reference[name].to_numpy())


@pytest.fixture(scope="module")
def m1() -> pd.DataFrame:
    """About two weeks of synthetic M1 bars with weekend and short gaps."""
    return generate_m1(20_000, seed=3)


def _frame(n: int = 5) -> pd.DataFrame:
    return generate_m1(n, seed=1)


# --- aggregation -------------------------------------------------------------------------


@pytest.mark.parametrize("tf", ["m5", "m15", "m30", "h1", "h4", "d"])
def test_aggregate_equals_pandas_resample(m1: pd.DataFrame, tf: str) -> None:
    ours = aggregate_bars(m1, tf)
    assert_same_bars(ours, pandas_resample(m1, PANDAS_RULES[tf]))
    assert_ohlc_invariants(ours)
    assert str(ours.index.dtype) == "datetime64[ns, UTC]"
    assert ours.index.name == "timestamp"


def test_aggregate_aligns_bins_to_the_epoch_for_odd_timeframes(m1: pd.DataFrame) -> None:
    assert_same_bars(aggregate_bars(m1, "m7"), pandas_resample(m1, "7min", origin="epoch"))


def test_aggregate_keeps_gaps_as_gaps() -> None:
    times = pd.to_datetime(["2020-01-06 00:10", "2020-01-06 03:20"], utc=True)
    bars = pd.DataFrame(dict.fromkeys(OHLC, 110.0), index=times)
    hourly = aggregate_bars(bars, "h1")
    assert list(hourly.index) == list(
        pd.to_datetime(["2020-01-06 00:00", "2020-01-06 03:00"], utc=True)
    )


def test_aggregate_daily_bars_start_at_midnight_utc(m1: pd.DataFrame) -> None:
    daily = aggregate_bars(m1, "d")
    assert (daily.index.hour == 0).all() and (daily.index.minute == 0).all()


def test_aggregate_refuses_unsorted_bars(m1: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="sorted"):
        aggregate_bars(m1.iloc[::-1], "m5")


def test_aggregate_of_no_bars_is_empty(m1: pd.DataFrame) -> None:
    empty = aggregate_bars(m1.iloc[:0], "h1")
    assert len(empty) == 0 and list(empty.columns) == list(OHLC)


# --- validation --------------------------------------------------------------------------


def _set(df: pd.DataFrame, row: int, column: str, value: float) -> pd.DataFrame:
    out = df.copy()
    out.iloc[row, out.columns.get_loc(column)] = value
    return out


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (lambda d: _set(d, 3, "close", np.nan), ["row 3", "close is nan", "finite"]),
        (lambda d: _set(d, 2, "high", np.inf), ["row 2", "high is inf", "finite"]),
        (lambda d: _set(d, 1, "low", 0.0), ["row 1", "low is 0.0", "prices > 0"]),
        (lambda d: _set(d, 4, "open", -1.0), ["row 4", "open is -1.0", "prices > 0"]),
        (lambda d: d.iloc[[0, 1, 1, 2, 3]], ["row 2", "duplicate timestamp", "unique"]),
        (lambda d: d.iloc[[0, 2, 1, 3, 4]], ["row 2", "earlier than row 1", "increase"]),
        (lambda d: _set(d, 3, "high", d["low"].iloc[3] - 0.5), ["row 3", "high >= low"]),
        (
            lambda d: _set(_set(d, 2, "open", 120.0), 2, "low", 100.0),
            ["row 2", "high >= max(open, close)", "open=120"],
        ),
        (
            lambda d: _set(_set(d, 1, "close", 100.0), 1, "high", 200.0),
            ["row 1", "low <= min(open, close)"],
        ),
        (lambda d: d.drop(columns="close"), ["missing column", "close"]),
        (lambda d: d.iloc[:0], ["no bars"]),
    ],
)
def test_validate_bars_names_source_row_and_rule(broken, expected: list[str]) -> None:
    with pytest.raises(DataValidationError) as info:
        validate_bars(broken(_frame()), "bars.parquet")
    message = str(info.value)
    assert message.startswith("bars.parquet: ")
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_validate_bars_accepts_good_bars(m1: pd.DataFrame) -> None:
    validate_bars(m1, "synthetic")


def test_validate_bars_names_the_timestamp_and_file_line() -> None:
    df = _set(_frame(), 3, "close", np.nan)
    with pytest.raises(DataValidationError) as info:
        validate_bars(df, "bars.csv", line_offset=2)
    assert f"row 3 (line 5, {df.index[3].strftime('%Y-%m-%d %H:%M:%S')} UTC)" in str(info.value)


def test_validate_bars_counts_rows_breaking_a_rule() -> None:
    df = _set(_set(_frame(), 1, "close", np.nan), 3, "open", np.nan)
    with pytest.raises(DataValidationError, match="2 rows break it"):
        validate_bars(df, "bars")


# --- reading a derived data directory ----------------------------------------------------


def _write_index_layout(bars: pd.DataFrame, path: Path) -> None:
    bars.to_parquet(path)  # time as the (DatetimeIndex) index


def test_load_tf_data_reads_both_file_name_patterns(tmp_path: Path, m1: pd.DataFrame) -> None:
    write_bars(m1, tmp_path / "m1.parquet")
    write_bars(aggregate_bars(m1, "h1"), tmp_path / "usdjpy_h1.parquet")
    frames = load_tf_data(tmp_path, ["h1", "m1"])
    assert list(frames) == ["m1", "h1"]  # finest first
    assert_same_bars(frames["m1"], m1)
    assert_same_bars(frames["h1"], aggregate_bars(m1, "h1"))


def test_load_tf_data_accepts_index_layout_any_zone_and_extra_columns(
    tmp_path: Path, m1: pd.DataFrame
) -> None:
    tokyo = m1.tz_convert("Asia/Tokyo").astype("float32").assign(volume=1)
    _write_index_layout(tokyo, tmp_path / "m1.parquet")
    naive = m1.tz_convert(None)
    naive.index.name = "time"
    _write_index_layout(naive, tmp_path / "m5.parquet")
    frames = load_tf_data(tmp_path, ["m1", "m5"])
    for frame in frames.values():
        assert str(frame.index.dtype) == "datetime64[ns, UTC]"
        assert frame.index.name == "timestamp"
        assert list(frame.columns) == list(OHLC)
        assert (frame.dtypes == np.float64).all()
        np.testing.assert_array_equal(frame.index.asi8, m1.index.asi8)
    np.testing.assert_allclose(frames["m1"]["close"], m1["close"], rtol=1e-6)


def test_timestamp_column_is_used_over_an_integer_index(tmp_path: Path, m1: pd.DataFrame) -> None:
    m1.reset_index().to_parquet(tmp_path / "x_m1.parquet")  # RangeIndex + timestamp column
    assert_same_bars(load_tf_data(tmp_path, ["m1"])["m1"], m1)


def test_integer_index_without_timestamp_is_reported_as_the_1970_bug(
    tmp_path: Path, m1: pd.DataFrame
) -> None:
    m1.reset_index(drop=True).to_parquet(tmp_path / "m1.parquet")
    with pytest.raises(DataValidationError, match="integer row index") as info:
        load_tf_data(tmp_path, ["m1"])
    assert "m1.parquet" in str(info.value) and EPOCH_HINT in str(info.value)


def test_epoch_like_datetime_index_is_detected(tmp_path: Path, m1: pd.DataFrame) -> None:
    epoch = m1.set_axis(pd.to_datetime(np.arange(len(m1)), utc=True), axis=0)  # 1970-01-01 + ns
    epoch.to_parquet(tmp_path / "m1.parquet")
    with pytest.raises(DataValidationError, match="1970") as info:
        load_tf_data(tmp_path, ["m1"])
    assert "row 0" in str(info.value) and EPOCH_HINT in str(info.value)


def test_two_matching_files_is_an_error_naming_both(tmp_path: Path, m1: pd.DataFrame) -> None:
    write_bars(m1, tmp_path / "m1.parquet")
    write_bars(m1, tmp_path / "old_m1.parquet")
    write_bars(m1, tmp_path / "x_m15.parquet")  # must not count as m1
    with pytest.raises(DataValidationError, match=r"2 files .*m1\.parquet, old_m1\.parquet"):
        find_tf_file(tmp_path, "m1")


def test_missing_timeframe_file_says_what_was_expected(tmp_path: Path, m1: pd.DataFrame) -> None:
    write_bars(m1, tmp_path / "m1.parquet")
    with pytest.raises(DataValidationError, match=r"h4\.parquet or \*_h4\.parquet.*m1\.parquet"):
        load_tf_data(tmp_path, ["m1", "h4"])
    with pytest.raises(DataValidationError, match="data directory not found"):
        load_tf_data(tmp_path / "nowhere", ["m1"])


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "m1.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(DataValidationError, match=r"m1\.parquet: not a readable Parquet file"):
        load_tf_data(tmp_path, ["m1"])


def test_load_tf_data_validates_every_file(tmp_path: Path, m1: pd.DataFrame) -> None:
    write_bars(_set(m1, 7, "high", 1.0), tmp_path / "m1.parquet")
    with pytest.raises(DataValidationError, match=r"m1\.parquet: row 7 .*high >= "):
        load_tf_data(tmp_path, ["m1"])


# --- the seed guide's layout and the real data --------------------------------------------

SEED_ROWS = {"m30": 105_252, "h1": 52_632, "h4": 13_601, "d": 2_640}


def test_seed_layout_files_load(seed_layout_dir: Path) -> None:
    frames = load_tf_data(seed_layout_dir, ["m30", "h1", "h4", "d"])
    assert {tf: len(frame) for tf, frame in frames.items()} == SEED_ROWS
    for tf, frame in frames.items():
        assert str(frame.index.dtype) == "datetime64[ns, UTC]"
        assert frame.index[0].year == 2017 and frame.index[-1].year == 2025, tf
        assert_ohlc_invariants(frame)
    assert frames["h4"].index[0] == pd.Timestamp("2017-01-03 08:00", tz="UTC")
    assert (frames["d"].index.hour == 0).all()


@pytest.mark.real_data
def test_real_data_timeframes_equal_pandas_resample(
    shared_data_dir: Path, real_data_dir: Path
) -> None:
    m1 = pd.read_parquet(shared_data_dir / "usdjpy_m1_2017_2019.parquet").set_index("timestamp")
    frames = load_tf_data(real_data_dir, ["m1", "m5", "m15", "m30", "h1", "h4"])
    for tf, frame in frames.items():
        assert_same_bars(frame, pandas_resample(m1, PANDAS_RULES[tf]))
        assert_ohlc_invariants(frame)
    assert len(frames["m1"]) == 1_115_623


def test_synthetic_timeframes_equal_pandas_resample(synthetic_data_dir: Path) -> None:
    frames = load_tf_data(synthetic_data_dir, ["m1", "m5", "m15", "m30", "h1", "h4"])
    m1 = frames["m1"]
    assert_same_bars(m1, generate_m1(30_000, seed=0))
    for tf, frame in frames.items():
        assert_same_bars(frame, pandas_resample(m1, PANDAS_RULES[tf]))
        assert_ohlc_invariants(frame)
