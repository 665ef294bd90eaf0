"""Stage 1: self-supervised multi-timeframe encoder for FX OHLC bars.

The public names are imported lazily, so ``import stage1`` (and ``stage1 --help``) stays fast
and does not load PyTorch until a model or dataset is used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from stage1.config import load_config
from stage1.errors import CheckpointError, ConfigError, DataValidationError, Stage1Error

# The guide's MPI workaround, for every entry point: Lightning probes MPI at import, which fails
# on some hosts (WSL). Set here, before any stage1 module can import Lightning or torch.distributed.
for _var in ("PYTORCH_LIGHTNING_DISABLE_MPI", "OMPI_DISABLED", "I_MPI_DISABLED"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"

_LAZY = {
    "MultiTFWindowSampler": "stage1.data.sampler",
    "FeatureEngineer": "stage1.data.features",
    "TFNormalizer": "stage1.data.normalization",
    "MaskingStrategy": "stage1.data.masking",
    "Stage1Dataset": "stage1.data.dataset",
    "Stage1DataModule": "stage1.data.dataset",
    "Stage1Model": "stage1.model.model",
    "Stage1CombinedLoss": "stage1.losses",
    "Stage1LightningModule": "stage1.module",
    "Stage1InferenceEngine": "stage1.inference",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataValidationError",
    "Stage1Error",
    "__version__",
    "load_config",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stage1' has no attribute {name!r}")
