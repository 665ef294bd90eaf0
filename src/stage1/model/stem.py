"""TFSpecificStem: one per timeframe, lifts the six bar features to ``d_model``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from stage1.data.features import N_FEATURES
from stage1.errors import ConfigError

# Temporal filters learned per input feature by the depth-wise conv; the point-wise projection
# then mixes these 6 * 4 filtered series into d_model channels.
FILTERS_PER_FEATURE = 4


class TFSpecificStem(nn.Module):
    """Depth-wise 1-D conv over time (each feature filtered on its own) + point-wise projection.

    ``[B, L, 6] -> [B, L, d_model]``; the output length equals the input length.

    The two steps are linear with nothing between them, so they are computed as ONE dense
    convolution whose kernel is their composition (:meth:`fused`): same function and the same
    parameters (and checkpoint keys), a fraction of the work. :func:`apply_stems` runs the stems
    of every timeframe in a single grouped convolution.
    """

    def __init__(self, d_model: int, kernel_size: int = 3, in_features: int = N_FEATURES) -> None:
        super().__init__()
        self.in_features = in_features
        if kernel_size % 2 != 1:
            raise ConfigError(
                f"model.stem.kernel_size: must be odd to keep the length, got {kernel_size}"
            )
        hidden = in_features * FILTERS_PER_FEATURE
        self.depthwise = nn.Conv1d(
            in_features, hidden, kernel_size, padding=kernel_size // 2, groups=in_features
        )
        self.pointwise = nn.Linear(hidden, d_model)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel ``[d_model, in_features, kernel_size]`` and bias ``[d_model]`` of pointwise ∘ depthwise.

        Depth-wise output channel ``c * 4 + f`` filters input feature ``c``, so
        ``W[o, c, j] = sum_f P[o, c*4+f] * D[c*4+f, j]`` and ``b = P @ d_bias + p_bias``.
        """
        d_model = self.pointwise.out_features
        depthwise = self.depthwise.weight.view(self.in_features, FILTERS_PER_FEATURE, -1)
        pointwise = self.pointwise.weight.view(d_model, self.in_features, FILTERS_PER_FEATURE)
        weight = torch.einsum("ocf,cfj->ocj", pointwise, depthwise)
        assert self.depthwise.bias is not None
        bias = torch.addmv(self.pointwise.bias, self.pointwise.weight, self.depthwise.bias)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, L, in_features]`` -> ``[B, L, d_model]``."""
        return apply_stems([self], x.unsqueeze(1)).squeeze(1)


def apply_stems(stems: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Stem ``k`` applied to timeframe ``k``, all at once: ``[B, n_tf, L, C] -> [B, n_tf, L, d]``."""
    batch, n_tf, seq_len, n_features = x.shape
    weights, biases = [], []
    for stem in stems:
        if not isinstance(stem, TFSpecificStem):
            raise TypeError(f"apply_stems: expected TFSpecificStem, got {type(stem).__name__}")
        weight, bias = stem.fused()
        weights.append(weight)
        biases.append(bias)
    weight = torch.cat(weights).to(x.dtype)
    out = F.conv1d(
        x.transpose(2, 3).reshape(batch, n_tf * n_features, seq_len),
        weight,
        torch.cat(biases).to(x.dtype),
        padding=weight.shape[-1] // 2,
        groups=n_tf,
    )
    return out.view(batch, n_tf, -1, seq_len).transpose(2, 3)
