"""TFNormalizer: per-timeframe, per-feature z-scores, fitted on training windows only."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from stage1.data.features import FEATURE_NAMES
from stage1.errors import DataValidationError
from stage1.utils import atomic_write_text

# A feature that is (nearly) constant on the train split is left unscaled instead of blown up.
STD_FLOOR = 1e-8


class TFNormalizer:
    """``normalize(x) = (x - mean) / std`` with ``mean``/``std`` float32 ``[n_tf, n_features]``.

    Fit it on features of TRAIN windows only (``Stage1Dataset`` does, on a deterministic random
    subset of at most ``max_fit_windows`` train windows, streamed in chunks); the statistics
    then travel with checkpoints (``to_dict``) or as a JSON file (``save_stats``).
    """

    def __init__(self, timeframes: Sequence[str], feature_names: Sequence[str] = FEATURE_NAMES):
        self.timeframes = list(timeframes)
        self.feature_names = list(feature_names)
        shape = (len(self.timeframes), len(self.feature_names))
        self.mean = torch.zeros(shape, dtype=torch.float32)
        self.std = torch.ones(shape, dtype=torch.float32)
        self.fitted = False
        self.config_hash: str | None = None
        # (oldest bar open, newest anchor) of the train split, ISO UTC: the period an embedding
        # store or an RL evaluation must stay out of to be out-of-sample. None if not recorded.
        self.train_period: tuple[str, str] | None = None

    def fit(self, features: torch.Tensor | Iterable[torch.Tensor]) -> TFNormalizer:
        """Fit on ``[N, n_tf, seq_len, n_features]`` features, or an iterable of such chunks.

        Statistics run over windows and positions, per timeframe and feature, in float64;
        chunks are merged with Chan's parallel update, so streaming gives the one-shot result.
        """
        chunks = [features] if isinstance(features, torch.Tensor) else features
        shape = (len(self.timeframes), len(self.feature_names))
        count = 0
        mean = torch.zeros(shape, dtype=torch.float64)
        sq_dev = torch.zeros(shape, dtype=torch.float64)  # sum of squared deviations
        for chunk in chunks:
            if chunk.dim() < 3 or (chunk.shape[-3], chunk.shape[-1]) != shape:
                raise ValueError(
                    f"features must be [..., {shape[0]}, seq_len, {shape[1]}], "
                    f"got {tuple(chunk.shape)}"
                )
            x = chunk.detach().cpu().to(torch.float64).reshape(-1, *chunk.shape[-3:])
            n = x.shape[0] * x.shape[2]  # windows x positions
            if n == 0:
                continue
            chunk_mean = x.mean(dim=(0, 2))
            chunk_sq_dev = (x - chunk_mean[:, None, :]).square_().sum(dim=(0, 2))
            delta = chunk_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            sq_dev = sq_dev + chunk_sq_dev + delta.square() * (count * n / total)
            count = total
        if count == 0:
            raise ValueError("TFNormalizer.fit: no features given")
        std = (sq_dev / count).sqrt()
        self.mean = mean.to(torch.float32)
        self.std = torch.where(std < STD_FLOOR, 1.0, std).to(torch.float32)
        self.fitted = True
        return self

    def _affine(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``x * scale + shift`` in one fused pass, stats broadcast over ``seq_len``."""
        n_tf, n_features = len(self.timeframes), len(self.feature_names)
        if x.dim() < 3 or x.shape[-3] != n_tf or x.shape[-1] != n_features:
            raise ValueError(f"expected [..., {n_tf}, seq_len, {n_features}], got {tuple(x.shape)}")
        mean = self.mean.to(device=x.device, dtype=x.dtype)[:, None, :]
        std = self.std.to(device=x.device, dtype=x.dtype)[:, None, :]
        if inverse:
            return torch.addcmul(mean, x, std)
        return torch.addcmul(-mean / std, x, 1.0 / std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n_tf, seq_len, n_features]`` raw features → z-scores (same shape and dtype)."""
        return self._affine(x, inverse=False)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` for ``[..., n_tf, seq_len, n_features]``."""
        return self._affine(x, inverse=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON- and ``torch.load(weights_only=True)``-safe)."""
        return {
            "timeframes": list(self.timeframes),
            "feature_names": list(self.feature_names),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "train_period": None if self.train_period is None else list(self.train_period),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TFNormalizer:
        """Rebuild from :meth:`to_dict` output."""
        normalizer = cls(values["timeframes"], values["feature_names"])
        mean = torch.tensor(values["mean"], dtype=torch.float32)
        std = torch.tensor(values["std"], dtype=torch.float32)
        if mean.shape != normalizer.mean.shape or std.shape != normalizer.std.shape:
            raise ValueError(
                f"mean/std shapes {tuple(mean.shape)}/{tuple(std.shape)} do not match "
                f"{len(normalizer.timeframes)} timeframes x {len(normalizer.feature_names)} features"
            )
        normalizer.mean, normalizer.std = mean, std
        normalizer.fitted = True
        period = values.get("train_period")  # absent in checkpoints written before it existed
        if period is not None:
            normalizer.train_period = (str(period[0]), str(period[1]))
        return normalizer

    def save_stats(self, path: str | Path, config_hash: str) -> None:
        """Write the statistics as JSON (atomically), tagged with ``config_hash``."""
        payload = {**self.to_dict(), "config_hash": config_hash}
        atomic_write_text(Path(path), json.dumps(payload, indent=2))

    @classmethod
    def load_stats(
        cls,
        path: str | Path,
        timeframes: Sequence[str],
        feature_names: Sequence[str] = FEATURE_NAMES,
    ) -> TFNormalizer:
        """Read :meth:`save_stats` output; it must be for exactly these timeframes and features."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
            normalizer = cls.from_dict(values)
        except FileNotFoundError as exc:
            raise DataValidationError(f"{path}: normalisation stats file not found") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataValidationError(
                f"{path}: not a valid normalisation stats file ({exc})"
            ) from exc
        for what, stored, wanted in (
            ("timeframes", normalizer.timeframes, list(timeframes)),
            ("feature names", normalizer.feature_names, list(feature_names)),
        ):
            if stored != wanted:
                raise DataValidationError(
                    f"{path}: stats are for {what} {stored}, but the data has {wanted}"
                )
        normalizer.config_hash = values.get("config_hash")
        return normalizer
