"""Stage1Model: stems -> SharedEncoder -> Bottleneck -> decoders (see docs/ARCHITECTURE.md).

Around that core, two choices of ``config.model`` decide what the network sees and predicts:

* ``prior: agg`` fills hidden bars from VISIBLE bars only (:mod:`stage1.model.prior`): coarse
  bars with visible finer bars inside them by aggregating those (the evaluation's ``agg``
  baseline), every other hidden bar by the bar-aware bridge of its visible neighbours
  (``prior: bridge`` uses the bridge everywhere). The input shows the fill at hidden bars and the
  decoders predict a correction on top of it (their heads start at zero, so an untrained model
  IS the naive rule). ``prior: none`` gives hidden bars a learned embedding and predicts them
  from scratch. Without ``times`` (bar open times) ``agg`` cannot tell which finer bars lie
  inside a coarse bar and falls back to the bridge.
* ``window_scale: true`` expresses the price features of each window and timeframe relative to
  the newest visible base close, in units of that timeframe's mean visible bar range (RevIN-style,
  visible bars only), adds a hidden-flag channel and the log of that scale (relative to the
  train split's typical bar move), and scales the decoders' output back. Without it, the model
  sees the z-scored features.

Either way ``reconstructed`` is in z-scored (normaliser) units, like the targets, and
``encoded`` is the bottleneck output ``[B, n_tf, latent_len, d_model]``.
"""

from __future__ import annotations

import torch
from torch import nn

from stage1.config import ConfigLike, as_config
from stage1.data.features import BODY_RATIO, DELTA_CLOSE, N_FEATURES
from stage1.data.masking import mask_model_input
from stage1.data.timeframes import NS_PER_MINUTE, sort_timeframes, tf_ns
from stage1.errors import ConfigError
from stage1.model.bottleneck import Bottleneck, compute_latent_len
from stage1.model.decoder import TFDecoder
from stage1.model.encoder import SharedEncoder
from stage1.model.prior import agg_fill, bridge_fill, last_visible_close, visible_scale
from stage1.model.stem import TFSpecificStem, apply_stems

PRIORS = ("agg", "bridge", "none")
# Extra input channels with window_scale: hidden flag, log(scale / typical bar move).
N_SCALE_CHANNELS = 2
# Extra input channels with time_features: sin/cos of the time of day and of the day of the
# week of each bar's open, and its age (anchor - close) in window lengths of its timeframe.
N_TIME_CHANNELS = 5
MINUTES_PER_DAY = 1440
# How an encoding [B, n_tf, latent_len, d_model] becomes one vector per window (None: unchanged).
POOLS = (None, "mean", "last", "flatten")


def pool_embeddings(encoded: torch.Tensor, pool: str | None) -> torch.Tensor:
    """``encoded [B, n_tf, latent_len, d_model]`` → unchanged (``None``), ``[B, n_tf * d_model]``
    (``'mean'`` over latent steps or ``'last'``, the newest latent step; timeframes
    concatenated) or ``[B, n_tf * latent_len * d_model]`` (``'flatten'``)."""
    if pool is None:
        return encoded
    if pool == "mean":
        return encoded.mean(dim=2).flatten(1)
    if pool == "last":
        return encoded[:, :, -1].flatten(1)
    if pool == "flatten":
        return encoded.flatten(1)
    raise ConfigError(f"pool: {pool!r} is not one of {POOLS}")


class Stage1Model(nn.Module):
    """Masked multi-timeframe autoencoder.

    ``forward(x [B, n_tf, L, 6], masks bool [B, n_tf, L] | None)`` ->
    ``{'reconstructed': [B, n_tf, L, 6], 'encoded': [B, n_tf, latent_len, d_model]}``. With
    ``model.forecast_horizons``, :meth:`forecast` reads a full window's ``encoded``.
    Sizes come from ``config.model`` and ``config.data.{timeframes, seq_len}``. With
    ``window_scale`` the output also holds ``'scale'`` ``[B, n_tf, L]`` (raw log units): per bar,
    the visible bar scale of the timeframe its fill came from, the unit of its correction and of
    its loss.

    ``norm_mean``/``norm_std`` (buffers ``[n_tf, 6]``, part of the state dict) are the
    normaliser's statistics, set with :meth:`set_normalizer`; the prior and the window scale work
    in raw feature space.
    """

    norm_mean: torch.Tensor
    norm_std: torch.Tensor
    tf_durations_ns: torch.Tensor
    forecast_log_sqrt_h: torch.Tensor

    def __init__(self, config: ConfigLike) -> None:
        super().__init__()
        config = as_config(config)
        model_cfg, enc_cfg = config.model, config.model.encoder
        self.n_tf = len(config.data.timeframes)
        self.seq_len = int(config.data.seq_len)
        self.d_model = int(model_cfg.d_model)
        stride = int(model_cfg.bottleneck.stride)
        if stride < 1:
            raise ConfigError(f"model.bottleneck.stride: must be >= 1, got {stride}")
        self.latent_len = compute_latent_len(self.seq_len, stride)
        self.prior = str(model_cfg.prior)
        if self.prior not in PRIORS:
            raise ConfigError(f"model.prior: {self.prior!r} is not one of {list(PRIORS)}")
        self.window_scale = bool(model_cfg.window_scale)
        self.durations_ns = [tf_ns(tf) for tf in sort_timeframes(list(config.data.timeframes))]
        self.time_features = bool(model_cfg.time_features)
        in_features = (
            N_FEATURES
            + (N_SCALE_CHANNELS if self.window_scale else 0)
            + (N_TIME_CHANNELS if self.time_features else 0)
        )
        self.register_buffer("norm_mean", torch.zeros(self.n_tf, N_FEATURES))
        self.register_buffer("norm_std", torch.ones(self.n_tf, N_FEATURES))
        # On the model's device once (not a host list per batch); not part of the state dict.
        self.register_buffer(
            "tf_durations_ns", torch.tensor(self.durations_ns)[None, :, None], persistent=False
        )

        # Added to hidden bars (per timeframe, in the 6-feature input space) after their values
        # are replaced by the prior's fill (or by 0), so no layer sees a hidden bar's real values.
        self.mask_embedding = nn.Parameter(torch.zeros(self.n_tf, N_FEATURES))
        self.stems = nn.ModuleList(
            TFSpecificStem(self.d_model, int(model_cfg.stem.kernel_size), in_features)
            for _ in range(self.n_tf)
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
        # Forecast head: the pooled embedding (mean over latent steps, timeframes side by side,
        # what `encode(pool='mean')` serves) -> log realised volatility of the next h base bars.
        self.forecast_horizons = [int(h) for h in model_cfg.forecast_horizons]
        if any(h < 1 for h in self.forecast_horizons):
            raise ConfigError(
                f"model.forecast_horizons: base bars, each >= 1, got {self.forecast_horizons}"
            )
        self.forecast_head = (
            nn.Linear(self.n_tf * self.d_model, len(self.forecast_horizons))
            if self.forecast_horizons
            else None
        )
        if self.forecast_head is not None:  # starts at the typical window's volatility
            nn.init.zeros_(self.forecast_head.weight)
            nn.init.zeros_(self.forecast_head.bias)
        # log sqrt(h): a horizon of h bars of typical move has log vol log(std) + log sqrt(h).
        self.register_buffer(
            "forecast_log_sqrt_h",
            0.5 * torch.log(torch.tensor(self.forecast_horizons or [1], dtype=torch.float32)),
            persistent=False,
        )
        if self.prior != "none":
            # An untrained model reproduces the prior exactly; training learns the correction.
            for decoder in self.decoders:
                assert isinstance(decoder, TFDecoder)  # ModuleList items are typed Module
                nn.init.zeros_(decoder.head.weight)
                nn.init.zeros_(decoder.head.bias)

    @torch.no_grad()
    def set_normalizer(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the normaliser's ``mean``/``std`` ``[n_tf, 6]`` (train split) in the model."""
        for buffer, value in ((self.norm_mean, mean), (self.norm_std, std)):
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.shape != buffer.shape:
                raise ValueError(
                    f"normaliser statistics: expected shape {tuple(buffer.shape)}, "
                    f"got {tuple(value.shape)}"
                )
            buffer.copy_(value)

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

    def _prepare(
        self, x: torch.Tensor, masks: torch.Tensor | None, times: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Model input ``[B, n_tf, L, C]`` and what the output side needs (fill, scale)."""
        self._check_input(x, masks)
        if times is not None and times.shape != x.shape[:-1]:
            raise ValueError(
                f"Stage1Model input: times must be {tuple(x.shape[:-1])}, got {tuple(times.shape)}"
            )
        nothing_hidden = masks is None  # encoding for inference: no fill to compute
        if masks is None:
            masks = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        visible = mask_model_input(x, masks)
        mean = self.norm_mean[:, None, :].to(x.dtype)
        std = self.norm_std[:, None, :].to(x.dtype)
        raw = visible * std + mean
        source = None  # timeframe each hidden bar's fill was built from (agg prior)
        if nothing_hidden:
            fill = raw
        elif self.prior == "agg" and times is not None:
            fill, source = agg_fill(raw, masks, times, self.durations_ns)
        elif self.prior != "none":
            fill = bridge_fill(raw, masks)
        else:
            fill = raw
        extra: dict[str, torch.Tensor] = {"fill": fill}
        hidden = masks.unsqueeze(-1)
        if self.window_scale:
            scale = visible_scale(raw, masks)  # [B, n_tf]
            centre = last_visible_close(raw, masks)[:, None, None, None]
            unit = scale[..., None, None]
            # The correction of a bar is in units of the bars its fill was built from: a coarse
            # bar aggregated from visible m15 bars errs on the m15 scale, not on its own.
            bar_unit = scale[..., None].expand_as(masks)
            if source is not None:
                bar_unit = scale.gather(1, source.flatten(1)).view_as(masks)
            extra["bar_unit"] = bar_unit
            inputs = torch.cat(
                [
                    (fill[..., :DELTA_CLOSE] - centre) / unit,
                    fill[..., DELTA_CLOSE : DELTA_CLOSE + 1] / unit,
                    fill[..., BODY_RATIO:],
                ],
                dim=-1,
            )
            extra |= {"scale": scale, "centre": centre}
        else:
            inputs = (fill - mean) / std
        if self.prior == "none":
            inputs = inputs.masked_fill(hidden, 0.0)
        inputs = torch.where(hidden, inputs + self.mask_embedding[:, None, :].to(x.dtype), inputs)
        if self.window_scale:
            typical = self.norm_std[:, DELTA_CLOSE].to(x.dtype)  # train std of one bar's move
            log_scale = torch.log(extra["scale"] / typical)[..., None, None]
            inputs = torch.cat(
                [inputs, hidden.to(x.dtype), log_scale.expand(*inputs.shape[:-1], 1)], dim=-1
            )
        if self.time_features:
            if times is None:
                raise ValueError(
                    "Stage1Model input: this model has model.time_features=true and needs "
                    "times (bar open times, int64 ns [B, n_tf, L])"
                )
            inputs = torch.cat([inputs, self._time_channels(times).to(x.dtype)], dim=-1)
        return inputs, extra

    def _time_channels(self, times: torch.Tensor) -> torch.Tensor:
        """``[B, n_tf, L, 5]`` from open times only (known for hidden bars too): time of day and
        day of week as points on the circle, and each bar's age before the window's anchor."""
        minutes = torch.div(times, NS_PER_MINUTE, rounding_mode="floor")  # exact in int64
        minute_of_day = torch.remainder(minutes, MINUTES_PER_DAY).float()
        # 1970-01-01 was a Thursday: +3 days puts Monday 00:00 at phase 0.
        minute_of_week = torch.remainder(minutes + 3 * MINUTES_PER_DAY, 7 * MINUTES_PER_DAY)
        day = minute_of_day * (2 * torch.pi / MINUTES_PER_DAY)
        week = minute_of_week.float() * (2 * torch.pi / (7 * MINUTES_PER_DAY))
        durations = self.tf_durations_ns  # [1, n_tf, 1]
        anchor = times[:, :1, -1:] + durations[:, :1]
        age = (anchor - times - durations).float() / (durations * self.seq_len).float()
        return torch.stack([day.sin(), day.cos(), week.sin(), week.cos(), age], dim=-1)

    def encode(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, times: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder half of :meth:`forward`: ``x [B, n_tf, L, 6]`` ->
        ``encoded [B, n_tf, latent_len, d_model]``. Inference calls this alone (no decoders)."""
        inputs, _ = self._prepare(x, masks, times)
        return self.bottleneck(self.encoder(apply_stems(self.stems, inputs)))

    def forecast(self, encoded: torch.Tensor) -> torch.Tensor:
        """Predicted log realised volatility of the next ``model.forecast_horizons`` base bars,
        float32 ``[B, H]``, from ``encoded``'s mean over latent steps (training passes the
        encoding of the unmasked window: the embedding Stage 2 is served). Relative to a window
        of typical moves (the train split's std of one base bar's ``delta_close``)."""
        assert self.forecast_head is not None
        pooled = pool_embeddings(encoded, "mean")
        typical = torch.log(self.norm_std[0, DELTA_CLOSE])
        return self.forecast_head(pooled).float() + typical + self.forecast_log_sqrt_h

    def forward(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, times: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """x: ``[B, n_tf, L, 6]`` normalised features; masks: bool ``[B, n_tf, L]``, True = hidden;
        times: int64 ``[B, n_tf, L]`` bar open times (ns), for the ``agg`` prior."""
        inputs, extra = self._prepare(x, masks, times)
        encoded = self.bottleneck(self.encoder(apply_stems(self.stems, inputs)))
        delta = torch.stack(
            [decoder(encoded[:, k]) for k, decoder in enumerate(self.decoders)], dim=1
        )
        out = {"encoded": encoded}
        # Prior + correction in the input's precision (fp32) even when the network ran in
        # bf16/fp16 under autocast: a pip is ~1e-6 of the price, below half precision's step.
        delta = delta.to(x.dtype)
        mean = self.norm_mean[:, None, :].to(x.dtype)
        std = self.norm_std[:, None, :].to(x.dtype)
        if self.window_scale:
            unit = extra["bar_unit"][..., None]
            if self.prior == "none":
                base = torch.cat(
                    [extra["centre"].expand_as(delta[..., :DELTA_CLOSE]),
                     torch.zeros_like(delta[..., DELTA_CLOSE:])],
                    dim=-1,
                )  # fmt: skip
            else:
                base = extra["fill"]
            raw = torch.cat(
                [base[..., :BODY_RATIO] + delta[..., :BODY_RATIO] * unit,
                 base[..., BODY_RATIO:] + delta[..., BODY_RATIO:]],
                dim=-1,
            )  # fmt: skip
            out["reconstructed"] = (raw - mean) / std
            out["scale"] = extra["bar_unit"]
        elif self.prior == "none":
            out["reconstructed"] = delta
        else:
            out["reconstructed"] = (extra["fill"] - mean) / std + delta
        return out
