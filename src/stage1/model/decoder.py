"""TFDecoder: one per timeframe, latent steps back to exactly ``L`` bars of six features."""

from __future__ import annotations

import torch
from torch import nn

from stage1.data.features import N_FEATURES
from stage1.model.encoder import FeedForward

# Kernel of the refinement conv: the transposed conv decodes each latent step into `stride`
# bars independently, so a kernel of 3 is what lets neighbouring blocks agree at their seams.
REFINE_KERNEL = 3


class TFDecoder(nn.Module):
    """``ConvTranspose1d`` (kernel = stride) to ``L`` steps, a ConvNeXt-style residual
    refinement (depth-wise conv -> LayerNorm -> feed-forward), LayerNorm, Linear head to 6.

    The transposed conv uses ``padding = output_padding = latent_len * stride - L``: PyTorch then
    crops exactly that many steps from the left (older side) and none from the right, the exact
    inverse of the Bottleneck's left padding, so every output bar is decoded from the latent step
    that encoded it. No interpolation, no truncation of real steps.
    """

    def __init__(
        self, d_model: int, seq_len: int, latent_len: int, stride: int, ff_mult: int, dropout: float
    ) -> None:
        super().__init__()
        excess = latent_len * stride - seq_len
        if not 0 <= excess < stride:
            raise ValueError(
                f"latent_len {latent_len} x stride {stride} does not cover seq_len {seq_len}"
            )
        self.seq_len = seq_len
        self.upsample = nn.ConvTranspose1d(
            d_model,
            d_model,
            kernel_size=stride,
            stride=stride,
            padding=excess,
            output_padding=excess,
        )
        self.refine_conv = nn.Conv1d(
            d_model, d_model, REFINE_KERNEL, padding=REFINE_KERNEL // 2, groups=d_model
        )
        self.refine_norm = nn.LayerNorm(d_model)
        self.refine_ff = FeedForward(d_model, ff_mult, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, N_FEATURES)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent: ``[B, latent_len, d_model]`` -> ``[B, L, 6]``."""
        x = self.upsample(latent.transpose(1, 2))  # [B, d_model, L]
        assert x.shape[-1] == self.seq_len
        refined = self.refine_conv(x).transpose(1, 2)
        x = x.transpose(1, 2) + self.refine_ff(self.refine_norm(refined))
        return self.head(self.norm(x))
