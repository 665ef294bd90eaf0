"""Bottleneck: strided convolution over time, ``L`` bars -> ``latent_len`` latent steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_latent_len(seq_len: int, stride: int) -> int:
    """``ceil(seq_len / stride)``: 48 -> 12 and 50 -> 13 with stride 4."""
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len ({seq_len}) and stride ({stride}) must both be >= 1")
    return -(-seq_len // stride)


class Bottleneck(nn.Module):
    """One strided ``Conv1d`` shared by all timeframes (the encoder's timeframe embedding already
    tells them apart), then LayerNorm so the latent that Stage 2 consumes is well scaled.

    The sequence is zero-padded on the LEFT (older side) to ``latent_len * stride``, so the newest
    bars always fill a whole latent step of their own.
    """

    def __init__(self, d_model: int, seq_len: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.latent_len = compute_latent_len(seq_len, stride)
        self.left_pad = self.latent_len * stride - seq_len
        assert 0 <= self.left_pad < stride, "latent_len must cover seq_len with < stride padding"
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, n_tf, L, d_model]`` -> ``[B, n_tf, latent_len, d_model]``.

        A convolution whose kernel equals its stride sees each group of ``stride`` bars once, so
        it is computed as one matrix product over the groups (no transposes, no im2col).
        """
        batch, n_tf, _, d_model = x.shape
        if self.left_pad:
            x = F.pad(x, (0, 0, self.left_pad, 0))
        groups = x.reshape(batch, n_tf, self.latent_len, self.stride * d_model)
        # conv weight [out, in, tap] -> [out, tap * in], matching the groups' (tap, in) layout
        weight = self.conv.weight.permute(0, 2, 1).reshape(d_model, self.stride * d_model)
        return self.norm(F.linear(groups, weight, self.conv.bias))
