"""Stage1Encoder: the engine's pooled embedding from raw windows, frozen means frozen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stage1.errors import ConfigError
from stage1.inference import Stage1InferenceEngine
from stage1.rl import Stage1Encoder


@pytest.mark.parametrize("pool", ["mean", "last", "flatten"])
def test_output_equals_the_engines_pooled_embedding(
    checkpoint: Path,
    engine: Stage1InferenceEngine,
    frames: dict[str, pd.DataFrame],
    anchors: pd.DatetimeIndex,
    pool: str,
    tol: dict[str, float],
) -> None:
    encoder = Stage1Encoder.from_checkpoint(checkpoint, pool=pool, device="cpu")
    sampler = engine.build_sampler(frames)
    ids = np.arange(1000, 1040)
    ohlc, _ = sampler.gather(ids)
    _, expected = engine.encode(frames, start=anchors[1000], end=anchors[1039], pool=pool)
    out = encoder(torch.from_numpy(ohlc))
    assert out.shape == (40, encoder.dim) == expected.shape
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, **tol)
    # numpy input, and prices divided by a constant per window (features are scale-free).
    np.testing.assert_allclose(encoder(ohlc / 7.0).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_frozen_encoder_stays_in_eval_mode_without_gradients(checkpoint: Path, frames) -> None:
    encoder = Stage1Encoder.from_checkpoint(checkpoint, device="cpu")
    assert encoder.frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    holder = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.dim, 1))
    holder.train()  # what an RL library does before an update
    assert holder[1].training and encoder.training
    assert not any(m.training for m in encoder.model.modules())
    ohlc = encoder.engine.build_sampler(frames).gather([100, 101])[0]
    out = holder(torch.from_numpy(ohlc))
    out.sum().backward()
    assert all(p.grad is None for p in encoder.parameters())


def test_unfrozen_encoder_trains(checkpoint: Path, frames) -> None:
    encoder = Stage1Encoder.from_checkpoint(checkpoint, freeze=False, device="cpu")
    encoder.train()
    assert all(m.training for m in encoder.model.modules())
    ohlc = encoder.engine.build_sampler(frames).gather([100, 101])[0]
    encoder(ohlc).sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_bad_input_is_one_clear_error(checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="pool: 'max' is not one of"):
        Stage1Encoder.from_checkpoint(checkpoint, pool="max", device="cpu")
    encoder = Stage1Encoder.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(ValueError, match=r"ohlc: expected \[B, 6, 16, 4\].*got \(2, 6, 15, 4\)"):
        encoder(np.ones((2, 6, 15, 4)))
