"""Stage1Model: stems -> SharedEncoder -> Bottleneck -> decoders (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from stage1.data.features import N_FEATURES
from stage1.data.masking import mask_model_input
from stage1.errors import ConfigError
from stage1.model.bottleneck import Bottleneck, compute_latent_len
from stage1.model.decoder import TFDecoder
from stage1.model.encoder import SharedEncoder
from stage1.model.stem import TFSpecificStem, apply_stems


class Stage1Model(nn.Module):
    """Masked multi-timeframe autoencoder.

    ``forward(x [B, n_tf, L, 6], masks bool [B, n_tf, L] | None)`` ->
    ``{'reconstructed': [B, n_tf, L, 6], 'encoded': [B, n_tf, latent_len, d_model]}``.
    Sizes come from ``config.model`` and ``config.data.{timeframes, seq_len}``.
    """

    def __init__(self, config: DictConfig) -> None:
        super().__init__()
        model_cfg, enc_cfg = config.model, config.model.encoder
        self.n_tf = len(config.data.timeframes)
        self.seq_len = int(config.data.seq_len)
        self.d_model = int(model_cfg.d_model)
        stride = int(model_cfg.bottleneck.stride)
        if stride < 1:
            raise ConfigError(f"model.bottleneck.stride: must be >= 1, got {stride}")
        self.latent_len = compute_latent_len(self.seq_len, stride)

        # Hidden bars are replaced by this learned value (per timeframe, in the 6-feature input
        # space) before the stem, so no layer ever sees a hidden bar's real values.
        self.mask_embedding = nn.Parameter(torch.zeros(self.n_tf, N_FEATURES))
        self.stems = nn.ModuleList(
            TFSpecificStem(self.d_model, int(model_cfg.stem.kernel_size)) for _ in range(self.n_tf)
        )
        self.encoder = SharedEncoder(
            n_tf=self.n_tf,
            seq_len=self.seq_len,
            d_model=self.d_model,
            n_layers=int(enc_cfg.n_layers),
            n_heads=int(enc_cfg.n_heads),
            ff_mult=int(enc_cfg.ff_mult),
            dropout=float(enc_cfg.dropout),
            flash_attn=bool(enc_cfg.flash_attn),
        )
        self.bottleneck = Bottleneck(self.d_model, self.seq_len, stride)
        assert self.bottleneck.latent_len == self.latent_len
        self.decoders = nn.ModuleList(
            TFDecoder(
                self.d_model,
                self.seq_len,
                self.latent_len,
                stride,
                int(enc_cfg.ff_mult),
                float(enc_cfg.dropout),
            )
            for _ in range(self.n_tf)
        )

    def _check_input(self, x: torch.Tensor, masks: torch.Tensor | None) -> None:
        expected = f"[B, {self.n_tf}, {self.seq_len}, {N_FEATURES}]"
        if x.ndim != 4 or x.shape[1:] != (self.n_tf, self.seq_len, N_FEATURES):
            raise ValueError(
                f"Stage1Model input: expected x of shape {expected}, got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"Stage1Model input: empty batch, x has shape {tuple(x.shape)}")
        if masks is not None and (masks.dtype != torch.bool or masks.shape != x.shape[:-1]):
            raise ValueError(
                f"Stage1Model input: masks must be bool {tuple(x.shape[:-1])}, "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )

    def encode(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder half of :meth:`forward`: ``x [B, n_tf, L, 6]`` ->
        ``encoded [B, n_tf, latent_len, d_model]``. Inference calls this alone (no decoders)."""
        self._check_input(x, masks)
        if masks is not None:
            x = mask_model_input(x, masks)
            x = torch.where(masks.unsqueeze(-1), self.mask_embedding[:, None, :].to(x.dtype), x)
        return self.bottleneck(self.encoder(apply_stems(self.stems, x)))

    def forward(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """x: ``[B, n_tf, L, 6]`` normalised features; masks: bool ``[B, n_tf, L]``, True = hidden."""
        encoded = self.encode(x, masks)
        reconstructed = torch.stack(
            [decoder(encoded[:, k]) for k, decoder in enumerate(self.decoders)], dim=1
        )
        return {"reconstructed": reconstructed, "encoded": encoded}
