"""Fixtures for the Stage 2 surfaces: a tiny exported checkpoint (test config, untrained model,
normaliser fitted on the synthetic train split) and the synthetic bars it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig

from stage1.checkpoint import export_checkpoint
from stage1.config import load_config
from stage1.data.dataset import Stage1Dataset
from stage1.data.io import load_tf_data
from stage1.inference import Stage1InferenceEngine
from stage1.model.model import Stage1Model

# The synthetic fixture is about 3 weeks: the test config's 64 h embargo needs wide splits.
SPLIT_OVERRIDES = ["data.train_frac=0.4", "data.val_frac=0.3"]


@pytest.fixture(scope="package")
def rl_config() -> DictConfig:
    return load_config("test", SPLIT_OVERRIDES)


@pytest.fixture(scope="package")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path, rl_config: DictConfig
) -> Path:
    torch.manual_seed(0)
    model = Stage1Model(rl_config).eval()
    normalizer = Stage1Dataset(synthetic_data_dir, rl_config, "train").normalizer
    path = tmp_path_factory.mktemp("rl_ckpt") / "stage1_best.pth"
    return export_checkpoint(path, model.state_dict(), rl_config, normalizer.to_dict(), 0, None)


@pytest.fixture(scope="package")
def engine(checkpoint: Path) -> Stage1InferenceEngine:
    return Stage1InferenceEngine(checkpoint, device="cpu")


@pytest.fixture(scope="package")
def frames(synthetic_data_dir: Path, rl_config: DictConfig) -> dict[str, pd.DataFrame]:
    return load_tf_data(synthetic_data_dir, rl_config.data.timeframes)


@pytest.fixture(scope="package")
def anchors(engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame]) -> pd.DatetimeIndex:
    return engine.build_sampler(frames).anchor_times


@pytest.fixture(scope="package")
def span(anchors: pd.DatetimeIndex) -> tuple[pd.Timestamp, pd.Timestamp]:
    """300 anchors either side of the first weekend in the second half of the data."""
    gaps = np.flatnonzero(np.diff(anchors.asi8) > pd.Timedelta(days=1).value)
    weekend = int(gaps[gaps > len(anchors) // 2][0])
    return anchors[weekend - 299], anchors[weekend + 300]


@pytest.fixture(scope="package")
def tol() -> dict[str, float]:
    """Embeddings computed in different batch compositions differ by float rounding only."""
    return {"rtol": 1e-5, "atol": 1e-6}
