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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from stage1.config import ConfigLike, as_config
from stage1.data.timeframes import sort_timeframes

if TYPE_CHECKING:
    from stage1.data.normalization import TFNormalizer

FEATURE_NAMES = ("open", "high", "low", "close", "delta_close", "body_ratio")
OPEN, HIGH, LOW, CLOSE, DELTA_CLOSE, BODY_RATIO = range(6)
N_FEATURES = len(FEATURE_NAMES)
OHLC_COLUMNS = FEATURE_NAMES[:4]


def _log(x: torch.Tensor) -> torch.Tensor:
    """``log`` of a float64 tensor; on the CPU through NumPy, whose vectorised ``log`` is about
    2.5x faster than torch's there (the results differ by at most an ulp of float64)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.log(x.detach().numpy()))
    return x.log()


def _body_ratio(ohlc: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(close - open) / (high - low)``: a flat bar (high == low) has open == close, and the
    floored range makes its ratio 0."""
    bar_range = (ohlc[..., HIGH] - ohlc[..., LOW]).clamp_min_(torch.finfo(torch.float64).tiny)
    return torch.div(ohlc[..., CLOSE] - ohlc[..., OPEN], bar_range, out=out)


def bar_table(ohlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bar float64 table ``[rows, 6]`` (log open/high/low/close, delta_close, body_ratio)
    and ``log(close / open)`` ``[rows]``, from float64 prices ``[rows, 4]`` on any device.

    ``delta_close`` of a row is ``log(close) - log(previous row's close)`` (row 0: its own
    ``log(close / open)``); windows replace their first bar's with ``log(close / open)``."""
    table = torch.empty(len(ohlc), N_FEATURES, dtype=torch.float64, device=ohlc.device)
    log_p = _log(ohlc)
    table[:, : CLOSE + 1] = log_p
    intrabar = log_p[:, CLOSE] - log_p[:, OPEN]
    torch.sub(log_p[1:, CLOSE], log_p[:-1, CLOSE], out=table[1:, DELTA_CLOSE])
    table[:1, DELTA_CLOSE] = intrabar[:1]
    _body_ratio(ohlc, out=table[:, BODY_RATIO])
    return table, intrabar


def window_features(
    bars: torch.Tensor,
    first_intrabar: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    relative: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features of windows from their bars' :func:`bar_table` rows (overwritten in place).

    bars: float64 ``[B, n_tf, L, 6]``, contiguous; first_intrabar: float64 ``[B, n_tf]``,
    ``log(close / open)`` of each timeframe's first bar; stats: float64 ``(mean, 1 / std)``,
    each ``[n_tf, 1, 6]``, or ``None`` for raw features; ``relative``: the price columns
    already hold ``log p - log ref``. Returns float32 ``[B, n_tf, L, 6]``: the price features
    ``log p - log ref`` (a difference of float64 logs, exact even for nearby prices),
    z-scored in float64 and rounded to float32 once (into ``out`` when given).
    """
    bars[:, :, 0, DELTA_CLOSE] = first_intrabar
    if not relative:
        bars[..., : CLOSE + 1] -= bars[:, :1, :1, OPEN : OPEN + 1].clone()
    if stats is not None:
        # z = x / std - mean / std in one pass, with per (timeframe, position, feature)
        # statistics: contiguous with the bars' last three dims, so the pass runs vectorised
        # (a [n_tf, 1, 6] broadcast would run 6 elements at a time).
        mean, inv_std = stats
        length = bars.shape[2]
        inv_full = inv_std.expand(-1, length, -1).contiguous()
        shift = (-mean * inv_std).expand(-1, length, -1).contiguous()
        torch.addcmul(shift, bars, inv_full, out=bars)
    return bars.float() if out is None else out.copy_(bars)


def float64_stats(
    mean: torch.Tensor, std: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / std)`` float64 ``[n_tf, 1, 6]`` on ``device`` for :func:`window_features`."""
    mean64 = mean.to(device, torch.float64)[:, None, :]
    return mean64, 1.0 / std.to(device, torch.float64)[:, None, :]


def numpy_reference_features(ohlc: np.ndarray) -> torch.Tensor:
    """The NumPy feature code the batch path replaced (float64 relative changes, float32
    ``log1p``), kept only as the reference of tests and ``benchmarks/bench_sampler.py``:
    float64 ``[B, n_tf, L, 4]`` prices → raw features float32 ``[B, n_tf, L, 6]``."""

    def log_ratio(new: np.ndarray, base: np.ndarray) -> np.ndarray:
        change = np.empty(np.broadcast_shapes(new.shape, base.shape), dtype=np.float32)
        np.divide(new - base, base, out=change, casting="same_kind")
        return torch.log1p_(torch.from_numpy(change)).numpy()

    per_window = ohlc.reshape(len(ohlc), -1)
    log_rel = log_ratio(per_window, per_window[:, :1]).reshape(ohlc.shape)
    close = ohlc[..., CLOSE]
    prev_close = np.concatenate([ohlc[..., :1, OPEN], close[..., :-1]], axis=-1)
    bar_range = np.maximum(ohlc[..., HIGH] - ohlc[..., LOW], np.finfo(np.float64).tiny)
    body = np.empty(bar_range.shape, dtype=np.float32)
    np.divide(close - ohlc[..., OPEN], bar_range, out=body, casting="same_kind")
    delta = log_ratio(close, prev_close)
    return torch.from_numpy(np.concatenate([log_rel, delta[..., None], body[..., None]], -1))


def price_window_features(
    prices: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features float32 ``[..., n_tf, L, 6]`` of float64 price windows ``[..., n_tf, L, 4]``:
    the :func:`bar_table` values of every bar, then :func:`window_features` (z-scores with
    ``stats`` from :func:`float64_stats`, else raw). The same values as gathering rows of the
    whole series' table (every per-bar quantity is elementwise; the one cross-bar value, a
    window's first ``delta_close``, is its intrabar move either way). ``out``: a float32
    ``[B, n_tf, L, 6]`` tensor to write into."""
    windows = prices.reshape(-1, *prices.shape[-3:])  # [B, n_tf, L, 4]
    log_p = _log(windows)
    close = log_p[..., CLOSE]
    bars = torch.empty(*windows.shape[:-1], N_FEATURES, dtype=torch.float64, device=prices.device)
    torch.sub(close[..., 1:], close[..., :-1], out=bars[..., 1:, DELTA_CLOSE])
    first_intrabar = close[..., 0] - log_p[..., 0, OPEN]
    # log p - log ref here, on contiguous values (the same elementwise result as in the bars)
    bars[..., : CLOSE + 1] = log_p.sub_(log_p[:, :1, :1, OPEN : OPEN + 1].clone())
    _body_ratio(windows, out=bars[..., BODY_RATIO])
    features = window_features(bars, first_intrabar, stats, relative=True, out=out)
    return features.view(*prices.shape[:-1], N_FEATURES)


class FeatureEngineer:
    """Builds ``[.., n_tf, seq_len, 6]`` features from raw OHLC; ``config`` gives the timeframes."""

    def __init__(self, config: ConfigLike) -> None:
        self.timeframes = sort_timeframes(list(as_config(config).data.timeframes))

    def reference_prices(self, ohlc: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Reference price per window: open of the base bar at position 0.

        ohlc: ``[..., n_tf, seq_len, 4]`` → float64 ``[...]``.
        """
        return torch.as_tensor(ohlc, dtype=torch.float64)[..., 0, 0, OPEN].clone()

    def process_batch(
        self, ohlc: np.ndarray | torch.Tensor, normalizer: TFNormalizer | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a batch of raw price windows, computed in float64, returned as float32.

        ohlc: ``[B, n_tf, seq_len, 4]`` (ndarray or tensor; any leading dims work) →
        ``(features, targets)``, each float32 ``[B, n_tf, seq_len, 6]`` on the input's device;
        z-scores with ``normalizer`` (formed in float64, as training batches are), else raw.
        ``targets`` holds the same values as ``features`` in a separate tensor. Windows of the
        sampler are built faster from per-bar tables (``DeviceBatchBuilder``), same math.
        """
        prices = torch.as_tensor(ohlc, dtype=torch.float64)
        if prices.ndim < 3 or prices.shape[-1] != 4:
            raise ValueError(f"ohlc must be [..., n_tf, seq_len, 4], got {tuple(prices.shape)}")
        stats = None
        if normalizer is not None:
            stats = float64_stats(normalizer.mean, normalizer.std, prices.device)
        out = price_window_features(prices, stats)
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
