"""The main job end to end, shortened: `stage1 demo` on the synthetic fixture through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stage1.cli import main


def test_demo_runs_end_to_end(synthetic_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--data_dir",
            str(synthetic_data_dir),
            "--config",
            "test",
            "data.train_frac=0.4",
            "data.val_frac=0.3",
            "training.max_epochs=1",
            "training.limit_train_batches=3",
            "training.limit_val_batches=2",
            "evaluation.probe_max_train_windows=500",
        ]
    )
    assert code == 0
    assert (out / "run" / "checkpoints" / "stage1_best.pth").is_file()
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_windows"] > 0
    assert {"per_tf", "mean", "probe", "alarms"} <= set(metrics)
    report = (out / "report" / "report.html").read_text()
    assert "<img" in report
    embeddings = pd.read_parquet(out / "embeddings.parquet")
    assert len(embeddings) > 0 and "timestamp" in embeddings.columns
