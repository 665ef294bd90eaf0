"""What the model knows before it learns anything: a naive fill of the hidden bars and the
window's own bar scale, both computed from VISIBLE bars only (torch, batched, on any device).

The model predicts a correction on top of the fill, in units of the scale, so a network whose
head outputs zero reproduces the naive rule exactly and every step of training is measured
against it (docs/ARCHITECTURE.md, model). Everything here works in RAW feature space (log price
relative to the window's reference price, ``FeatureEngineer``'s output before z-scoring):
``raw [B, n_tf, L, 6]``, ``masks bool [B, n_tf, L]`` (True = hidden).

Hidden positions of ``raw`` are never read: every value taken from a neighbour comes from a
visible bar (indices from :func:`neighbour_indices`), and reductions weigh hidden bars by zero.
"""

from __future__ import annotations

import torch

from stage1.data.features import BODY_RATIO, CLOSE, DELTA_CLOSE, HIGH, LOW, OPEN

# Floor of the per-window scale (log units, 1e-5 ~ 0.1 pip on USDJPY): a window of flat bars
# keeps a finite, small scale instead of a division by zero.
SCALE_FLOOR = 1e-5
# Log differences are clamped here before exp (e^30 ~ 1e13): real bars never come close.
_MAX_LOG_DIFF = 30.0


def neighbour_indices(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last visible position at or before each position (-1 if none) and of the
    first visible position at or after it (``L`` if none); ``[..., L]`` int64 each."""
    seq_len = masks.shape[-1]
    positions = torch.arange(seq_len, device=masks.device).expand_as(masks)
    prev = torch.where(masks, -1, positions).cummax(-1).values
    flipped = torch.where(masks, seq_len, positions).flip(-1)
    next_ = flipped.cummin(-1).values.flip(-1)
    return prev, next_


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[..., index[..., t]]`` along the last dim, with ``index`` clipped into range."""
    return values.gather(-1, index.clamp(0, values.shape[-1] - 1))


def masked_median(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Median over the last dim of the VISIBLE entries (``masks`` False); 0 where none is.

    For an even count it is the mean of the two middle values, like ``np.nanmedian`` (the
    evaluation's baselines): one sort with hidden entries pushed to the end, then the two
    middle visible entries (the same one for an odd count)."""
    ordered = values.masked_fill(masks, float("inf")).sort(dim=-1).values
    count = (~masks).sum(-1, keepdim=True)
    lower = ordered.gather(-1, ((count - 1) // 2).clamp(min=0))
    upper = ordered.gather(-1, (count // 2).clamp(max=values.shape[-1] - 1))
    return torch.where(count > 0, 0.5 * (lower + upper), 0.0).squeeze(-1)


def bridge_fill(raw: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The bar-aware bridge of SPEC §6 (``stage1.evaluation.baselines.baseline_bridge``) in torch.

    Hidden closes run linearly from the last visible close to the open of the first visible bar
    after the span; a hidden open is the previous (composite) close; high/low are
    ``max/min(open, close)`` plus/minus the window's median visible wick; right-edge spans carry
    the last close forward; spans at position 0 sit flat at the next open. ``delta_close`` and
    ``body_ratio`` of hidden bars follow from the filled OHLC. Visible bars are returned as they
    are. ``[B, n_tf, L, 6]`` -> same shape and dtype.
    """
    seq_len = masks.shape[-1]
    prev, next_ = neighbour_indices(masks)
    has_prev, has_next = prev >= 0, next_ < seq_len
    close_in, open_in = raw[..., CLOSE], raw[..., OPEN]
    last_close, next_open = _take(close_in, prev), _take(open_in, next_)
    positions = torch.arange(seq_len, device=masks.device)
    n_hidden = (next_ - prev - 1).clamp(min=1)
    weight = torch.where(has_next, (positions - prev) / n_hidden, 0.0).to(raw.dtype)
    bridged = last_close + (next_open - last_close) * weight
    zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
    close = torch.where(has_prev, bridged, torch.where(has_next, next_open, zero))
    close = torch.where(masks, close, close_in)
    prev_close = torch.cat([close[..., :1], close[..., :-1]], dim=-1)
    open_ = torch.where(masks, torch.where(has_prev, prev_close, close), open_in)
    upper = masked_median(raw[..., HIGH] - torch.maximum(open_in, close_in), masks)
    lower = masked_median(torch.minimum(open_in, close_in) - raw[..., LOW], masks)
    high = torch.where(masks, torch.maximum(open_, close) + upper[..., None], raw[..., HIGH])
    low = torch.where(masks, torch.minimum(open_, close) - lower[..., None], raw[..., LOW])
    return derive_delta_and_body(torch.stack([open_, high, low, close], dim=-1), raw, masks)


def derive_delta_and_body(
    ohlc: torch.Tensor, raw: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Six features from guessed OHLC ``[..., L, 4]`` (truth at visible bars): ``delta_close`` and
    ``body_ratio`` of hidden bars follow from the guess (``delta_close`` from the composite
    close), visible bars keep ``raw``'s. Returns ``[..., L, 6]``."""
    open_, high, low, close = ohlc.unbind(-1)
    zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
    delta = close - torch.cat([open_[..., :1], close[..., :-1]], dim=-1)
    delta = torch.where(masks, delta, raw[..., DELTA_CLOSE])

    # body_ratio = (C - O) / (H - L) in price space, from log differences only (no overflow):
    # (e^c - e^o) / (e^h - e^l) = expm1(c - o) * e^(o - l) / expm1(h - l)
    def bounded(d: torch.Tensor) -> torch.Tensor:
        return d.clamp(-_MAX_LOG_DIFF, _MAX_LOG_DIFF)

    span = torch.expm1(bounded(high - low))
    ratio = torch.expm1(bounded(close - open_)) * torch.exp(bounded(open_ - low))
    body = torch.where(span > 0, ratio / torch.where(span > 0, span, 1.0), zero)
    body = torch.where(masks, body.clamp(-1.0, 1.0), raw[..., BODY_RATIO])
    return torch.stack([open_, high, low, close, delta, body], dim=-1)


def agg_fill(
    raw: torch.Tensor, masks: torch.Tensor, times: torch.Tensor, durations_ns: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-timeframe baseline ``agg`` (``stage1.evaluation.agg.baseline_agg``, whose
    docstring states the rule) in torch: hidden coarse bars rebuilt from the finer timeframes'
    composite bars (truth where visible, their bridge where hidden) inside their period; the
    bridge on the base timeframe, on uncovered bars and where the source starts late.

    raw ``[B, n_tf, L, 6]``, masks ``[B, n_tf, L]``, times (bar open, int64 ns) ``[B, n_tf, L]``,
    ``durations_ns`` per timeframe (finest first). Returns ``(fill [B, n_tf, L, 6], source
    [B, n_tf, L] int64)``: the timeframe whose bars each fill was built from (the finer source
    of a covered bar, else the bar's own timeframe).
    """
    bridges = bridge_fill(raw, masks)
    batch, n_tf, seq_len, n_feat = raw.shape
    zero = torch.zeros(batch, n_tf, 1, dtype=torch.long, device=raw.device)
    visible_before = torch.cat([zero, (~masks).long().cumsum(-1)], dim=-1)  # [B, n_tf, L + 1]
    out = [bridges[:, 0]]
    sources = [torch.zeros_like(masks[:, 0], dtype=torch.long)]
    for k in range(1, n_tf):
        start = times[:, k]  # [B, L] coarse opens
        end = start + durations_ns[k]
        finer_open = times[:, :k].contiguous()  # [B, k, L]
        lo = torch.searchsorted(finer_open, start[:, None, :].expand(-1, k, -1).contiguous())
        hi = torch.searchsorted(finer_open, end[:, None, :].expand(-1, k, -1).contiguous())
        before = visible_before[:, :k]
        has_visible = (before.gather(-1, hi) - before.gather(-1, lo)) > 0  # [B, k, L]
        spans_start = has_visible & (finer_open[..., :1] <= start[:, None, :])
        # The finest timeframe whose visible bars span the start, else the finest with any
        # (k if none): a loop over the few finer timeframes, as reductions along a middle dim
        # are slow on CPU.
        first_spanning = torch.full_like(lo[:, 0], k)
        first_visible = torch.full_like(lo[:, 0], k)
        for j in range(k - 1, -1, -1):
            first_spanning = torch.where(spans_start[:, j], j, first_spanning)
            first_visible = torch.where(has_visible[:, j], j, first_visible)
        source = torch.where(first_spanning < k, first_spanning, first_visible % k)  # [B, L]
        covered = (first_visible < k) & masks[:, k]
        lo_s = lo.gather(1, source[:, None]).squeeze(1)
        hi_s = hi.gather(1, source[:, None]).squeeze(1)
        # Open and close are single bars of the source: gather them from the flattened
        # [k * L] axis.
        flat = bridges[:, :k].reshape(batch, k * seq_len, n_feat)
        first = source * seq_len + lo_s.clamp(0, seq_len - 1)
        last = source * seq_len + (hi_s - 1).clamp(min=0)
        agg_open = flat[..., OPEN].gather(-1, first)
        agg_close = flat[..., CLOSE].gather(-1, last)
        # High and low: each finer bar lies in at most one coarse period, so a scatter-max
        # per finer timeframe gives every period's extremes in O(L), then the source's are kept.
        agg_high = torch.full_like(agg_open, -torch.inf)
        agg_low = torch.full_like(agg_open, torch.inf)
        coarse_start = start.contiguous()
        for j in range(k):
            period = torch.searchsorted(coarse_start, times[:, j].contiguous(), right=True) - 1
            period = period.clamp(min=0)
            inside = (times[:, j] >= coarse_start.gather(-1, period)) & (
                times[:, j] < end.gather(-1, period)
            )
            high_j = torch.where(inside, bridges[:, j, :, HIGH], -torch.inf)
            low_j = torch.where(inside, bridges[:, j, :, LOW], torch.inf)
            high_j = torch.full_like(agg_high, -torch.inf).scatter_reduce(
                -1, period, high_j, "amax"
            )
            low_j = torch.full_like(agg_low, torch.inf).scatter_reduce(-1, period, low_j, "amin")
            agg_high = torch.where(source == j, high_j, agg_high)
            agg_low = torch.where(source == j, low_j, agg_low)
        bridge = bridges[:, k]
        partial = ~spans_start.gather(1, source[:, None]).squeeze(1)
        agg_open = torch.where(partial, bridge[..., OPEN], agg_open)
        agg_high = torch.where(partial, torch.maximum(agg_high, bridge[..., HIGH]), agg_high)
        agg_low = torch.where(partial, torch.minimum(agg_low, bridge[..., LOW]), agg_low)
        ohlc = torch.stack([agg_open, agg_high, agg_low, agg_close], dim=-1)
        ohlc = torch.where(covered[..., None], ohlc, bridge[..., :4])
        out.append(derive_delta_and_body(ohlc, raw[:, k], masks[:, k]))
        sources.append(torch.where(covered, source, k))
    return torch.stack(out, dim=1), torch.stack(sources, dim=1)


def visible_scale(raw: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean bar range ``high - low`` (log units) over the visible bars of each window and
    timeframe, floored at :data:`SCALE_FLOOR`: ``[B, n_tf]``. A timeframe with no visible bar
    (the shipped masking never hides a whole timeframe) takes the largest of the window's
    other scales."""
    visible = (~masks).to(raw.dtype)
    bar_range = (raw[..., HIGH] - raw[..., LOW]).clamp(min=0.0)
    count = visible.sum(-1)
    mean = (bar_range * visible).sum(-1) / count.clamp(min=1.0)
    fallback = mean.amax(-1, keepdim=True).expand_as(mean)
    return torch.where(count > 0, mean, fallback).clamp(min=SCALE_FLOOR)


def last_visible_close(raw: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Close of the newest visible bar of the BASE timeframe (index 0) per window: ``[B]``.

    The base timeframe's position 0 is never hidden, so it always exists."""
    prev, _ = neighbour_indices(masks[:, 0])
    return _take(raw[:, 0, :, CLOSE], prev[:, -1:]).squeeze(-1)
