"""Several instruments through the real CLI: a root of three synthetic pairs → train
(``--fast_dev_run`` and a short run) → evaluate (per instrument + pooled) → encode (one file per
instrument); several ``--data_dir`` flags; a root missing a timeframe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stage1.cli import main
from stage1.data.synthetic import write_synthetic_root

NAMES = ["EURUSD", "GBPUSD", "USDJPY"]
TIMEFRAMES = ["m1", "m5", "m15", "m30"]
# configs/test.yaml on four timeframes, tiny model, two steps: seconds on 2 CPU cores.
TINY = [
    f"data.timeframes=[{','.join(TIMEFRAMES)}]",
    "data.seq_len=16",
    "model.d_model=16",
    "model.encoder.n_layers=1",
    "model.encoder.n_heads=2",
    "dataloader.num_workers=0",
]
SHORT = [
    "training.max_epochs=1",
    "training.limit_train_batches=2",
    "training.limit_val_batches=1",
    "data.instrument_mixing=uniform",
]
EVAL = ["evaluation.max_windows=300", "evaluation.probe_max_train_windows=300"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_root(
        tmp_path_factory.mktemp("root"), NAMES, 12_000, TIMEFRAMES, stagger_minutes=360
    )


@pytest.fixture(scope="module")
def trained(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--config", "test", "--data_dir", str(root), "--output_dir", str(out)]
    assert main([*argv, *TINY, *SHORT]) == 0
    return out / "checkpoints" / "stage1_best.pth"


def test_fast_dev_run_trains_on_a_root_of_instruments(root: Path, tmp_path: Path) -> None:
    argv = ["train", "--config", "test", "--data_dir", str(root), "--output_dir", str(tmp_path)]
    assert main([*argv, "--fast_dev_run", *TINY]) == 0
    stats = json.loads((tmp_path / "normalizer_stats.json").read_text())
    assert stats["train_period"][0] < stats["train_period"][1]


def test_several_data_dir_flags_are_one_training_set(root: Path, tmp_path: Path) -> None:
    argv = ["train", "--config", "test", "--output_dir", str(tmp_path), "--fast_dev_run"]
    dirs = ["--data_dir", str(root / "EURUSD"), "--data_dir", str(root / "USDJPY")]
    assert main([*argv, *dirs, *TINY]) == 0


def test_evaluate_reports_every_instrument_and_the_pool(
    trained: Path, root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--ckpt", str(trained), "--data_dir", str(root), "--report_dir", str(out)]
    assert main([*argv, *EVAL]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["instruments"] == NAMES
    per = metrics["per_instrument"]
    assert list(per) == NAMES
    assert sum(entry["n_windows"] for entry in per.values()) == metrics["n_windows"]
    assert (per["USDJPY"]["pip"], per["EURUSD"]["pip"]) == (0.01, 0.0001)
    for entry in per.values():
        assert entry["n_windows"] > 0 and entry["mean"]["skill_bridge"] is not None
        assert set(entry["per_tf"]) == set(TIMEFRAMES)
    # Pooled pips would mix price units: none; per instrument they exist.
    assert metrics["per_tf"]["m1"]["mae_pips"] is None
    assert per["USDJPY"]["per_tf"]["m1"]["mae_pips"] is not None
    report = (out / "report.html").read_text()
    assert "Per instrument" in report and all(name in report for name in NAMES)


def test_encode_writes_one_file_per_instrument(trained: Path, root: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb.parquet"
    argv = ["encode", "--ckpt", str(trained), "--data_dir", str(root), "--out", str(out)]
    assert main([*argv, "--pool", "mean", "--batch_size", "256"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"emb_{n}.parquet" for n in NAMES]
    for name in NAMES:
        table = pq.read_table(tmp_path / f"emb_{name}.parquet")
        assert json.loads(table.schema.metadata[b"stage1"])["instrument"] == name
        times = table.column("timestamp").to_numpy()
        assert len(times) > 1000 and np.all(np.diff(times.astype(np.int64)) > 0)


def test_a_root_whose_instrument_lacks_a_timeframe_is_one_line(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "root"
    for name in NAMES:
        (broken / name).mkdir(parents=True)
        for path in (root / name).iterdir():
            if not (name == "EURUSD" and path.name == "m15.parquet"):
                (broken / name / path.name).write_bytes(path.read_bytes())
    argv = ["train", "--config", "test", "--data_dir", str(broken), "--fast_dev_run"]
    assert main([*argv, *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stage1 train: error: instrument EURUSD: ")
    assert "m15.parquet" in err and "\n" not in err
