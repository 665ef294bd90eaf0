"""stage1.data.prepare: input layouts, time zones, manifest, atomic output, weekly-open check."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1.cli import main
from stage1.data.instruments import guess_instrument
from stage1.data.io import OHLC, file_sha256, load_tf_data, write_bars
from stage1.data.prepare import prepare
from stage1.data.synthetic import generate_m1
from stage1.data.weekly_open import weekly_open_report
from stage1.errors import DataValidationError, Stage1Error

NEW_YORK = "America/New_York"


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    """A week and a half of synthetic M1 bars (two weekly opens)."""
    return generate_m1(12_000, seed=5)


def _labels(bars: pd.DataFrame, tz: str = "UTC") -> pd.Series:
    return bars.index.tz_convert(tz).tz_localize(None).to_series(index=range(len(bars)))


def _prices(bars: pd.DataFrame) -> pd.DataFrame:
    return bars.reset_index(drop=True)[list(OHLC)]


def _csv(path: Path, frame: pd.DataFrame, sep: str = ",", header: bool = True) -> Path:
    frame.to_csv(path, sep=sep, header=header, index=False)
    return path


def write_generic_header(bars: pd.DataFrame, path: Path) -> Path:
    frame = _prices(bars).assign(Volume=0)
    frame.insert(0, "Timestamp", _labels(bars).dt.strftime("%Y-%m-%d %H:%M:%S"))
    return _csv(path, frame.rename(columns=str.capitalize))


def write_generic_date_time(bars: pd.DataFrame, path: Path) -> Path:
    frame = _prices(bars)
    frame.insert(0, "time", _labels(bars).dt.strftime("%H:%M:%S"))
    frame.insert(0, "date", _labels(bars).dt.strftime("%Y-%m-%d"))
    return _csv(path, frame)


def write_generic_headerless(bars: pd.DataFrame, path: Path) -> Path:
    frame = _prices(bars)
    frame.insert(0, "t", _labels(bars).dt.strftime("%Y-%m-%dT%H:%M"))
    return _csv(path, frame, header=False)


def write_histdata(bars: pd.DataFrame, path: Path, tz: str = "UTC") -> Path:
    frame = _prices(bars).assign(volume=0)
    frame.insert(0, "t", _labels(bars, tz).dt.strftime("%Y%m%d %H%M%S"))
    return _csv(path, frame, sep=";", header=False)


def write_mt_header(bars: pd.DataFrame, path: Path) -> Path:
    frame = _prices(bars).rename(columns=str.capitalize).assign(Volume=7)
    frame.insert(0, "Time", _labels(bars).dt.strftime("%H:%M"))
    frame.insert(0, "Date", _labels(bars).dt.strftime("%Y.%m.%d"))
    return _csv(path, frame)


def write_mt_headerless(bars: pd.DataFrame, path: Path) -> Path:
    frame = _prices(bars).assign(volume=7)
    frame.insert(0, "time", _labels(bars).dt.strftime("%H:%M"))
    frame.insert(0, "date", _labels(bars).dt.strftime("%Y.%m.%d"))
    return _csv(path, frame, header=False)


def write_mt5_tabs(bars: pd.DataFrame, path: Path) -> Path:
    frame = _prices(bars).rename(columns=lambda c: f"<{c.upper()}>")
    frame = frame.assign(**{"<TICKVOL>": 1, "<VOL>": 0, "<SPREAD>": 3})
    frame.insert(0, "<TIME>", _labels(bars).dt.strftime("%H:%M:%S"))
    frame.insert(0, "<DATE>", _labels(bars).dt.strftime("%Y.%m.%d"))
    return _csv(path, frame, sep="\t")


def write_parquet_index(bars: pd.DataFrame, path: Path) -> Path:
    bars.tz_convert(None).rename_axis("Date").assign(volume=1.0).to_parquet(path)
    return path


def write_parquet_column_other_zone(bars: pd.DataFrame, path: Path) -> Path:
    bars.tz_convert("Asia/Tokyo").reset_index().rename(columns=str.upper).to_parquet(path)
    return path


LAYOUTS: dict[str, tuple[Callable[[pd.DataFrame, Path], Path], str, str]] = {
    "generic_header": (write_generic_header, "bars.csv", "generic"),
    "generic_date_time": (write_generic_date_time, "bars.csv", "generic"),
    "generic_headerless": (write_generic_headerless, "bars.txt", "generic"),
    "histdata": (write_histdata, "DAT_ASCII_USDJPY_M1_2020.csv", "histdata"),
    "mt_header": (write_mt_header, "USDJPY1.csv", "mt"),
    "mt_headerless": (write_mt_headerless, "USDJPY1.csv", "mt"),
    "mt5_tabs": (write_mt5_tabs, "USDJPY_M1.csv", "mt"),
    "parquet_index": (write_parquet_index, "bars.parquet", "generic"),
    "parquet_column_tokyo": (write_parquet_column_other_zone, "bars.parquet", "generic"),
}


def assert_same_m1(m1: pd.DataFrame, bars: pd.DataFrame) -> None:
    np.testing.assert_array_equal(m1.index.asi8, bars.index.asi8)
    for name in OHLC:
        np.testing.assert_allclose(m1[name].to_numpy(), bars[name].to_numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_input_layout_gives_the_same_m1(
    tmp_path: Path, bars: pd.DataFrame, layout: str
) -> None:
    writer, name, expected_format = LAYOUTS[layout]
    source = writer(bars, tmp_path / name)
    manifest = prepare(source, tmp_path / "out", timeframes=["m1", "h1"])
    assert manifest["source"]["format"] == expected_format
    frames = load_tf_data(tmp_path / "out", ["m1", "h1"])
    assert_same_m1(frames["m1"], bars)


def test_explicit_format_must_fit_the_file(tmp_path: Path, bars: pd.DataFrame) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    manifest = prepare(source, tmp_path / "ok", fmt="histdata", timeframes=["m1"])
    assert manifest["source"]["format"] == "histdata"
    with pytest.raises(DataValidationError, match="--format mt does not fit"):
        prepare(source, tmp_path / "bad", fmt="mt", timeframes=["m1"])
    date_time = write_mt_header(bars, tmp_path / "mt.csv")  # Date,Time header: mt or generic
    manifest = prepare(date_time, tmp_path / "generic", fmt="generic", timeframes=["m1"])
    assert manifest["source"]["format"] == "generic"
    parquet = write_parquet_index(bars, tmp_path / "bars.parquet")
    with pytest.raises(DataValidationError, match="--format histdata reads text files"):
        prepare(parquet, tmp_path / "bad", fmt="histdata", timeframes=["m1"])
    assert not (tmp_path / "bad").exists()


def test_output_files_have_the_derived_layout(tmp_path: Path, bars: pd.DataFrame) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    prepare(source, tmp_path / "out", timeframes=["h4", "m1", "d", "m15"])
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["d.parquet", "h4.parquet", "m1.parquet", "m15.parquet", "manifest.json"]
    raw = pd.read_parquet(tmp_path / "out" / "m15.parquet")
    assert list(raw.columns) == ["timestamp", *OHLC]
    assert str(raw["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert (raw[list(OHLC)].dtypes == np.float64).all()


def test_manifest_records_source_files_and_hashes(tmp_path: Path, bars: pd.DataFrame) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    out = tmp_path / "out"
    returned = prepare(source, out, tz="UTC", timeframes=["h1", "m1", "m5"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == returned
    assert manifest["timeframes"] == ["m1", "m5", "h1"]
    assert manifest["source"]["sha256"] == file_sha256(source)
    assert manifest["source"]["rows"] == len(bars)
    assert manifest["source"]["tz"] == "UTC"
    assert manifest["stage1_version"]
    assert manifest["created_utc"]
    frames = load_tf_data(out, manifest["timeframes"])
    for tf, entry in manifest["files"].items():
        assert entry["file"] == f"{tf}.parquet"
        assert entry["sha256"] == file_sha256(out / entry["file"])
        assert entry["rows"] == len(frames[tf])
        assert pd.Timestamp(entry["first_bar"]) == frames[tf].index[0]
        assert pd.Timestamp(entry["last_bar"]) == frames[tf].index[-1]


# --- time zones ----------------------------------------------------------------------------


def test_new_york_labels_are_converted_to_utc(tmp_path: Path, bars: pd.DataFrame) -> None:
    path = write_histdata(bars, tmp_path / "ny.csv", tz=NEW_YORK)
    prepare(path, tmp_path / "out", tz=NEW_YORK, timeframes=["m1"])
    assert_same_m1(load_tf_data(tmp_path / "out", ["m1"])["m1"], bars)


def _one_bar_per_minute(labels: list[str], path: Path) -> Path:
    frame = pd.DataFrame({"timestamp": labels, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0})
    return _csv(path, frame)


def test_repeated_fall_back_hour_is_resolved_by_order(tmp_path: Path) -> None:
    hour = [f"2019-11-03 01:{m:02d}" for m in range(60)]
    labels = ["2019-11-03 00:59", *hour, *hour, "2019-11-03 02:00"]
    path = _one_bar_per_minute(labels, tmp_path / "fallback.csv")
    prepare(path, tmp_path / "out", tz=NEW_YORK, timeframes=["m1"])
    m1 = load_tf_data(tmp_path / "out", ["m1"])["m1"]
    expected = pd.date_range("2019-11-03 04:59", "2019-11-03 07:00", freq="min", tz="UTC")
    np.testing.assert_array_equal(m1.index.asi8, expected.as_unit("ns").asi8)


def test_ambiguous_label_without_order_is_an_error(tmp_path: Path) -> None:
    path = _one_bar_per_minute(["2019-11-03 01:30", "2019-11-03 01:31"], tmp_path / "amb.csv")
    with pytest.raises(DataValidationError, match=r"row 0: .*occurs twice in America/New_York"):
        prepare(path, tmp_path / "out", tz=NEW_YORK, timeframes=["m1"])


def test_label_skipped_by_dst_is_an_error(tmp_path: Path) -> None:
    labels = ["2019-03-10 01:58", "2019-03-10 01:59", "2019-03-10 02:00"]
    path = _one_bar_per_minute(labels, tmp_path / "spring.csv")
    with pytest.raises(DataValidationError, match=r"row 2: .*does not exist in America/New_York"):
        prepare(path, tmp_path / "out", tz=NEW_YORK, timeframes=["m1"])
    assert not (tmp_path / "out").exists()


def test_unknown_time_zone_is_rejected(tmp_path: Path, bars: pd.DataFrame) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    with pytest.raises(Stage1Error, match="not an IANA time zone"):
        prepare(source, tmp_path / "out", tz="Mars/Olympus")


# --- weekly open ---------------------------------------------------------------------------


def test_weekly_open_fits_when_labels_are_read_in_their_zone(
    tmp_path: Path, bars: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    with caplog.at_level(logging.WARNING):
        manifest = prepare(source, tmp_path / "out", timeframes=["m1"])
    weekly = manifest["weekly_open"]
    assert weekly["fits"] and weekly["weekly_opens"] == 1
    assert weekly["utc_mode"] == "Sun 22:00"
    assert not caplog.records


def test_weekly_open_warns_and_suggests_a_zone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bars = generate_m1(40_000, seed=2, start="2020-06-07 21:00")
    path = write_histdata(bars, tmp_path / "ny_labels.csv", tz=NEW_YORK)
    with caplog.at_level(logging.WARNING):
        manifest = prepare(path, tmp_path / "out", tz="UTC", timeframes=["m1"])
    weekly = manifest["weekly_open"]
    assert weekly["fits"] is False and weekly["suggested_tz"] == NEW_YORK
    assert "America/New_York time read as UTC" in caplog.text
    assert "--tz America/New_York" in caplog.text


def test_weekly_open_report_counts_only_breaks_over_a_day() -> None:
    times = pd.to_datetime(
        ["2024-01-05 21:59", "2024-01-07 22:00", "2024-01-07 22:01", "2024-01-08 10:00"], utc=True
    )
    report = weekly_open_report(pd.DatetimeIndex(times))
    assert report["weekly_opens"] == 1
    assert report["new_york_mode"] == "Sun 17:00" and report["fit_share"] == 1.0
    assert weekly_open_report(pd.DatetimeIndex(times[2:]))["fits"] is None


# --- inputs that are not M1 bars ----------------------------------------------------------


def test_five_minute_bars_are_not_m1(tmp_path: Path, bars: pd.DataFrame) -> None:
    from stage1.data.io import aggregate_bars

    path = tmp_path / "m5.parquet"
    write_bars(aggregate_bars(bars, "m5"), path)
    with pytest.raises(DataValidationError, match="typically 5 minutes apart"):
        prepare(path, tmp_path / "out")


def test_timestamps_must_be_whole_minutes(tmp_path: Path) -> None:
    path = _one_bar_per_minute(["2020-01-06 00:00:00", "2020-01-06 00:01:30"], tmp_path / "s.csv")
    with pytest.raises(DataValidationError, match=r"row 1 \(line 3\).*not on a whole minute"):
        prepare(path, tmp_path / "out")


def test_bad_timeframes_are_rejected(tmp_path: Path, bars: pd.DataFrame) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    with pytest.raises(Stage1Error, match="timeframe 'x5'"):
        prepare(source, tmp_path / "out", timeframes=["m1", "x5"])
    with pytest.raises(Stage1Error, match="duplicate"):
        prepare(source, tmp_path / "out", timeframes=["m1", "M1"])


# --- atomic output -------------------------------------------------------------------------


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_existing_output_is_kept_unless_forced(tmp_path: Path, bars: pd.DataFrame) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Stage1Error, match="--force"):
        prepare(source, out, timeframes=["m1"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    prepare(source, out, timeframes=["m1"], force=True)
    assert sorted(p.name for p in out.iterdir()) == ["m1.parquet", "manifest.json"]
    assert _siblings(out) == ["bars.csv", "out"]  # no temporary directories left behind


def test_empty_existing_output_directory_is_filled(tmp_path: Path, bars: pd.DataFrame) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    (tmp_path / "out").mkdir()
    prepare(source, tmp_path / "out", timeframes=["m1"])
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_failure_leaves_a_forced_output_untouched(tmp_path: Path, bars: pd.DataFrame) -> None:
    good = write_histdata(bars, tmp_path / "good.csv")
    out = tmp_path / "out"
    prepare(good, out, timeframes=["m1"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.csv"
    bad.write_text(good.read_text().replace(";", ";-", 1))  # negative open in row 0
    with pytest.raises(DataValidationError, match="prices > 0"):
        prepare(bad, out, timeframes=["m1"], force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == ["bad.csv", "good.csv", "out"]


def test_force_refuses_to_delete_the_input(tmp_path: Path, bars: pd.DataFrame) -> None:
    out = tmp_path / "data"
    out.mkdir()
    source = write_histdata(bars, out / "bars.csv")
    with pytest.raises(Stage1Error, match="holds the input file"):
        prepare(source, out, force=True)
    assert source.is_file()


def test_zone_aware_input_ignores_tz_with_a_warning(
    tmp_path: Path, bars: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_parquet_column_other_zone(bars, tmp_path / "aware.parquet")
    with caplog.at_level(logging.WARNING):
        prepare(source, tmp_path / "out", tz=NEW_YORK, timeframes=["m1"])
    assert "carry their own zone" in caplog.text
    assert_same_m1(load_tf_data(tmp_path / "out", ["m1"])["m1"], bars)


# ------------------------------------------------------------------ several inputs, instrument
def _yearly_files(tmp_path: Path) -> tuple[pd.DataFrame, list[Path]]:
    """A year of synthetic M1 bars from late 2019 into early 2021, as three HistData files,
    one per calendar year (as HistData ships them)."""
    m1 = generate_m1(390_000, seed=8, start="2019-12-29 22:00")
    years = np.asarray(m1.index.year)
    assert sorted(set(years.tolist())) == [2019, 2020, 2021]
    paths = [
        write_histdata(m1[years == year], tmp_path / f"DAT_ASCII_EURUSD_M1_{year}.csv")
        for year in (2019, 2020, 2021)
    ]
    return m1, paths


def test_prepare_of_yearly_files_equals_prepare_of_their_concatenation(tmp_path: Path) -> None:
    m1, paths = _yearly_files(tmp_path)
    (tmp_path / "whole").mkdir()
    whole = write_histdata(m1, tmp_path / "whole" / "DAT_ASCII_EURUSD_M1_all.csv")
    timeframes = ["m1", "m15", "h4"]
    # Given out of order: the files are put in time order by their bars.
    split = prepare([paths[2], paths[0], paths[1]], tmp_path / "split", timeframes=timeframes)
    joined = prepare(whole, tmp_path / "joined", timeframes=timeframes)
    for tf in timeframes:
        expected = pd.read_parquet(tmp_path / "joined" / f"{tf}.parquet")
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "split" / f"{tf}.parquet"), expected
        )
        assert split["files"][tf]["sha256"] == joined["files"][tf]["sha256"]
    assert split["instrument"] == joined["instrument"] == "EURUSD"
    assert split["pip_size"] == 0.0001
    assert [Path(e["path"]).name for e in split["source"]["inputs"]] == [p.name for p in paths]
    assert sum(e["rows"] for e in split["source"]["inputs"]) == split["source"]["rows"] == len(m1)


def test_a_quoted_glob_reads_every_matching_file(tmp_path: Path, bars: pd.DataFrame) -> None:
    for i, part in enumerate((bars.iloc[:4000], bars.iloc[4000:9000], bars.iloc[9000:])):
        write_histdata(part, tmp_path / f"DAT_ASCII_USDJPY_M1_20{i:02d}.csv")
    write_histdata(bars.iloc[:10], tmp_path / "DAT_ASCII_USDJPY_M5_2000.csv")  # not matched
    manifest = prepare(
        str(tmp_path / "DAT_ASCII_USDJPY_M1_20*.csv"), tmp_path / "out", timeframes=["m1"]
    )
    assert len(manifest["source"]["inputs"]) == 3
    assert_same_m1(load_tf_data(tmp_path / "out", ["m1"])["m1"], bars)


def test_overlapping_input_files_are_one_error_naming_both(tmp_path: Path) -> None:
    m1 = generate_m1(60_000, seed=8)
    first = write_histdata(m1.iloc[:30_000], tmp_path / "DAT_ASCII_EURUSD_M1_a.csv")
    second = write_histdata(m1.iloc[29_990:], tmp_path / "DAT_ASCII_EURUSD_M1_b.csv")
    with pytest.raises(DataValidationError) as info:
        prepare([first, second], tmp_path / "out", timeframes=["m1"])
    message = str(info.value)
    assert "\n" not in message
    assert str(first) in message and str(second) in message and "overlap" in message
    assert not (tmp_path / "out").exists()
    # The documented rule: bars both files hold alike are kept once.
    manifest = prepare([first, second], tmp_path / "out", timeframes=["m1"], overlap="identical")
    assert manifest["source"]["rows"] == len(m1)
    assert_same_m1(load_tf_data(tmp_path / "out", ["m1"])["m1"], m1)


def test_overlap_identical_still_rejects_a_differing_bar(tmp_path: Path) -> None:
    m1 = generate_m1(60_000, seed=8)
    changed = m1.iloc[29_990:].copy()
    changed.iloc[3, changed.columns.get_loc("high")] += 0.01
    first = write_histdata(m1.iloc[:30_000], tmp_path / "DAT_ASCII_EURUSD_M1_a.csv")
    second = write_histdata(changed, tmp_path / "DAT_ASCII_EURUSD_M1_b.csv")
    with pytest.raises(DataValidationError, match="hold different bars at") as info:
        prepare([first, second], tmp_path / "out", timeframes=["m1"], overlap="identical")
    assert str(first) in str(info.value) and str(second) in str(info.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DAT_ASCII_EURUSD_M1_2019.csv", "EURUSD"),
        ("DAT_MT_GBPJPY_M1_201901.csv", "GBPJPY"),
        ("usdjpy_m1_2017_2019.parquet", "USDJPY"),
        ("XAUUSD-2020.csv", "XAUUSD"),
        ("bars.csv", None),
        ("prices_2019.csv", None),  # "prices" is six letters, not two currencies
    ],
)
def test_instrument_is_guessed_from_vendor_file_names(name: str, expected: str | None) -> None:
    assert guess_instrument(name) == expected


def test_input_files_of_two_instruments_are_refused(tmp_path: Path, bars: pd.DataFrame) -> None:
    a = write_histdata(bars.iloc[:5000], tmp_path / "DAT_ASCII_EURUSD_M1_1.csv")
    b = write_histdata(bars.iloc[5000:], tmp_path / "DAT_ASCII_GBPUSD_M1_2.csv")
    with pytest.raises(DataValidationError, match=r"looks like EURUSD but .* like GBPUSD"):
        prepare([a, b], tmp_path / "out", timeframes=["m1"])
    manifest = prepare([a, b], tmp_path / "out", timeframes=["m1"], instrument="EURGBP")
    assert manifest["instrument"] == "EURGBP"


def test_cli_requires_an_instrument_the_file_names_do_not_give(
    tmp_path: Path, bars: pd.DataFrame, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_histdata(bars, tmp_path / "bars.csv")
    args = ["prepare", "--input", str(source), "--out", str(tmp_path / "out"), "--timeframes", "m1"]
    assert main(args) == 2
    assert "--instrument" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--instrument", "USDJPY"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["instrument"], manifest["pip_size"]) == ("USDJPY", 0.01)


def test_a_glob_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="no input file matches"):
        prepare(str(tmp_path / "DAT_*.csv"), tmp_path / "out", timeframes=["m1"])
