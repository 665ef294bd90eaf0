"""FeatureEngineer: OHLC windows -> six scale-free features per bar.

Per bar, in this order: ``open, high, low, close`` as ``log(price / ref)``, ``delta_close`` (log
close minus the previous bar's log close; the first bar uses its own open) and ``body_ratio``
(``(close - open) / (high - low)``, 0 when ``high == low``). ``ref`` is the OPEN of the base
timeframe's oldest bar in the window (position 0), which the masking never hides, so every
feature of a visible bar depends only on visible bars. Multiplying all prices by a constant
changes nothing, and ``to_prices`` inverts the price features given ``ref``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from stage1.data.timeframes import sort_timeframes

FEATURE_NAMES = ("open", "high", "low", "close", "delta_close", "body_ratio")
OPEN, HIGH, LOW, CLOSE, DELTA_CLOSE, BODY_RATIO = range(6)
N_FEATURES = len(FEATURE_NAMES)
OHLC_COLUMNS = FEATURE_NAMES[:4]


def _as_float64(ohlc: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.from_numpy(ohlc) if isinstance(ohlc, np.ndarray) else ohlc
    return tensor.to(torch.float64)


class FeatureEngineer:
    """Builds ``[.., n_tf, seq_len, 6]`` features from raw OHLC; ``config`` gives the timeframes."""

    def __init__(self, config: Any) -> None:
        self.timeframes = sort_timeframes(list(config.data.timeframes))

    def reference_prices(self, ohlc: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Reference price per window: open of the base bar at position 0.

        ohlc: ``[..., n_tf, seq_len, 4]`` → float64 ``[...]``.
        """
        return _as_float64(ohlc)[..., 0, 0, OPEN]

    def process_batch(self, ohlc: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a batch of windows, computed in float64 and returned as float32.

        ohlc: ``[B, n_tf, seq_len, 4]`` (ndarray or tensor; any leading dims work) →
        ``(features, targets)``, each float32 ``[B, n_tf, seq_len, 6]`` on the input's device.
        ``targets`` holds the same values as ``features`` in a separate tensor.
        """
        prices = _as_float64(ohlc)
        if prices.shape[-1] != 4 or prices.dim() < 3:
            raise ValueError(f"ohlc must be [..., n_tf, seq_len, 4], got {tuple(prices.shape)}")
        ref = prices[..., :1, :1, OPEN : OPEN + 1]  # [..., 1, 1, 1]
        features = torch.empty(
            (*prices.shape[:-1], N_FEATURES), dtype=torch.float32, device=prices.device
        )
        log_rel = torch.log(prices / ref)
        features[..., :4] = log_rel
        delta = features[..., DELTA_CLOSE]
        delta[..., 0] = log_rel[..., 0, CLOSE] - log_rel[..., 0, OPEN]
        delta[..., 1:] = log_rel[..., 1:, CLOSE] - log_rel[..., :-1, CLOSE]
        body = prices[..., CLOSE] - prices[..., OPEN]
        bar_range = prices[..., HIGH] - prices[..., LOW]
        flat = bar_range <= 0
        features[..., BODY_RATIO] = torch.where(flat, 0.0, body / bar_range.masked_fill(flat, 1.0))
        return features, features.clone()

    def process_window(
        self, window: Mapping[str, pd.DataFrame]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of one window ``{tf: DataFrame of seq_len bars}`` (e.g. ``get_window(i)``).

        Returns ``(features, targets)``, each float32 ``[n_tf, seq_len, 6]``.
        """
        missing = [tf for tf in self.timeframes if tf not in window]
        if missing:
            raise ValueError(f"window lacks timeframe(s) {missing}; expected {self.timeframes}")
        lengths = {tf: len(window[tf]) for tf in self.timeframes}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"window timeframes differ in length: {lengths}")
        ohlc = np.stack(
            [window[tf][list(OHLC_COLUMNS)].to_numpy(dtype=np.float64) for tf in self.timeframes]
        )
        features, targets = self.process_batch(ohlc[None])
        return features[0], targets[0]

    @staticmethod
    def to_prices(features: torch.Tensor, ref: torch.Tensor | float) -> torch.Tensor:
        """Invert the price features: ``[..., n_tf, seq_len, >=4]`` and ``ref`` ``[...]`` →
        float64 OHLC ``[..., n_tf, seq_len, 4]``."""
        ref_t = torch.as_tensor(ref, dtype=torch.float64, device=features.device)
        return torch.exp(features[..., :4].to(torch.float64)) * ref_t[..., None, None, None]
