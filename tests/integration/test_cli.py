"""The `stage1` command as a user runs it: help, `prepare` on good and bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stage1.cli import main
from stage1.data.io import load_tf_data

HEADER = "timestamp,open,high,low,close,volume\n"
GOOD_ROWS = [
    "2024-01-08 00:00:00,145.100,145.120,145.090,145.110,3",
    "2024-01-08 00:01:00,145.110,145.130,145.100,145.125,4",
    "2024-01-08 00:02:00,145.125,145.140,145.120,145.130,2",
    "2024-01-08 00:03:00,145.130,145.135,145.100,145.105,5",
    "2024-01-08 00:04:00,145.105,145.110,145.080,145.090,1",
]


def _with_row(index: int, row: str) -> list[str]:
    rows = list(GOOD_ROWS)
    rows[index] = row
    return rows


BAD_INPUTS = {
    "nan_price": (
        HEADER + "\n".join(_with_row(3, "2024-01-08 00:03:00,145.130,145.135,145.100,,5")),
        ["row 3", "line 5", "close is nan", "finite"],
    ),
    "duplicate_timestamp": (
        HEADER + "\n".join(_with_row(2, GOOD_ROWS[1])),
        ["row 2", "duplicate timestamp"],
    ),
    "high_below_low": (
        HEADER + "\n".join(_with_row(1, "2024-01-08 00:01:00,145.110,145.000,145.100,145.110,4")),
        ["row 1", "high >= low"],
    ),
    "unsorted_timestamps": (
        HEADER + "\n".join([GOOD_ROWS[0], GOOD_ROWS[2], GOOD_ROWS[1], *GOOD_ROWS[3:]]),
        ["row 2", "earlier than row 1", "timestamps increase"],
    ),
    "missing_close_column": (
        "timestamp,open,high,low,volume\n"
        + "\n".join(r.rsplit(",", 2)[0] + ",1" for r in GOOD_ROWS),
        ["open, high, low, close"],
    ),
    "empty_file": ("", ["file is empty"]),
    "header_only": (HEADER, ["no bars", "no data rows"]),
    "non_positive_price": (
        HEADER + "\n".join(_with_row(4, "2024-01-08 00:04:00,0,145.110,0,145.090,1")),
        ["row 4", "open is 0.0", "prices > 0"],
    ),
    "not_a_price_file": (
        "# Notes\n\nThis is a README, not a table of prices.\nSee you soon.\n",
        ["not a price file"],
    ),
    "text_in_a_price_column": (
        HEADER + "\n".join(_with_row(2, "2024-01-08 00:02:00,145.125,abc,145.120,145.130,2")),
        ["row 2", "high value 'abc' is not a number"],
    ),
    "bad_time": (
        HEADER + "\n".join(_with_row(1, "yesterday,145.110,145.130,145.100,145.125,4")),
        ["row 1", "'yesterday'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    text, expected = BAD_INPUTS[case]
    source = tmp_path / "bars.csv"
    source.write_text(text)
    out = tmp_path / "derived"
    code = main(["prepare", "--input", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stage1 prepare: error: ") and str(source) in lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.csv"]


def test_missing_input_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prepare", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "input file not found" in err[0]


def test_prepare_writes_the_data_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "usdjpy_m1.csv"  # the name gives the instrument (else --instrument)
    source.write_text(HEADER + "\n".join(GOOD_ROWS) + "\n")
    out = tmp_path / "derived"
    code = main(["prepare", "--input", str(source), "--out", str(out), "--timeframes", "m1", "m5"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "5 M1 bars" in printed and "m5" in printed and str(out) in printed
    frames = load_tf_data(out, ["m1", "m5"])
    assert len(frames["m1"]) == 5 and len(frames["m5"]) == 1
    assert frames["m5"]["high"].iloc[0] == 145.140 and frames["m5"]["close"].iloc[0] == 145.090
    # A second run refuses to overwrite; --force replaces.
    assert main(["prepare", "--input", str(source), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["prepare", "--input", str(source), "--out", str(out), "--force"]) == 0


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    from stage1.errors import DataValidationError

    source = tmp_path / "bars.csv"
    source.write_text("")
    with pytest.raises(DataValidationError):
        main(["--debug", "prepare", "--input", str(source), "--out", str(tmp_path / "o")])


@pytest.mark.real_data
def test_prepare_real_m1_file(shared_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "usdjpy"
    source = shared_data_dir / "usdjpy_m1_2017_2019.parquet"
    assert main(["prepare", "--input", str(source), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["rows"] == 1_115_623
    assert manifest["weekly_open"]["fits"] is True
    assert manifest["weekly_open"]["new_york_mode"] == "Sun 17:00"
    assert list(manifest["files"]) == ["m1", "m5", "m15", "m30", "h1", "h4"]


def test_python_dash_m_stage1_is_the_cli() -> None:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "stage1", "train", "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: stage1 train")
    assert "--fast_dev_run" in result.stdout


def test_help_explains_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("stage1", path=search)
    assert script, "the `stage1` console script is not installed (pip install -e .)"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("prepare", "train", "evaluate", "encode", "demo", "check"):
        assert command in result.stdout
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--out", "--tz", "--format", "--timeframes", "--force", "histdata"):
        assert flag in text
