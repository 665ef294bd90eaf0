"""Stage1CombinedLoss and its four parts: masked Huber, multi-resolution STFT, cross-timeframe
consistency and amplitude/phase correlation.

All inputs are normalised features ``[B, n_tf, L, 6]`` (z-scored per timeframe and feature by
TFNormalizer). The Huber term scores hidden bars only, in units of each window's visible bar
scale when the model gives one (``model.window_scale``); the three whole-sequence terms score the
COMPOSITE series (truth at visible bars, reconstruction at hidden ones) against the truth, so
they judge what the model adds at hidden bars and never pull it towards redrawing visible ones. Every part is computed in fp32 with autocast disabled, whatever precision the
model ran in: FFTs in half precision are inaccurate (and unsupported for most sizes on CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stage1.config import ConfigLike, as_config
from stage1.data.features import BODY_RATIO, CLOSE, HIGH, LOW, N_FEATURES, OPEN
from stage1.data.timeframes import sort_timeframes, tf_ns

# Floor of squared magnitudes before the square root: keeps sqrt's gradient finite at zero.
_POWER_EPS = 1e-8
# Floor of norms in denominators.
_NORM_EPS = 1e-6
N_PRICE_FEATURES = 4  # open, high, low, close: the features that aggregate across timeframes


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


def _magnitude(real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """|real + i imag|, with a floor so the gradient stays finite."""
    return torch.sqrt(torch.clamp(real.square() + imag.square(), min=_POWER_EPS))


class HuberLoss(nn.Module):
    """Huber loss averaged over hidden elements; visible ones weigh ``unmasked_weight`` (0 = ignored).

    Returns 0 (with a graph) when nothing carries weight, e.g. a batch without hidden bars.
    """

    def __init__(self, delta: float = 1.0, unmasked_weight: float = 0.0) -> None:
        super().__init__()
        self.delta = delta
        self.unmasked_weight = unmasked_weight

    def forward(
        self,
        reconstructed: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        unit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """reconstructed, targets: ``[B, n_tf, L, 6]``; masks: bool ``[B, n_tf, L]``; ``unit``
        (optional, broadcastable to the inputs): errors are divided by it before the Huber."""
        error = _fp32(reconstructed) - _fp32(targets)
        if unit is not None:
            error = error / unit
        per_element = F.huber_loss(
            error, torch.zeros_like(error), reduction="none", delta=self.delta
        )
        weights = torch.where(masks, 1.0, self.unmasked_weight).to(per_element.dtype)
        total_weight = weights.sum() * per_element.shape[-1]
        return (per_element * weights.unsqueeze(-1)).sum() / total_weight.clamp(min=1.0)


class STFTLoss(nn.Module):
    """Multi-resolution STFT loss (ParallelWaveGAN / auraloss): for each FFT size, spectral
    convergence ``||S_t - S_r||_F / ||S_t||_F`` plus mean ``|log S_t - log S_r|``; averaged over
    sizes. Applied to every (timeframe, feature) series along time. Sizes larger than ``L`` are
    skipped; hop = size // 4. The STFT is ``torch.stft``'s (Hann window, centred, reflect
    padding) computed as one real matmul per size against a precomputed windowed DFT basis (a
    buffer: it follows ``.to(device)``): for these short series that is as cheap as an FFT,
    runs in float32 under any autocast and compiles without a graph break (``torch.stft``
    with complex outputs does not). On CUDA it is a float32 matmul like the model's own, so
    ``torch.set_float32_matmul_precision('high')`` lets it use TF32.
    """

    def __init__(self, fft_sizes: Sequence[int]) -> None:
        super().__init__()
        if not fft_sizes or any(int(n) < 2 for n in fft_sizes):
            raise ValueError(f"loss.stft_fft_sizes: need sizes >= 2, got {list(fft_sizes)}")
        self.fft_sizes = sorted(int(n) for n in fft_sizes)
        for n_fft in self.fft_sizes:
            self.register_buffer(f"basis_{n_fft}", dft_basis(n_fft), persistent=False)

    def forward(self, reconstructed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """reconstructed, targets: ``[B, n_tf, L, 6]`` -> scalar fp32."""
        seq_len = reconstructed.shape[-2]
        with torch.autocast(reconstructed.device.type, enabled=False):
            # [B, n_tf, L, 6] -> [B * n_tf * 6, L]: one series per (window, timeframe, feature)
            rec = _fp32(reconstructed).transpose(-1, -2).reshape(-1, seq_len)
            tgt = _fp32(targets).transpose(-1, -2).reshape(-1, seq_len)
            losses = []
            for n_fft in self.fft_sizes:
                if n_fft > seq_len:
                    continue
                rec_mag = self._spectrum(rec, n_fft)
                tgt_mag = self._spectrum(tgt, n_fft)
                convergence = torch.linalg.vector_norm(
                    tgt_mag - rec_mag
                ) / torch.linalg.vector_norm(tgt_mag).clamp(min=_NORM_EPS)
                log_magnitude = (tgt_mag.log() - rec_mag.log()).abs().mean()
                losses.append(convergence + log_magnitude)
            if not losses:
                return rec.sum() * 0.0
            return torch.stack(losses).mean()

    def _spectrum(self, series: torch.Tensor, n_fft: int) -> torch.Tensor:
        """series ``[N, L]`` -> magnitudes ``[N, frames, n_fft // 2 + 1]`` (``|torch.stft|``
        transposed)."""
        pad = n_fft // 2
        padded = F.pad(series[:, None, :], (pad, pad), mode="reflect")[:, 0]
        frames = padded.unfold(-1, n_fft, max(n_fft // 4, 1))  # [N, frames, n_fft]
        spec = frames @ getattr(self, f"basis_{n_fft}")  # [N, frames, 2 * n_freq]: re | im
        real, imag = spec.chunk(2, dim=-1)
        return _magnitude(real, imag)


def dft_basis(n_fft: int) -> torch.Tensor:
    """Hann-windowed real DFT basis ``[n_fft, 2 * (n_fft // 2 + 1)]`` float32: ``frames @
    basis`` gives the real parts, then the imaginary parts, of each frame's one-sided DFT."""
    n = torch.arange(n_fft, dtype=torch.float64)
    freq = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * n[:, None] * freq[None, :] / n_fft
    window = torch.hann_window(n_fft, dtype=torch.float64)[:, None]
    return torch.cat([window * angle.cos(), -window * angle.sin()], dim=1).float()


class CrossTFConsistencyLoss(nn.Module):
    """Base-timeframe bars reconstructed inside the window, aggregated to each coarser timeframe's
    real bars (open = first, high = max, low = min, close = last, in ``log(price / ref)`` space),
    against that timeframe's reconstructed bar, in units of its std.

    A coarser bar counts only if the base window covers it entirely: it opens at or after the
    base window's first open and closes no later than the base window's last close. The bar
    boundaries come from ``times`` (bar open times, int64 ns), so gaps (weekends, missing
    minutes) are handled: a base bar belongs to the coarser bar whose ``[open, open + duration)``
    contains its open time.
    """

    norm_mean: torch.Tensor  # [n_tf, 6] buffers
    norm_std: torch.Tensor

    def __init__(
        self,
        timeframes: Sequence[str],
        norm_mean: torch.Tensor | None = None,
        norm_std: torch.Tensor | None = None,
        delta: float = 1.0,
    ) -> None:
        super().__init__()
        n_tf = len(timeframes)
        self.durations_ns = [tf_ns(tf) for tf in timeframes]
        self.delta = delta
        mean = torch.zeros(n_tf, N_FEATURES) if norm_mean is None else norm_mean
        std = torch.ones(n_tf, N_FEATURES) if norm_std is None else norm_std
        for name, stat in (("norm_mean", mean), ("norm_std", std)):
            stat = torch.as_tensor(stat, dtype=torch.float32)
            if stat.shape != (n_tf, N_FEATURES):
                raise ValueError(
                    f"{name}: expected shape ({n_tf}, {N_FEATURES}), got {tuple(stat.shape)}"
                )
            # Not persistent: the normaliser's statistics are saved by their owner, not twice.
            self.register_buffer(name, stat.clone(), persistent=False)

    def forward(self, reconstructed: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """reconstructed: ``[B, n_tf, L, 6]`` normalised; times: int64 ``[B, n_tf, L]`` open times."""
        batch, n_tf, seq_len, _ = reconstructed.shape
        mean = self.norm_mean[:, None, :N_PRICE_FEATURES]
        std = self.norm_std[:, None, :N_PRICE_FEATURES]
        # log(price / ref) of open/high/low/close: the space where timeframes aggregate exactly
        prices = _fp32(reconstructed)[..., :N_PRICE_FEATURES] * std + mean  # [B, n_tf, L, 4]
        base_open = times[:, 0].contiguous()  # [B, L]
        window_first_open = base_open[:, :1]
        window_close = base_open[:, -1:] + self.durations_ns[0]
        positions = torch.arange(seq_len, device=times.device).expand(batch, seq_len)
        total = prices.new_zeros(())
        n_covered = prices.new_zeros(())
        for k in range(1, n_tf):
            open_k = times[:, k].contiguous()  # [B, L]
            duration_k = self.durations_ns[k]
            # Coarse bar containing each base bar; bin `seq_len` collects base bars outside any
            # coarse bar of the window (older than its first, or after its newest complete bar).
            owner = torch.searchsorted(open_k, base_open, right=True) - 1
            owner_clamped = owner.clamp(min=0)
            inside = (owner >= 0) & (base_open < open_k.gather(1, owner_clamped) + duration_k)
            bins = torch.where(inside, owner_clamped, seq_len)
            counts = torch.zeros(batch, seq_len + 1, device=times.device, dtype=torch.long)
            counts = counts.scatter_add(1, bins, torch.ones_like(bins))[:, :seq_len]
            covered = (
                (open_k >= window_first_open) & (open_k + duration_k <= window_close) & (counts > 0)
            )
            first = self._reduce_positions(bins, positions, "amin", fill=seq_len).clamp(
                max=seq_len - 1
            )
            last = self._reduce_positions(bins, positions, "amax", fill=0)
            base = prices[:, 0]  # [B, L, 4]
            aggregated = torch.stack(
                [
                    base[..., OPEN].gather(1, first),
                    self._reduce_values(bins, base[..., HIGH], "amax"),
                    self._reduce_values(bins, base[..., LOW], "amin"),
                    base[..., CLOSE].gather(1, last),
                ],
                dim=-1,
            )  # [B, L, 4]: one aggregate per coarse bar
            scaled_error = (aggregated - prices[:, k]) / self.norm_std[k, :N_PRICE_FEATURES]
            per_bar = F.huber_loss(
                scaled_error, torch.zeros_like(scaled_error), reduction="none", delta=self.delta
            ).mean(-1)
            total = total + (per_bar * covered).sum()
            n_covered = n_covered + covered.sum()
        # Zero with a graph when no coarse bar is covered (e.g. a single timeframe).
        return (total + prices.sum() * 0.0) / n_covered.clamp(min=1.0)

    @staticmethod
    def _reduce_positions(
        bins: torch.Tensor, positions: torch.Tensor, reduce: str, fill: int
    ) -> torch.Tensor:
        """First (``amin``) or last (``amax``) base position in each coarse bar: ``[B, L]``."""
        batch, seq_len = bins.shape
        out = torch.full((batch, seq_len + 1), fill, dtype=positions.dtype, device=bins.device)
        return out.scatter_reduce(1, bins, positions, reduce, include_self=True)[:, :seq_len]

    @staticmethod
    def _reduce_values(bins: torch.Tensor, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """Differentiable max/min of base values per coarse bar: ``[B, L]`` (0 for empty bars)."""
        batch, seq_len = bins.shape
        out = values.new_zeros(batch, seq_len + 1)
        return out.scatter_reduce(1, bins, values, reduce, include_self=False)[:, :seq_len]


class AmplitudePhaseCorrelationLoss(nn.Module):
    """Spectral shape along time, per (window, timeframe, feature) series, batched:
    ``0.5 * (1 - Pearson(|R|, |T|)) + 0.5 * (1 - phase coherence)``.

    The Pearson correlation of FFT amplitudes skips the DC bin (the level, which Huber already
    covers). Phase coherence is the amplitude-weighted mean of ``cos(phase_R - phase_T)``,
    ``sum Re(R conj T) / sum |R||T|``, so noisy phases of near-empty bins weigh little. Series
    whose target has a flat amplitude spectrum (correlation undefined) are left out.
    """

    def forward(self, reconstructed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """reconstructed, targets: ``[B, n_tf, L, 6]`` -> scalar fp32."""
        with torch.autocast(reconstructed.device.type, enabled=False):
            rec_spec = torch.fft.rfft(_fp32(reconstructed).transpose(-1, -2), dim=-1)
            tgt_spec = torch.fft.rfft(_fp32(targets).transpose(-1, -2), dim=-1)
            rec_amp, tgt_amp = (
                _magnitude(rec_spec.real, rec_spec.imag),
                _magnitude(tgt_spec.real, tgt_spec.imag),
            )  # [B, n_tf, 6, F]

            rec_centred = rec_amp[..., 1:] - rec_amp[..., 1:].mean(-1, keepdim=True)
            tgt_centred = tgt_amp[..., 1:] - tgt_amp[..., 1:].mean(-1, keepdim=True)
            rec_norm = torch.linalg.vector_norm(rec_centred, dim=-1)
            tgt_norm = torch.linalg.vector_norm(tgt_centred, dim=-1)
            amp_corr = (rec_centred * tgt_centred).sum(-1) / (rec_norm * tgt_norm).clamp(
                min=_NORM_EPS
            )

            cross = (rec_spec * tgt_spec.conj()).real.sum(-1)
            coherence = cross / (rec_amp * tgt_amp).sum(-1).clamp(min=_NORM_EPS)

            valid = (tgt_norm > _NORM_EPS).to(amp_corr.dtype)
            per_series = 0.5 * (1.0 - amp_corr) + 0.5 * (1.0 - coherence)
            return (per_series * valid).sum() / valid.sum().clamp(min=1.0)


def forecast_loss(
    predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of predicted log volatility over the ``valid`` entries (fp32; 0 when
    none is valid, with no data-dependent branch)."""
    err = (_fp32(predicted) - _fp32(target)).square() * valid
    return err.sum() / valid.sum().clamp(min=1)


class Stage1CombinedLoss(nn.Module):
    """Weighted sum of the guide's four losses and the optional forecast term (weights from
    ``config.loss.weights``).

    ``forward(reconstructed, targets, masks, times=None, scale=None, forecast=None)`` ->
    ``{'total', 'huber', 'stft', 'cross_tf', 'amp_phase', 'forecast'}``, each a scalar fp32
    tensor. ``norm_mean``/``norm_std``
    (``[n_tf, 6]``, TFNormalizer statistics) let the cross-timeframe loss undo the z-scoring;
    identity when None. ``cross_tf`` is 0 when ``times`` is None.
    """

    def __init__(
        self,
        config: ConfigLike,
        norm_mean: torch.Tensor | None = None,
        norm_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        config = as_config(config)
        loss_cfg = config.loss
        self.weights = {name: float(value) for name, value in loss_cfg.weights.items()}
        self.huber = HuberLoss(float(loss_cfg.huber_delta), float(loss_cfg.unmasked_weight))
        self.stft = STFTLoss(list(loss_cfg.stft_fft_sizes))
        self.cross_tf = CrossTFConsistencyLoss(
            sort_timeframes(list(config.data.timeframes)),
            norm_mean,
            norm_std,
            delta=float(loss_cfg.huber_delta),
        )
        self.amp_phase = AmplitudePhaseCorrelationLoss()

    def _unit(self, scale: torch.Tensor | None) -> torch.Tensor | None:
        """Normalised units per bar scale (``scale [B, n_tf, L]``): ``[B, n_tf, L, 6]``. A
        z-score error times the normaliser std is a raw error; divided by the bar's scale it
        counts bar ranges (``body_ratio``, already scale-free, keeps raw units)."""
        if scale is None:
            return None
        std = self.cross_tf.norm_std  # [n_tf, 6]
        unit = scale.float()[..., None] / std[None, :, None, :]
        body = (1.0 / std[None, :, None, BODY_RATIO:]).expand(*unit.shape[:-1], 1)
        return torch.cat([unit[..., :BODY_RATIO], body], -1)

    def forward(
        self,
        reconstructed: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        times: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        forecast: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """reconstructed, targets: ``[B, n_tf, L, 6]``; masks: bool ``[B, n_tf, L]``;
        times: int64 ``[B, n_tf, L]`` bar open times in ns (UTC); scale (optional): the model's
        visible bar scale ``[B, n_tf, L]`` in raw log units (``Stage1Model`` output
        ``'scale'``); forecast (optional): ``(predicted, target, valid)`` ``[B, H]``, the
        model's ``'forecast'`` and the batch's ``future_log_vol``/``future_valid``, scored by
        the mean squared error over valid entries (0 without)."""
        if reconstructed.shape != targets.shape or masks.shape != targets.shape[:-1]:
            raise ValueError(
                f"loss inputs: reconstructed {tuple(reconstructed.shape)}, targets "
                f"{tuple(targets.shape)} and masks {tuple(masks.shape)} do not match"
            )
        if times is not None and times.shape != masks.shape:
            raise ValueError(
                f"loss inputs: times {tuple(times.shape)} do not match masks {tuple(masks.shape)}"
            )
        composite = torch.where(masks.unsqueeze(-1), reconstructed, targets.to(reconstructed.dtype))
        parts = {
            "huber": self.huber(reconstructed, targets, masks, self._unit(scale)),
            "stft": self.stft(composite, targets),
            "cross_tf": (
                reconstructed.new_zeros((), dtype=torch.float32)
                if times is None
                else self.cross_tf(composite, times)
            ),
            "amp_phase": self.amp_phase(composite, targets),
            "forecast": (
                reconstructed.new_zeros((), dtype=torch.float32)
                if forecast is None
                else forecast_loss(*forecast)
            ),
        }
        total = torch.stack([self.weights[name] * value for name, value in parts.items()]).sum()
        return {"total": total, **parts}
