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
        """x: ``[B, n_tf, L, d_model]`` -> ``[B, n_tf, latent_len, d_model]``."""
        batch, n_tf, seq_len, d_model = x.shape
        series = x.reshape(batch * n_tf, seq_len, d_model).transpose(1, 2)
        latent = self.conv(F.pad(series, (self.left_pad, 0)))
        assert latent.shape[-1] == self.latent_len
        return self.norm(latent.transpose(1, 2)).view(batch, n_tf, self.latent_len, d_model)
