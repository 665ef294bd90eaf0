"""`stage1 encode` as a user runs it: Parquet and .npy outputs, errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from stage1.checkpoint import export_checkpoint
from stage1.cli import main
from stage1.config import load_config
from stage1.data.dataset import Stage1Dataset
from stage1.data.io import load_tf_data
from stage1.inference import Stage1InferenceEngine
from stage1.model.model import Stage1Model

# Splits that fit the synthetic fixture's four weeks with the test config's 64 h embargo.
SPLIT_OVERRIDES = ["data.train_frac=0.4", "data.val_frac=0.3"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> Path:
    """A fresh model and a normaliser fitted by Stage1Dataset, exported as stage1 train does."""
    config = load_config("test", SPLIT_OVERRIDES)
    normalizer = Stage1Dataset(synthetic_data_dir, config, "train").normalizer
    torch.manual_seed(0)
    state = Stage1Model(config).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "stage1_best.pth"
    return export_checkpoint(path, state, config, normalizer.to_dict(), 0, None)


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Stage1InferenceEngine:
    return Stage1InferenceEngine(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def frames(synthetic_data_dir: Path, engine: Stage1InferenceEngine) -> dict[str, pd.DataFrame]:
    return load_tf_data(synthetic_data_dir, engine.timeframes)


@pytest.fixture(scope="module")
def time_range(engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame]) -> tuple[str, str]:
    """About 120 anchors in the middle of the data, as a user would type them (UTC)."""
    anchors = engine.build_sampler(frames).anchor_times
    middle = len(anchors) // 2
    return str(anchors[middle].tz_convert(None)), str(anchors[middle + 119].tz_convert(None))


def _encode_args(checkpoint: Path, data_dir: Path, out: Path, time_range: tuple[str, str]) -> list:
    start, end = time_range
    return [
        "encode",
        "--ckpt",
        str(checkpoint),
        "--data_dir",
        str(data_dir),
        "--out",
        str(out),
        "--start",
        start,
        "--end",
        end,
        "--batch_size",
        "50",
    ]


def test_parquet_output_holds_pooled_embeddings(
    tmp_path: Path,
    checkpoint: Path,
    synthetic_data_dir: Path,
    engine: Stage1InferenceEngine,
    frames: dict[str, pd.DataFrame],
    time_range: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "emb.parquet"
    args = _encode_args(checkpoint, synthetic_data_dir, out, time_range)
    assert main([*args, "--pool", "mean"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["timestamp"] + [f"e{j}" for j in range(6 * 64)]
    assert str(table.schema.field("timestamp").type) == "timestamp[ns, tz=UTC]"
    meta = json.loads(table.schema.metadata[b"stage1"])
    assert (meta["pool"], meta["shape"], meta["timeframes"][0]) == ("mean", [384], "m1")
    timestamps, expected = engine.encode(frames, *time_range, pool="mean")
    frame = table.to_pandas()
    assert len(frame) == 120
    assert pd.DatetimeIndex(frame["timestamp"]).equals(timestamps.rename(None))
    np.testing.assert_allclose(frame.drop(columns="timestamp").to_numpy(), expected, rtol=1e-6)
    assert "stage1 encode: 120 anchors" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["emb.parquet"]


def test_parquet_without_pool_is_flattened(
    tmp_path: Path,
    checkpoint: Path,
    synthetic_data_dir: Path,
    time_range: tuple[str, str],
) -> None:
    out = tmp_path / "flat.parquet"
    assert main(_encode_args(checkpoint, synthetic_data_dir, out, time_range)) == 0
    metadata = pq.read_metadata(out)
    assert metadata.num_rows == 120
    assert metadata.num_columns == 1 + 6 * 4 * 64


def test_npy_output_with_timestamps(
    tmp_path: Path,
    checkpoint: Path,
    synthetic_data_dir: Path,
    engine: Stage1InferenceEngine,
    frames: dict[str, pd.DataFrame],
    time_range: tuple[str, str],
) -> None:
    out = tmp_path / "emb.npy"
    assert main(_encode_args(checkpoint, synthetic_data_dir, out, time_range)) == 0
    embeddings = np.load(out)
    times = np.load(tmp_path / "emb_timestamps.npy")
    expected_times, expected = engine.encode(frames, *time_range)
    assert embeddings.shape == (120, 6, 4, 64) and embeddings.dtype == np.float32
    assert times.dtype == np.dtype("datetime64[ns]")
    assert np.array_equal(times, expected_times.tz_convert(None).to_numpy())
    np.testing.assert_allclose(embeddings, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--ckpt": "missing.pth"}, "missing.pth: checkpoint file not found"),
        ({"--out": "emb.csv"}, "--out: "),
        ({"--start": "2031-01-01", "--end": "2031-02-01"}, "no valid window has its anchor"),
        ({"--start": "yesterday-ish"}, "start: 'yesterday-ish' is not a time"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path,
    checkpoint: Path,
    synthetic_data_dir: Path,
    time_range: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    args = _encode_args(checkpoint, synthetic_data_dir, tmp_path / "out" / "emb.npy", time_range)
    for flag, value in change.items():
        value = str(tmp_path / value) if flag in ("--ckpt", "--out") else value
        args[args.index(flag) + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert err.startswith("stage1 encode: error:")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", ["emb.npy", "emb.parquet"])
def test_interrupted_run_keeps_previous_output_and_leaves_no_partial_file(
    tmp_path: Path,
    name: str,
    checkpoint: Path,
    synthetic_data_dir: Path,
    time_range: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / name
    out.write_bytes(b"previous result")
    calls = {"n": 0}
    real_embed = Stage1InferenceEngine.embed_windows

    def failing_embed(self: Stage1InferenceEngine, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-run")
        return real_embed(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Stage1InferenceEngine, "embed_windows", failing_embed)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        main(_encode_args(checkpoint, synthetic_data_dir, out, time_range))
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == [name]
