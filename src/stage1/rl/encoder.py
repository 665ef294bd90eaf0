"""Stage1Encoder: the trained encoder as an ``nn.Module`` an RL policy can hold.

Raw OHLC windows go in, pooled embeddings come out; the checkpoint's feature engineering and
normaliser run inside, through the inference engine's own code (``window_features``,
``Stage1Model.encode``, ``pool_embeddings``), so a window gets exactly the embedding
``Stage1InferenceEngine.encode`` gives its anchor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from stage1.errors import ConfigError
from stage1.inference import Stage1InferenceEngine, pool_embeddings

ENCODER_POOLS = ("mean", "last", "flatten")


class Stage1Encoder(nn.Module):
    """``forward(ohlc [B, n_tf, seq_len, 4] float64 prices, times=None) -> [B, dim]`` float32.

    ``ohlc`` holds the window's bars per timeframe (finest first, oldest → newest), as
    ``MultiTFWindowSampler.gather`` returns them; prices may be divided by any positive
    constant per window (features are log prices relative to the window's first open, so the
    embedding does not change beyond float rounding). ``times`` (bar open times, int64 ns
    ``[B, n_tf, seq_len]``, as ``gather`` returns them) is needed only by a checkpoint trained
    with ``model.time_features``.

    Frozen (the default): parameters have ``requires_grad=False``, the model stays in eval mode
    whatever ``train()`` is called with (no dropout inside an RL policy's training mode), and
    ``forward`` runs without autograd. Unfrozen: an ordinary trainable module.
    """

    def __init__(self, engine: Stage1InferenceEngine, pool: str = "mean", freeze: bool = True):
        super().__init__()
        if pool not in ENCODER_POOLS:
            raise ConfigError(f"pool: {pool!r} is not one of {ENCODER_POOLS}")
        self.engine = engine
        self.model = engine.model
        self.pool = pool
        self.frozen = bool(freeze)
        self.dim = int(engine.embedding_shape(pool)[0])
        self.timeframes = list(engine.timeframes)
        self.seq_len = engine.seq_len
        if self.frozen:
            self.model.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        pool: str = "mean",
        freeze: bool = True,
        device: str | torch.device | None = None,
    ) -> Stage1Encoder:
        """Load model, config and normaliser from one checkpoint (see ``stage1.checkpoint``);
        ``device`` None: CUDA if available."""
        if pool not in ENCODER_POOLS:
            raise ConfigError(f"pool: {pool!r} is not one of {ENCODER_POOLS}")
        return cls(Stage1InferenceEngine(path, device=device), pool=pool, freeze=freeze)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(n_tf, seq_len, 4)``: one window of OHLC bars."""
        return (len(self.timeframes), self.seq_len, 4)

    def train(self, mode: bool = True) -> Stage1Encoder:
        """As ``nn.Module.train``, except that a frozen encoder's model stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(
        self,
        ohlc: torch.Tensor | npt.NDArray[np.float64],
        times: torch.Tensor | npt.NDArray[np.int64] | None = None,
    ) -> torch.Tensor:
        shape = tuple(ohlc.shape)
        if len(shape) != 4 or shape[1:] != self.input_shape:
            raise ValueError(
                f"ohlc: expected [B, {', '.join(map(str, self.input_shape))}] "
                f"(batch, timeframes {self.timeframes}, seq_len, open/high/low/close), got {shape}"
            )
        device = next(self.model.parameters()).device
        if isinstance(ohlc, torch.Tensor):
            out_device = ohlc.device
            ohlc = ohlc.detach().to("cpu", torch.float64)  # features are computed in float64
        else:
            out_device = device
        features = self.engine.window_features(ohlc).to(device)
        bar_times = None if times is None else torch.as_tensor(times, device=device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            embedding = pool_embeddings(self.model.encode(features, times=bar_times), self.pool)
        return embedding.to(out_device)
