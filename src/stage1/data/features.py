"""FeatureEngineer: OHLC windows -> six scale-free features per bar.

Per bar, in this order: ``open, high, low, close`` as ``log(price / ref)``, ``delta_close`` (log
close minus the previous bar's log close; the first bar uses its own open) and ``body_ratio``
(``(close - open) / (high - low)``, 0 when ``high == low``). ``ref`` is the OPEN of the base
timeframe's oldest bar in the window (position 0), which the masking never hides, so every
feature of a visible bar depends only on visible bars. Multiplying all prices by a constant
changes nothing, and ``to_prices`` inverts the price features given ``ref``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from stage1.config import ConfigLike, as_config
from stage1.data.timeframes import sort_timeframes

FEATURE_NAMES = ("open", "high", "low", "close", "delta_close", "body_ratio")
OPEN, HIGH, LOW, CLOSE, DELTA_CLOSE, BODY_RATIO = range(6)
N_FEATURES = len(FEATURE_NAMES)
OHLC_COLUMNS = FEATURE_NAMES[:4]


def _as_float64(ohlc: np.ndarray | torch.Tensor) -> np.ndarray:
    """Prices as a C-contiguous float64 array (tensors are copied to the CPU)."""
    if isinstance(ohlc, torch.Tensor):
        ohlc = ohlc.detach().cpu().numpy()
    return np.ascontiguousarray(ohlc, dtype=np.float64)


def _log_ratio(new: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``log(new / base)`` as float32: ``log1p((new - base) / base)`` with the relative change
    formed in float64 and only the log1p of that small number taken in float32, which is exact
    to float32 precision and several times cheaper than a float64 log."""
    change = np.empty(np.broadcast_shapes(new.shape, base.shape), dtype=np.float32)
    np.divide(new - base, base, out=change, casting="same_kind")
    return torch.log1p_(torch.from_numpy(change)).numpy()


class FeatureEngineer:
    """Builds ``[.., n_tf, seq_len, 6]`` features from raw OHLC; ``config`` gives the timeframes."""

    def __init__(self, config: ConfigLike) -> None:
        self.timeframes = sort_timeframes(list(as_config(config).data.timeframes))

    def reference_prices(self, ohlc: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Reference price per window: open of the base bar at position 0.

        ohlc: ``[..., n_tf, seq_len, 4]`` → float64 ``[...]``.
        """
        return torch.from_numpy(_as_float64(ohlc)[..., 0, 0, OPEN].copy())

    def process_batch(self, ohlc: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a batch of windows, computed from float64 prices, returned as float32.

        ohlc: ``[B, n_tf, seq_len, 4]`` (ndarray or tensor; any leading dims work) →
        ``(features, targets)``, each float32 ``[B, n_tf, seq_len, 6]`` on the input's device.
        ``targets`` holds the same values as ``features`` in a separate tensor.
        """
        prices = _as_float64(ohlc)
        if prices.ndim < 3 or prices.shape[-1] != 4:
            raise ValueError(f"ohlc must be [..., n_tf, seq_len, 4], got {tuple(prices.shape)}")
        per_window = prices.reshape(-1, math.prod(prices.shape[-3:]))  # one row per window
        log_rel = _log_ratio(per_window, per_window[:, :1]).reshape(prices.shape)  # ref: open[0]
        close = prices[..., CLOSE]
        prev_close = np.concatenate([prices[..., :1, OPEN], close[..., :-1]], axis=-1)
        # A flat bar (high == low) has open == close, so flooring the range at the smallest
        # positive float makes its ratio 0 without a masked (slow) division.
        bar_range = np.maximum(prices[..., HIGH] - prices[..., LOW], np.finfo(np.float64).tiny)
        body_ratio = np.empty(bar_range.shape, dtype=np.float32)
        np.divide(close - prices[..., OPEN], bar_range, out=body_ratio, casting="same_kind")
        features = np.concatenate(
            [log_rel, _log_ratio(close, prev_close)[..., None], body_ratio[..., None]], axis=-1
        )
        device = ohlc.device if isinstance(ohlc, torch.Tensor) else torch.device("cpu")
        out = torch.from_numpy(features).to(device)
        return out, out.clone()

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
