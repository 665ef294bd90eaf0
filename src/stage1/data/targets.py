"""What comes after a window: the realised volatility and return of the next base bars.

These are LABELS, never inputs: the probe scores a representation against them, and the
optional forecast objective (``model.forecast_horizons``) trains a head on the pooled embedding
to predict them. Both read them through :func:`horizon_targets`, one rule for both.

The rule, for an anchor at base row ``e`` and a horizon of ``h`` bars: the ``h`` log close
returns after the anchor bar, ``r_i = log c[e + i] - log c[e + i - 1]`` for ``i = 1..h``; the
target is ``log sqrt(Σ r²)`` (log realised volatility) and ``Σ r`` (log return). It is valid
when those ``h`` bars exist in the anchor's instrument block (``e + h < row_end``), the last of
them opens within ``2 h`` bar durations of the anchor bar (no weekend or data gap swallowed) and
the realised volatility is positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch


def horizon_rows(end_rows: torch.Tensor, row_end: torch.Tensor, longest: int) -> torch.Tensor:
    """Rows ``e .. e + longest`` after each anchor row ``e`` (int64 ``[n, longest + 1]``),
    clipped to the last row of its block (``row_end - 1``) so every row can be gathered; the
    clipped ones are never valid in :func:`horizon_targets`."""
    steps = torch.arange(longest + 1, device=end_rows.device)
    return torch.minimum(end_rows[:, None] + steps, row_end[:, None] - 1)


def horizon_targets(
    log_close: torch.Tensor,
    open_ns: torch.Tensor,
    n_after: torch.Tensor,
    horizons: Sequence[int],
    bar_ns: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of each horizon from the bars gathered at :func:`horizon_rows`.

    log_close: float64 ``[n, longest + 1]`` (the anchor bar first); open_ns: int64, the same
    rows' open times; n_after: ``[n]`` bars that follow the anchor in its block
    (``row_end - 1 - e``); horizons: bars, each ``1 <= h <= longest``.

    Returns ``(log_vol, log_return, valid)``, each ``[n, len(horizons)]`` (float64, float64,
    bool); the values of invalid entries are 0.
    """
    hs = [int(h) for h in horizons]
    if not hs or min(hs) < 1 or max(hs) >= log_close.shape[1]:
        raise ValueError(
            f"horizons {list(horizons)} must lie in 1..{log_close.shape[1] - 1} (rows gathered)"
        )
    # One column per horizon, indexed by Python ints: nothing is copied to or read back from
    # the device (this runs in every training step of the forecast objective).
    cum_sq = torch.diff(log_close, dim=1).square().cumsum(dim=1)  # [n, longest]
    sum_sq = torch.stack([cum_sq[:, h - 1] for h in hs], dim=1)
    log_return = torch.stack([log_close[:, h] for h in hs], dim=1) - log_close[:, :1]
    gap_ok = torch.stack([open_ns[:, h] - open_ns[:, 0] <= 2 * h * bar_ns for h in hs], dim=1)
    in_block = torch.stack([n_after >= h for h in hs], dim=1)
    valid = in_block & gap_ok & (sum_sq > 0)
    log_vol = 0.5 * torch.log(torch.where(valid, sum_sq, torch.ones_like(sum_sq)))
    zero = torch.zeros_like(log_vol)
    return torch.where(valid, log_vol, zero), torch.where(valid, log_return, zero), valid


def gathered_targets(
    close: npt.ArrayLike,
    open_ns: npt.ArrayLike,
    end_rows: npt.ArrayLike,
    row_end: npt.ArrayLike,
    horizons: Sequence[int],
    bar_ns: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`horizon_targets` of the anchors at base rows ``end_rows``, their horizon bars
    gathered from host arrays (the base timeframe's closes and open times ``[rows]``, possibly
    memory-mapped); ``row_end``: the end of each anchor's instrument block. CPU tensors."""
    ends = torch.from_numpy(np.asarray(end_rows, dtype=np.int64))
    block_end = torch.from_numpy(np.asarray(row_end, dtype=np.int64))
    rows = horizon_rows(ends, block_end, max(horizons)).numpy()
    log_close = np.log(np.asarray(np.take(close, rows), dtype=np.float64))
    times = np.asarray(np.take(open_ns, rows), dtype=np.int64)
    return horizon_targets(
        torch.from_numpy(log_close), torch.from_numpy(times), block_end - 1 - ends, horizons, bar_ns
    )
