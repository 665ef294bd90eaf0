"""Stage 1: self-supervised multi-timeframe encoder for FX OHLC bars."""

from stage1.config import load_config
from stage1.errors import CheckpointError, ConfigError, DataValidationError, Stage1Error

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataValidationError",
    "Stage1Error",
    "__version__",
    "load_config",
]
