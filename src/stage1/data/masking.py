"""Masking: which bars are hidden from the model, and what the model may see of the rest."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stage1.config import ConfigLike, as_config
from stage1.data.features import DELTA_CLOSE
from stage1.data.timeframes import sort_timeframes, tf_ns


def mask_model_input(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """What the model may see: hidden bars zeroed, and ``delta_close`` zeroed on every bar
    whose predecessor is hidden (it is that hidden close's difference to a visible close).

    features: ``[..., n_tf, seq_len, 6]`` (normalised); masks: bool ``[..., n_tf, seq_len]``,
    True = hidden. Returns a new tensor; visible values are unchanged otherwise.
    """
    if features.shape[:-1] != masks.shape:
        raise ValueError(
            f"masks {tuple(masks.shape)} do not match features {tuple(features.shape)}"
        )
    prev_hidden = torch.zeros_like(masks)
    prev_hidden[..., 1:] = masks[..., :-1]
    out = features.masked_fill(masks.unsqueeze(-1), 0.0)
    delta = out[..., DELTA_CLOSE].masked_fill(prev_hidden, 0.0)
    return torch.cat([out[..., :DELTA_CLOSE], delta.unsqueeze(-1), out[..., DELTA_CLOSE + 1 :]], -1)


class MaskingStrategy:
    """Random contiguous hidden spans per timeframe, drawn for a whole batch with torch ops.

    Per window and timeframe the number of hidden bars is ``mask_ratio * seq_len`` rounded up
    or down at random so that its mean is exactly the target (at least 1; plain rounding would
    give 2/16 = 0.125 for a 0.15 target at ``seq_len=16``). The budget is cut into spans whose
    length is drawn in base bars from ``[span_min_bars, span_max_bars]`` and mapped to the
    timeframe by calendar time (``max(1, round(len_base * base_duration / tf_duration))``); the
    last span is clipped to what is left of the budget. Spans are placed at random, apart from
    each other (every hidden run is one span) when the window has room, anywhere from the
    oldest to the newest bar, so some spans end at the newest bar ("right-edge" spans). Base
    position 0 holds the reference price and is never hidden.

    ``sync=True`` additionally hides every coarser bar that overlaps, in calendar time, a
    hidden bar of any finer timeframe (also one hidden this way), so the same calendar span is
    hidden in every timeframe. Coarse timeframes then hide more than ``mask_ratio``. When the
    timeframes nest (``MultiTFWindowSampler.parent_rows``) a batch brings ``parents``: the
    position of each bar's containing bar in the next coarser window. A bar then overlaps one
    bar of the next timeframe, its parent, and a coarser bar overlaps it only if it contains
    that parent, which is then in its own window too (it closes no later, and every newer bar
    of that window holds a finer bar). So hiding parents, timeframe by timeframe, hides what the
    rule hides, with no search (tested against the search and a brute-force rule).

    ``right_edge`` (default ``masking.right_edge_ratio``; evaluation passes 0) is the probability
    that a (window, timeframe) row's newest span is moved to end at the newest bar, the situation
    of a live agent. With ``sync`` only the base timeframe's draw matters for the coarse ones
    (their overlapping bars are hidden anyway).
    """

    def __init__(
        self,
        masking_cfg: Mapping[str, Any],
        timeframes: Sequence[str],
        seq_len: int,
        mask_ratio: float | None = None,
    ) -> None:
        # The ``masking`` section alone (DictConfig or plain mapping), checked by the schema;
        # ``mask_ratio`` replaces its ratio (the evaluation's, see ``evaluation_masking``).
        section = as_config({"masking": masking_cfg}).masking
        self.timeframes = sort_timeframes(list(timeframes))
        self.seq_len = seq_len
        self.mask_ratio = float(section.mask_ratio if mask_ratio is None else mask_ratio)
        self.sync_tf = bool(section.sync_tf)
        self.right_edge_ratio = float(getattr(section, "right_edge_ratio", 0.0))
        self.span_min_bars = int(section.span_min_bars)
        self.span_max_bars = int(section.span_max_bars)
        self.tf_durations_ns = [tf_ns(tf) for tf in self.timeframes]
        # Base bars per timeframe bar, as a length scale from base bars to this timeframe's bars.
        self.span_scale = [self.tf_durations_ns[0] / d for d in self.tf_durations_ns]
        self.first_maskable = [1] + [0] * (len(self.timeframes) - 1)
        target = self.mask_ratio * seq_len
        self.max_hidden = [
            max(1, min(math.ceil(target), seq_len - first)) for first in self.first_maskable
        ]
        self._device_constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # Device types on which ``_sync`` reads a count back to the host to narrow its search: free
    # on the CPU; on an accelerator it would wait for the queue at every batch.
    read_back_devices: tuple[str, ...] = ("cpu",)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``first_maskable``, ``max_hidden``, ``span_scale`` and the durations on ``device``,
        made once: a copy from a host list to a GPU would wait for its queue at every batch."""
        if device not in self._device_constants:
            self._device_constants[device] = (
                torch.tensor(self.first_maskable, dtype=torch.int32, device=device)[:, None],
                torch.tensor(self.max_hidden, dtype=torch.int32, device=device)[:, None],
                torch.tensor(self.span_scale, dtype=torch.float64, device=device)[:, None],
                torch.tensor(self.tf_durations_ns, device=device)[:, None],
            )
        return self._device_constants[device]

    def span_bounds(self, k: int) -> tuple[int, int]:
        """Shortest and longest span of timeframe ``k``, in its own bars (before clipping)."""
        lo, hi = (self._to_tf_bars(n, k) for n in (self.span_min_bars, self.span_max_bars))
        return lo, hi

    def _to_tf_bars(self, base_bars: int, k: int) -> int:
        return max(1, round(base_bars * self.span_scale[k]))

    def generate(
        self,
        times: torch.Tensor,
        generator: torch.Generator | None = None,
        sync: bool | None = None,
        right_edge: float | None = None,
        parents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masks for a batch: ``times`` int64 ``[B, n_tf, seq_len]`` (bar open, UTC ns) →
        bool ``[B, n_tf, seq_len]`` on ``times.device``, True = hidden.

        ``sync=None`` uses ``masking.sync_tf``, ``right_edge=None`` uses
        ``masking.right_edge_ratio``; ``generator`` must live on ``times.device``.
        ``parents``: the batch's ``parents`` when it has them (nesting timeframes, see the
        class doc; ``DeviceBatchBuilder.parents``); without them the sync searches the times.
        """
        batch, n_tf, length = times.shape
        if n_tf != len(self.timeframes) or length != self.seq_len:
            raise ValueError(
                f"times must be [B, {len(self.timeframes)}, {self.seq_len}], got {tuple(times.shape)}"
            )
        device = times.device

        # Slot-major layout [slot, n_tf, B]: every op below runs along the batch, contiguous,
        # and broadcasts over slots and timeframes (in [B, n_tf, slot] the tiny last dimension
        # made the ~30 small ops 2-4x slower on the CPU). Counts and positions in int32 (all
        # < 2 * seq_len): half the bytes of int64. No sort; one draw of uniforms.
        first, cap, scale, _ = self._constants(device)  # [n_tf, 1] each
        n_spans = max(self.max_hidden)  # K spans always cover the budget (each >= 1 bar)
        draws = torch.rand(2 * n_spans + 4, n_tf, batch, generator=generator, device=device)
        base_draw, cut_draw = draws[:n_spans], draws[n_spans : 2 * n_spans + 1]
        budget_draw, swap_draw, edge_draw = draws[-3], draws[-2], draws[-1]
        target = self.mask_ratio * length
        n_hidden = (math.floor(target) + (budget_draw < target % 1).int()).clamp(min=1)
        n_hidden = torch.minimum(n_hidden, cap)  # [n_tf, B]

        # Span lengths in each timeframe's bars, iid, the one that meets the budget clipped:
        # the real spans are the first m slots.
        width = self.span_max_bars - self.span_min_bars + 1
        base_len = self.span_min_bars + (base_draw * width).int()
        span = torch.round(base_len * scale).int().clamp(min=1)  # [K, n_tf, B]
        before = span.cumsum(0, dtype=torch.int32) - span
        span = torch.minimum(span, n_hidden - before).clamp(min=0)
        n_real = (span > 0).sum(0, dtype=torch.int32)  # m >= 1
        # The clipped span swaps places with a uniform one of the m: the unclipped spans are
        # exchangeable, so this orders the spans as a full shuffle would.
        slot = torch.arange(n_spans, device=device, dtype=torch.int32)[:, None, None]
        last = n_real - 1
        swap = (swap_draw * n_real).int()
        order = torch.where(slot == swap, last, torch.where(slot == last, swap, slot))
        span = span.gather(0, order.long())

        # Place the spans in order with random free gaps: m sorted uniform cut points of the
        # free bars, as the normalised partial sums of m + 1 exponential draws (their order
        # statistics; floor keeps the order); one separating bar between spans keeps them
        # apart when there is room.
        room = length - first - n_hidden  # [n_tf, B], >= 0
        sep = (room - last >= 0).int()
        free = room - sep * last
        sums = torch.log1p(-cut_draw).neg_().cumsum(0)  # [K + 1, n_tf, B]
        cuts = sums[:n_spans] / sums.gather(0, n_real[None].long())
        gaps = torch.minimum((cuts * (free + 1)).int(), free)
        edge_ratio = self.right_edge_ratio if right_edge is None else float(right_edge)
        if edge_ratio > 0:
            # The newest span ends at the newest bar when its gap is maximal.
            gaps = torch.where((edge_draw < edge_ratio) & (slot == last), free, gaps)
        is_span = (slot < n_real).int()
        start = first + gaps + (span.cumsum(0, dtype=torch.int32) - span) + sep * slot
        # The span edges per (timeframe, window) row, slots last (a stack of the slot planes is
        # the cheap transpose); an end at the newest bar has no edge (the window ends there).
        end = start + span
        start, end, is_span = (torch.stack(x.unbind(0), -1) for x in (start, end, is_span))
        edges = torch.zeros(n_tf, batch, length, dtype=torch.int32, device=device)
        edges.scatter_add_(-1, start.clamp(max=length - 1).long(), is_span)
        edges.scatter_add_(-1, end.clamp(max=length - 1).long(), -is_span * (end < length))
        masks = (edges.cumsum(-1, dtype=torch.int32) > 0).transpose(0, 1).contiguous()

        if not (self.sync_tf if sync is None else sync):
            return masks
        if parents is not None:
            return self._sync_parents(masks, parents)
        return self._sync(masks, times)

    @staticmethod
    def _sync_parents(masks: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """The sync on nesting timeframes: each timeframe, once final, hides the parents of
        its hidden bars in the next (``parents`` int64 ``[B, n_tf - 1, L]``, ``L`` = none).
        Hidden children are counted per parent (a scatter-add of int32 is ~2x a where and a
        scatter of bools on the CPU)."""
        masks = masks.clone()
        batch, n_tf, length = masks.shape
        children = torch.zeros(batch, length + 1, dtype=torch.int32, device=masks.device)
        for k in range(n_tf - 1):
            children.scatter_add_(-1, parents[:, k], masks[:, k].int())
            masks[:, k + 1] |= children[:, :length] > 0
            children.zero_()
        return masks

    def _sync(self, masks: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Hide every coarser bar that overlaps a hidden finer bar (bars are [open, open + d)).

        Fine timeframes in order: once timeframe ``k``'s masks are final (every finer one has
        added to them), one search over its opens finds, for every coarser position it can
        touch, the fine bars overlapping it; those with a hidden one are hidden. A coarse bar
        can only overlap a finer window's bars if it closes after that window's oldest open;
        windows end at one anchor, so those are each coarse window's newest positions. On the
        CPU (``read_back_devices``) only the newest positions that this holds for in some
        window of the batch are searched (where they start is read back, free there): about a
        fifth of the work for the usual timeframes, and the same result, since older positions
        overlap no finer bar. Other devices search every position.
        """
        masks = masks.clone()
        batch, n_tf, length = masks.shape
        if batch == 0:
            return masks
        narrow = masks.device.type in self.read_back_devices
        starts = self._overlap_starts(times) if narrow else [[0] * n_tf] * n_tf
        durations = self._constants(masks.device)[3]  # [n_tf, 1]
        ends = times + durations  # [B, n_tf, L]: each bar's close, the hi queries
        before = torch.zeros(batch, length + 1, dtype=torch.long, device=masks.device)
        for k in range(n_tf - 1):
            coarse = [j for j in range(k + 1, n_tf) if starts[k][j] < length]
            if not coarse:
                continue
            # Fine bars overlapping the coarse bar [o, o + d_j): open in (o - d_k, o + d_j),
            # rows [lo, hi) with lo = #(opens < o - d_k + 1) and hi = #(opens < o + d_j).
            bounds = torch.cat(
                [times[:, j, starts[k][j] :] for j in coarse]
                + [ends[:, j, starts[k][j] :] for j in coarse],
                -1,
            )
            width = bounds.shape[1] // 2
            bounds[:, :width] += 1 - self.tf_durations_ns[k]
            rows = torch.searchsorted(times[:, k].contiguous(), bounds)
            torch.cumsum(masks[:, k], -1, out=before[:, 1:])  # hidden bars before each row
            counts = before.gather(-1, rows)
            hit = counts[:, width:] > counts[:, :width]
            first = 0
            for j in coarse:
                n = length - starts[k][j]
                masks[:, j, starts[k][j] :] |= hit[:, first : first + n]
                first += n
        return masks

    def _overlap_starts(self, times: torch.Tensor) -> list[list[int]]:
        """``starts[k][j]``: the oldest position of timeframe ``j`` whose bar, in some window of
        the batch, closes after that window's oldest bar of timeframe ``k`` opens (one search,
        read back)."""
        durations = self._constants(times.device)[3]  # [n_tf, 1]
        oldest = times[:, :, 0].contiguous()  # [B, k]
        reach = oldest[:, None, :] - durations[None]  # [B, j, k]
        starts = torch.searchsorted(times, reach, right=True).amin(0)  # [j, k]
        return starts.T.tolist()


def evaluation_masking(
    config: ConfigLike, timeframes: Sequence[str], seq_len: int
) -> MaskingStrategy:
    """The masks ``stage1 evaluate`` and validation score on: the training spans and sync rule
    with ``evaluation.mask_ratio`` (when set) as the hidden share."""
    config = as_config(config)
    return MaskingStrategy(config.masking, timeframes, seq_len, config.evaluation.mask_ratio)
