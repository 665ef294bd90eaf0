"""Masking: which bars are hidden from the model, and what the model may see of the rest."""

from __future__ import annotations

import torch

from stage1.data.features import DELTA_CLOSE


def mask_model_input(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """What the model may see: hidden bars zeroed, and ``delta_close`` zeroed on every bar
    whose predecessor is hidden (it is that hidden close's difference to a visible close).

    features: ``[..., n_tf, seq_len, 6]`` (normalised); masks: bool ``[..., n_tf, seq_len]``,
    True = hidden. Returns a new tensor; visible values are unchanged otherwise.
    """
    if features.shape[:-1] != masks.shape:
        raise ValueError(f"masks {tuple(masks.shape)} do not match features {tuple(features.shape)}")
    prev_hidden = torch.zeros_like(masks)
    prev_hidden[..., 1:] = masks[..., :-1]
    out = features.masked_fill(masks.unsqueeze(-1), 0.0)
    delta = out[..., DELTA_CLOSE].masked_fill(prev_hidden, 0.0)
    return torch.cat([out[..., :DELTA_CLOSE], delta.unsqueeze(-1), out[..., DELTA_CLOSE + 1 :]], -1)
