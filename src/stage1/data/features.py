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


def scaled_bars(
    ohlc: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bar terms of the z-scores, from float64 prices ``[..., n, 4]`` (bars in time order
    along ``n``) on any device; ``stats``: float64 ``(mean, 1 / std)`` broadcastable to
    ``[..., n, 6]`` (e.g. ``[6]`` for one timeframe's bars, ``[n_tf, 1, 6]`` for windows), or
    ``None`` for raw features.

    Returns float64 ``bars [..., n, 6]``: the price columns as ``log p / std - mean / std``
    (a window's z-score is that minus ``log ref / std``, :func:`scaled_windows`),
    ``delta_close`` (log close minus the previous bar's; bar 0: its own ``log(close / open)``)
    and ``body_ratio`` as z-scores; and ``first_delta [..., n]``, the ``delta_close`` z-score of
    ``log(close / open)``, which a window's first bar gets. Every value is elementwise in the
    bar and its predecessor, so rows of a whole series (the batch builder's tables) and the
    same bars cut into windows give the same bits."""
    log_p = _log(ohlc)
    bars = torch.empty(*ohlc.shape[:-1], N_FEATURES, dtype=torch.float64, device=ohlc.device)
    bars[..., : CLOSE + 1] = log_p
    close = log_p[..., CLOSE]
    first_delta = close - log_p[..., OPEN]
    torch.sub(close[..., 1:], close[..., :-1], out=bars[..., 1:, DELTA_CLOSE])
    bars[..., 0, DELTA_CLOSE] = first_delta[..., 0]
    _body_ratio(ohlc, out=bars[..., BODY_RATIO])
    if stats is not None:
        mean, inv_std = stats
        shift = -mean * inv_std
        bars.mul_(inv_std).add_(shift)
        first_delta.mul_(inv_std[..., DELTA_CLOSE]).add_(shift[..., DELTA_CLOSE])
    return bars, first_delta


def price_scale(
    stats: tuple[torch.Tensor, torch.Tensor] | None,
    n_tf: int,
    length: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float64 ``[n_tf, length, 6]``: ``-1 / std`` in the price columns (``-1`` for raw
    features), 0 in the others; what :func:`scaled_windows` multiplies ``log ref`` by. Full
    size, so that pass runs vectorised (a ``[n_tf, 1, 6]`` broadcast runs 6 elements at a
    time)."""
    scale = torch.zeros(n_tf, length, N_FEATURES, dtype=torch.float64, device=device)
    inv_std = torch.ones(n_tf, 1, CLOSE + 1, dtype=torch.float64, device=device)
    if stats is not None:
        inv_std = stats[1][..., : CLOSE + 1].to(device)
    scale[..., : CLOSE + 1] = -inv_std
    return scale


def scaled_windows(
    bars: torch.Tensor,
    first_delta: torch.Tensor,
    log_ref: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Features of windows from their bars' :func:`scaled_bars` values.

    bars: float64 ``[B, n_tf, L, 6]``, contiguous (its first bars' ``delta_close`` is
    overwritten); first_delta: float64 ``[B, n_tf]``, the ``first_delta`` of each timeframe's
    first bar; log_ref: float64 ``[B]``, ``log`` of the reference price; scale:
    :func:`price_scale`. Returns float32 ``[B, n_tf, L, 6]`` (into ``out`` when given): the
    price features ``(log p - log ref - mean) / std`` as ``bars - log ref / std`` (float64
    throughout: the two terms are large and nearly equal, their difference keeps ~1e-12 z
    units), rounded to float32 once (in place in float64, then one cast: both passes run
    vectorised; writing float32 straight from float64 operands does not).
    """
    bars[:, :, 0, DELTA_CLOSE] = first_delta
    torch.addcmul(bars, log_ref[:, None, None, None], scale, out=bars)
    return bars.float() if out is None else out.copy_(bars)


def float64_stats(
    mean: torch.Tensor, std: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / std)`` float64 ``[n_tf, 1, 6]`` on ``device`` for :func:`scaled_bars`."""
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
    :func:`scaled_bars` of the windows' bars, then :func:`scaled_windows` (z-scores with
    ``stats`` from :func:`float64_stats`, else raw). The same bits as the batch builder's,
    which takes the same per-bar values from tables of the whole series (the one cross-bar
    value, a window's first ``delta_close``, is its intrabar move either way). ``out``: a
    float32 ``[B, n_tf, L, 6]`` tensor to write into."""
    windows = prices.reshape(-1, *prices.shape[-3:])  # [B, n_tf, L, 4]
    bars, first_delta = scaled_bars(windows, stats)
    log_ref = _log(windows[:, 0, 0, OPEN].contiguous())
    scale = price_scale(stats, windows.shape[1], windows.shape[2], windows.device)
    features = scaled_windows(bars, first_delta[..., 0], log_ref, scale, out=out)
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
