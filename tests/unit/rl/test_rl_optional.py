"""The rl extra is optional: the core and the torch-only surfaces import without it."""

from __future__ import annotations

import subprocess
import sys

# Runs with gymnasium and stable_baselines3 made unimportable (None in sys.modules).
SCRIPT = """
import sys
sys.modules["gymnasium"] = None
sys.modules["stable_baselines3"] = None
import stage1, stage1.rl
from stage1.rl import EmbeddingStore, Stage1Encoder
try:
    stage1.rl.FXTradingEnv
except ModuleNotFoundError as exc:
    print("ERROR:", exc)
"""


def test_core_and_torch_surfaces_import_without_the_rl_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR: stage1.rl.FXTradingEnv needs gymnasium: pip install 'stage1[rl]'" in (
        result.stdout
    )


def test_import_stage1_loads_no_rl_library() -> None:
    code = "import stage1, stage1.cli, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('gymnasium', 'stable_baselines3')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
