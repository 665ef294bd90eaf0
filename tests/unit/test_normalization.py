"""TFNormalizer: z-scores per timeframe and feature, stats files, fitted on train windows only."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stage1.config import load_config
from stage1.data import dataset as dataset_module
from stage1.data.dataset import Stage1Dataset, build_sampler, build_splits
from stage1.data.features import FEATURE_NAMES
from stage1.data.io import aggregate_bars, load_tf_data, write_bars
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.synthetic import generate_m1
from stage1.errors import DataValidationError

TFS = ["m1", "m5", "h1"]


def random_features(n: int = 200, seq_len: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1e-3, 2e-3, 5e-4, 1e-3, 1e-4, 0.5])
    shift = torch.tensor([0.01, 0.02, -0.01, 0.0, 0.0, 0.1])
    return torch.randn(n, len(TFS), seq_len, 6, generator=g) * scale + shift


def test_fit_gives_unit_z_scores_per_timeframe_and_feature() -> None:
    x = random_features()
    x[:, 2] *= 10.0  # h1 has another scale: stats must be per timeframe
    normalizer = TFNormalizer(TFS).fit(x)
    assert normalizer.mean.shape == (3, 6) and normalizer.mean.dtype == torch.float32
    z = normalizer.normalize(x)
    torch.testing.assert_close(z.mean(dim=(0, 2)), torch.zeros(3, 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        z.std(dim=(0, 2), unbiased=False), torch.ones(3, 6), atol=1e-4, rtol=0
    )
    expected_std = x.double().permute(1, 3, 0, 2).reshape(3, 6, -1).std(-1, unbiased=False)
    torch.testing.assert_close(normalizer.std.double(), expected_std, rtol=1e-5, atol=0)


def test_streamed_chunks_equal_one_pass() -> None:
    x = random_features(n=300)
    whole = TFNormalizer(TFS).fit(x)
    streamed = TFNormalizer(TFS).fit(iter([x[:7], x[7:150], x[150:]]))
    torch.testing.assert_close(streamed.mean, whole.mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(streamed.std, whole.std, rtol=1e-5, atol=0)


def test_denormalize_inverts_normalize_for_any_leading_dims() -> None:
    normalizer = TFNormalizer(TFS).fit(random_features())
    for shape in [(3, 8, 6), (4, 3, 8, 6), (2, 5, 3, 8, 6)]:
        x = torch.randn(shape) * 1e-3
        z = normalizer.normalize(x)
        assert z.shape == x.shape and z.dtype == x.dtype
        torch.testing.assert_close(normalizer.denormalize(z), x, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="expected"):
        normalizer.normalize(torch.zeros(4, 2, 8, 6))


def test_constant_feature_is_not_blown_up() -> None:
    x = random_features()
    x[..., 5] = 0.25
    normalizer = TFNormalizer(TFS).fit(x)
    assert torch.all(normalizer.std[:, 5] == 1.0)
    assert torch.isfinite(normalizer.normalize(x)).all()


def test_save_and_load_stats(tmp_path: Path) -> None:
    normalizer = TFNormalizer(TFS).fit(random_features())
    path = tmp_path / "stats" / "normalizer.json"
    normalizer.save_stats(path, config_hash="abc123")
    assert [p.name for p in path.parent.iterdir()] == ["normalizer.json"]  # atomic, no temp left
    payload = json.loads(path.read_text())
    assert payload["feature_names"] == list(FEATURE_NAMES)
    assert payload["timeframes"] == TFS and payload["config_hash"] == "abc123"
    loaded = TFNormalizer.load_stats(path, TFS)
    assert torch.equal(loaded.mean, normalizer.mean) and torch.equal(loaded.std, normalizer.std)
    assert loaded.config_hash == "abc123"
    again = TFNormalizer.from_dict(normalizer.to_dict())
    assert torch.equal(again.mean, normalizer.mean)


def test_stats_for_other_timeframes_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "normalizer.json"
    TFNormalizer(TFS).fit(random_features()).save_stats(path, "h")
    with pytest.raises(
        DataValidationError, match=r"normalizer\.json.*\['m1', 'm5', 'h1'\].*\['m1', 'm5', 'h4'\]"
    ):
        TFNormalizer.load_stats(path, ["m1", "m5", "h4"])
    payload = json.loads(path.read_text())
    payload["feature_names"] = ["open", "high", "low", "close", "delta", "body"]
    path.write_text(json.dumps(payload))
    with pytest.raises(DataValidationError, match="feature names"):
        TFNormalizer.load_stats(path, TFS)


def test_unreadable_stats_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DataValidationError, match=r"broken\.json: not a valid normalisation stats"):
        TFNormalizer.load_stats(path, TFS)
    with pytest.raises(
        DataValidationError, match=r"missing\.json: normalisation stats file not found"
    ):
        TFNormalizer.load_stats(tmp_path / "missing.json", TFS)


# --------------------------------------------------------------------- fitted on train only
@pytest.fixture
def small_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fit on at most 5000 train windows (instead of 50 000) to keep these tests quick."""
    fit = functools.partial(dataset_module.fit_normalizer, max_windows=5000)
    monkeypatch.setattr(dataset_module, "fit_normalizer", fit)


def write_dataset(m1: pd.DataFrame, out: Path, timeframes: list[str]) -> Path:
    out.mkdir(parents=True)
    for tf in timeframes:
        write_bars(m1 if tf == "m1" else aggregate_bars(m1, tf), out / f"{tf}.parquet")
    return out


@pytest.mark.usefixtures("small_fit")
def test_normalizer_is_fitted_on_train_windows_only(tmp_path: Path) -> None:
    """Wild prices after the train split leave the stats unchanged; wild train prices do not."""
    timeframes = ["m1", "m5", "m15", "h1"]
    config = load_config("test", [f"data.timeframes={timeframes}".replace("'", "")])
    m1 = generate_m1(40_000, seed=2)
    clean = write_dataset(m1, tmp_path / "clean", timeframes)
    sampler = build_sampler(clean, config)
    splits = build_splits(sampler, config)
    last_train_anchor = sampler.anchor_times[splits["train"][-1]]

    def wild(after: bool) -> pd.DataFrame:
        """Every bar on one side of the last train anchor scaled by its own random factor."""
        rows = (m1.index >= last_train_anchor) if after else (m1.index < last_train_anchor)
        factor = np.exp(np.random.default_rng(0).normal(0.0, 0.02, size=len(m1)))
        factor[~rows] = 1.0
        return m1.mul(factor, axis=0)

    fitted = Stage1Dataset(clean, config, "test").normalizer
    changed_later = write_dataset(wild(after=True), tmp_path / "later", timeframes)
    later = Stage1Dataset(changed_later, config, "test")
    assert not np.array_equal(
        later.get_batch([0])["features"].numpy(),
        Stage1Dataset(clean, config, "test", fitted).get_batch([0])["features"].numpy(),
    )  # the test windows did change
    assert torch.equal(later.normalizer.mean, fitted.mean)
    assert torch.equal(later.normalizer.std, fitted.std)

    changed_train = write_dataset(wild(after=False), tmp_path / "train", timeframes)
    assert not torch.equal(Stage1Dataset(changed_train, config, "test").normalizer.std, fitted.std)


@pytest.mark.real_data
@pytest.mark.usefixtures("small_fit")
def test_normalizer_is_fitted_on_train_windows_only_real(real_data_dir: Path) -> None:
    """Real USDJPY: scrambling every bar after the train split leaves the stats unchanged."""
    timeframes = ["m1", "m5", "m15", "m30", "h1", "h4"]
    config = load_config("test", ["data.seq_len=48"])
    frames = load_tf_data(real_data_dir, timeframes)
    sampler = MultiTFWindowSampler(frames, 48)
    splits = build_splits(sampler, config)
    fitted = Stage1Dataset(None, config, "train", sampler=sampler, splits=splits).normalizer
    last_train_anchor = sampler.anchor_times[splits["train"][-1]]
    rng = np.random.default_rng(0)
    scrambled = {}
    for tf, bars in frames.items():
        factor = np.exp(rng.normal(0.0, 0.02, size=len(bars)))
        factor[bars.index < last_train_anchor] = 1.0
        scrambled[tf] = bars.mul(factor, axis=0)
    other = MultiTFWindowSampler(scrambled, 48)
    refit = Stage1Dataset(None, config, "train", sampler=other, splits=splits).normalizer
    assert torch.equal(refit.mean, fitted.mean) and torch.equal(refit.std, fitted.std)
    test_ids = splits["test"][:64]
    assert not np.array_equal(other.gather(test_ids)[0], sampler.gather(test_ids)[0])
