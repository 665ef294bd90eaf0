"""SharedEncoder: a pre-norm transformer over the tokens of every timeframe at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    With ``flash_attn=False`` the math kernel is forced (reference numerics, any device);
    otherwise PyTorch picks the fastest kernel available (flash / memory-efficient on GPU,
    fused flash on CPU). No dropout on the attention weights (as in ViT/MAE): it would
    materialise a ``[B, heads, T, T]`` random mask, which made a CPU training step 5x slower;
    the blocks regularise with dropout on their residual branches instead.
    """

    def __init__(self, d_model: int, n_heads: int, flash_attn: bool) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.flash_attn = flash_attn
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, T, d_model]`` -> ``[B, T, d_model]``."""
        batch, tokens, d_model = x.shape
        # [B, T, 3, H, Dh] -> three [B, H, T, Dh]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if self.flash_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, d_model))


class FeedForward(nn.Sequential):
    """``Linear(d, ff_mult * d) -> GELU -> Linear(ff_mult * d, d) -> Dropout``, on the last dim."""

    def __init__(self, d_model: int, ff_mult: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d_model, ff_mult * d_model),
            nn.GELU(),
            nn.Linear(ff_mult * d_model, d_model),
            nn.Dropout(dropout),
        )


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))`` then ``x + ff(LN(x))``."""

    def __init__(
        self, d_model: int, n_heads: int, ff_mult: int, dropout: float, flash_attn: bool
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, flash_attn)
        self.drop_attn = nn.Dropout(dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, ff_mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, T, d_model]`` -> same shape."""
        x = x + self.drop_attn(self.attn(self.norm_attn(x)))
        return x + self.ff(self.norm_ff(x))


class SharedEncoder(nn.Module):
    """Adds learned timeframe and position embeddings, then attends over all ``n_tf * L`` tokens.

    Every timeframe's bars see every other timeframe's bars, which is what lets a coarse bar
    inform a hidden fine span (and vice versa).
    """

    def __init__(
        self,
        n_tf: int,
        seq_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ff_mult: int,
        dropout: float,
        flash_attn: bool,
    ) -> None:
        super().__init__()
        self.tf_embedding = nn.Parameter(torch.randn(n_tf, d_model) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, ff_mult, dropout, flash_attn)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: ``[B, n_tf, L, d_model]`` -> ``[B, n_tf, L, d_model]``."""
        batch, n_tf, seq_len, d_model = tokens.shape
        x = tokens + self.tf_embedding[:, None, :] + self.pos_embedding[None, :, :]
        x = self.drop(x).reshape(batch, n_tf * seq_len, d_model)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).view(batch, n_tf, seq_len, d_model)
