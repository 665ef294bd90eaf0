"""TFSpecificStem: one per timeframe, lifts the six bar features to ``d_model``."""

from __future__ import annotations

import torch
from torch import nn

from stage1.data.features import N_FEATURES
from stage1.errors import ConfigError

# Temporal filters learned per input feature by the depth-wise conv; the point-wise projection
# then mixes these 6 * 4 filtered series into d_model channels.
FILTERS_PER_FEATURE = 4


class TFSpecificStem(nn.Module):
    """Depth-wise 1-D conv over time (each feature filtered on its own) + point-wise projection.

    ``[B, L, 6] -> [B, L, d_model]``; the output length equals the input length.
    """

    def __init__(self, d_model: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(
                f"model.stem.kernel_size: must be odd to keep the length, got {kernel_size}"
            )
        hidden = N_FEATURES * FILTERS_PER_FEATURE
        self.depthwise = nn.Conv1d(
            N_FEATURES, hidden, kernel_size, padding=kernel_size // 2, groups=N_FEATURES
        )
        self.pointwise = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, L, 6]`` -> ``[B, L, d_model]``."""
        filtered = self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        return self.pointwise(filtered)
