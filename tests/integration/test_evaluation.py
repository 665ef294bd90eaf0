"""`stage1 evaluate` end to end on synthetic data: every window, SPEC §6 keys, report files,
scale-free numbers on data the model never saw, and a peeking model caught by the alarms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest
import torch

from stage1.checkpoint import export_checkpoint, load_checkpoint
from stage1.cli import main
from stage1.config import load_config
from stage1.data.dataset import Stage1Dataset
from stage1.data.io import OHLC, load_tf_data, write_bars
from stage1.data.normalization import TFNormalizer
from stage1.evaluation.alarms import leak_alarms
from stage1.evaluation.passes import reconstruct_split
from stage1.model.model import Stage1Model

# configs/test.yaml, shrunk further so a whole evaluation takes seconds on 2 CPU cores. The
# synthetic fixture holds about three weeks: too short for h1/h4 windows plus embargoes.
TINY = [
    "data.timeframes=[m1,m5,m15,m30]",
    "data.train_frac=0.88",
    "data.val_frac=0.06",
    "model.d_model=16",
    "model.encoder.n_layers=1",
    "model.encoder.n_heads=2",
    "evaluation.probe_max_train_windows=300",
    "evaluation.n_plot_windows=2",
]
REQUIRED = (
    "mae", "mae_price", "corr_close", "corr_delta",
    "skill_interp", "skill_last", "skill_bridge", "skill_best",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained Stage1Model of the tiny config, exported with train-split statistics."""
    config = load_config("test", TINY)
    normalizer = Stage1Dataset(synthetic_data_dir, config, "train").normalizer
    torch.manual_seed(0)
    model = Stage1Model(config)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "stage1_best.pth"
    return export_checkpoint(path, model.state_dict(), config, normalizer.to_dict(), 0, None)


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint: Path, synthetic_data_dir: Path) -> tuple[dict, Path]:
    """``stage1 evaluate`` with default output locations: (metrics, report_dir)."""
    rc = main(["evaluate", "--ckpt", str(tiny_checkpoint), "--data_dir", str(synthetic_data_dir)])
    assert rc == 0
    report_dir = tiny_checkpoint.parent.parent / "eval_test"
    return json.loads((report_dir / "metrics.json").read_text()), report_dir


def test_metrics_json_has_the_spec_keys(evaluated):
    metrics, _ = evaluated
    assert metrics["split"] == "test"
    assert metrics["alarms"] == [] or all(isinstance(a, str) for a in metrics["alarms"])
    assert set(metrics["per_tf"]) == {"m1", "m5", "m15", "m30"}
    for block in (*metrics["per_tf"].values(), metrics["mean"]):
        for key in REQUIRED:
            assert isinstance(block[key], float), key
    for kind in ("encoder", "raw", "random"):
        assert {"vol_r2", "sign_acc", "sign_auc", "n_train", "n_test"} <= set(
            metrics["probe"][kind]
        )
        assert 0 < metrics["probe"][kind]["n_test"] <= 300
    assert metrics["masking"]["synchronised"] is True
    assert metrics["pip"] == 0.01  # synthetic USDJPY-like prices around 110
    assert metrics["unsynchronised"]["mean"]["skill_best"] is not None


def test_every_window_of_the_split_is_evaluated(evaluated, tiny_checkpoint, synthetic_data_dir):
    metrics, _ = evaluated
    config = load_config("test", TINY)
    stats = torch.load(tiny_checkpoint, weights_only=True)["normalizer"]
    test = Stage1Dataset(synthetic_data_dir, config, "test", TFNormalizer.from_dict(stats))
    assert metrics["n_windows"] == len(test) > 0
    for entry in metrics["per_tf"].values():
        spans = entry["interior"]["n_hidden_bars"] + entry["right_edge"]["n_hidden_bars"]
        assert entry["n_hidden_bars"] == spans > 0


def test_an_untrained_model_is_its_prior_and_beats_no_baseline(evaluated):
    """The decoders start at zero: an untrained model reproduces its prior (the bridge on the
    base timeframe, agg on coarser ones) exactly, so it ties the best baseline at most."""
    metrics, _ = evaluated
    per_tf = metrics["per_tf"]
    assert per_tf["m1"]["skill_bridge"] == pytest.approx(0.0, abs=1e-6)
    for tf in ("m5", "m15", "m30"):
        assert per_tf[tf]["skill_agg"] == pytest.approx(0.0, abs=1e-6), tf
    for tf, entry in per_tf.items():
        assert entry["skill_best"] <= 1e-6, tf


def test_an_untrained_model_without_prior_loses_to_the_baselines(val_dataset):
    config = load_config("test", [*TINY, "model.prior=none"])
    torch.manual_seed(0)
    model = Stage1Model(config).eval()
    model.set_normalizer(val_dataset.normalizer.mean, val_dataset.normalizer.std)
    result = reconstruct_split(model, val_dataset, config, torch.device("cpu"), sync=True)[0]
    mean = result.result()["mean"]
    assert mean["skill_best"] < 0
    assert mean["skill_interp"] < 0


def test_report_html_and_plots_are_written(evaluated):
    _, report_dir = evaluated
    html = (report_dir / "report.html").read_text()
    assert "How to read this" in html and "data:image/png;base64," in html
    for name in ("skill", "probe", "masks", "reconstruction_m1", "reconstruction_m30"):
        assert (report_dir / f"{name}.png").stat().st_size > 1000


def test_scaled_prices_give_the_same_skills_on_a_data_dir_never_seen(
    tiny_checkpoint, synthetic_data_dir, tmp_path
):
    """Features are scale-free, so prices x 0.01 (a EURUSD-like level) change only the price
    units; the scaled directory is new to the model, which uses the checkpoint's statistics."""
    scaled_dir = tmp_path / "scaled"
    scaled_dir.mkdir()
    for tf, bars in load_tf_data(synthetic_data_dir, ["m1", "m5", "m15", "m30"]).items():
        scaled = pd.DataFrame({c: bars[c] * 0.01 for c in OHLC}, index=bars.index)
        write_bars(scaled, scaled_dir / f"{tf}.parquet")
    model, config, stats, _ = load_checkpoint(tiny_checkpoint)
    results = []
    for data_dir in (synthetic_data_dir, scaled_dir):
        val = Stage1Dataset(data_dir, config, "val", TFNormalizer.from_dict(stats))
        accumulator, _ = reconstruct_split(model, val, config, torch.device("cpu"), sync=True)
        results.append(accumulator.result())
    original, scaled_result = results
    assert scaled_result["n_windows"] == original["n_windows"] > 0
    for tf, entry in original["per_tf"].items():
        other = scaled_result["per_tf"][tf]
        for key in ("skill_last", "skill_interp", "skill_bridge", "skill_best", "mae"):
            # abs: an untrained model IS its prior, so skill_best is ~1e-8 (a difference of
            # near-equal errors, whose 1e-16 log rounding is then 1e-4 of it).
            assert other[key] == pytest.approx(entry[key], rel=1e-4, abs=1e-9), (tf, key)
        assert other["mae_price"] == pytest.approx(entry["mae_price"] * 0.01, rel=1e-4)


class PeekingModel(torch.nn.Module):
    """Ignores the masks and returns its full input: it has seen every hidden value."""

    def forward(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, times: torch.Tensor | None = None
    ) -> dict:
        return {"reconstructed": x.clone(), "encoded": x.mean(dim=2, keepdim=True)}


@pytest.fixture(scope="module")
def val_dataset(tiny_checkpoint: Path, synthetic_data_dir: Path) -> Stage1Dataset:
    stats = torch.load(tiny_checkpoint, weights_only=True)["normalizer"]
    config = load_config("test", TINY)
    return Stage1Dataset(synthetic_data_dir, config, "val", TFNormalizer.from_dict(stats))


def peek(dataset: Stage1Dataset):
    model = cast(Stage1Model, PeekingModel())
    return reconstruct_split(model, dataset, dataset.config, torch.device("cpu"), sync=True)


def test_a_model_that_peeks_at_hidden_bars_trips_the_right_edge_alarm(val_dataset):
    result = peek(val_dataset)[0].result()
    assert result["n_windows"] == len(val_dataset)
    assert result["mean"]["skill_best"] == pytest.approx(1.0)
    alarmed = {a.split(":")[0] for a in leak_alarms(result["per_tf"], {})}
    per_tf = result["per_tf"]
    # The gain must be significant (t >= 3): every timeframe with enough right-edge bars alarms.
    judged = {tf for tf, e in per_tf.items() if (e["right_edge"]["close_skill_fresh_t"] or 0) >= 3}
    assert "m1" in alarmed and alarmed == judged
    for tf, entry in per_tf.items():
        if entry["right_edge"]["n_hidden_bars"] >= 20:
            assert tf in alarmed, (tf, entry["right_edge"])


def test_masks_are_reproducible(val_dataset):
    first, second = (peek(val_dataset)[1] for _ in range(2))
    assert first.mask_sample.any()
    np.testing.assert_array_equal(first.mask_sample, second.mask_sample)


def test_overrides_outside_evaluation_are_rejected(tiny_checkpoint, synthetic_data_dir, capsys):
    argv = ["evaluate", "--ckpt", str(tiny_checkpoint), "--data_dir", str(synthetic_data_dir)]
    assert main([*argv, "model.d_model=8"]) == 2
    assert "model.d_model=8" in capsys.readouterr().err


def test_missing_checkpoint_is_one_line_error(synthetic_data_dir, tmp_path, capsys):
    argv = ["evaluate", "--ckpt", str(tmp_path / "nope.pth"), "--data_dir", str(synthetic_data_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.pth" in err and len(err.splitlines()) == 1
