"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent), and
small synthetic data directories built through the real code paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
REAL_M1 = SHARED_DATA / "usdjpy_m1_2017_2019.parquet"
SEED_LAYOUT = SHARED_DATA / "seed_layout"
TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): the
    test models' ops are too small to gain from a second thread, and on a busy 2-core machine
    OpenMP threads that spin-wait on each other make every op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data, or skip: a fresh clone has no ../shared (CI has it)."""
    if not REAL_M1.is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (absent outside CI/dev machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def seed_layout_dir(shared_data_dir: Path) -> Path:
    if not SEED_LAYOUT.is_dir():
        pytest.skip(f"seed layout not found at {SEED_LAYOUT}")
    return SEED_LAYOUT


@pytest.fixture(scope="session")
def real_data_dir(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full real USDJPY M1 file prepared into six timeframes by `stage1 prepare`'s code."""
    from stage1.data.prepare import prepare

    out = tmp_path_factory.mktemp("real") / "usdjpy"
    prepare(REAL_M1, out, tz="UTC", fmt="auto", timeframes=TIMEFRAMES)
    return out


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 3 weeks of synthetic M1 bars derived into six timeframes."""
    from stage1.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic_dataset(out, n_rows=30_000, timeframes=TIMEFRAMES, seed=0)
    return out
