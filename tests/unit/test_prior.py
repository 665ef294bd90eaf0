"""The model's prior: the torch bridge equals the evaluation's NumPy bridge, and the fill, the
window scale and the centre read visible bars only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage1 import load_config
from stage1.data.features import FeatureEngineer
from stage1.data.io import aggregate_bars
from stage1.data.masking import MaskingStrategy
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.synthetic import generate_m1
from stage1.data.timeframes import tf_ns
from stage1.evaluation.agg import baseline_agg
from stage1.evaluation.baselines import baseline_bridge
from stage1.model import Stage1Model
from stage1.model.prior import (
    agg_fill,
    bridge_fill,
    last_visible_close,
    masked_median,
    visible_scale,
)

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


@pytest.fixture(scope="module")
def windows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw features, synchronised masks and times of 64 windows of synthetic bars."""
    config = load_config("configs/test.yaml")
    m1 = generate_m1(20_000, seed=3)
    data = {tf: m1 if tf == "m1" else aggregate_bars(m1, tf) for tf in TIMEFRAMES}
    sampler = MultiTFWindowSampler(data, seq_len=int(config.data.seq_len))
    ids = np.linspace(0, len(sampler) - 1, 64).astype(np.int64)
    ohlc, times = sampler.gather(ids)
    raw, _ = FeatureEngineer(config).process_batch(ohlc)
    masking = MaskingStrategy(config.masking, TIMEFRAMES, int(config.data.seq_len))
    generator = torch.Generator().manual_seed(0)
    masks = masking.generate(torch.from_numpy(times), generator, sync=True, right_edge=0.3)
    return raw.double(), masks, torch.from_numpy(times)


def test_torch_bridge_equals_the_evaluation_bridge(windows) -> None:
    raw, masks, _ = windows
    expected = np.stack(
        [baseline_bridge(raw[:, k].numpy(), masks[:, k].numpy()) for k in range(raw.shape[1])],
        axis=1,
    )
    # body_ratio is formed as expm1 products here, as exp differences there: 1e-7 apart
    np.testing.assert_allclose(bridge_fill(raw, masks).numpy(), expected, rtol=0, atol=1e-7)


def test_masked_median_matches_numpy_for_odd_and_even_counts() -> None:
    values = torch.tensor([[4.0, 1.0, 3.0, 2.0, 9.0], [5.0, 7.0, 1.0, 8.0, 0.0]])
    masks = torch.tensor([[False, False, False, False, True], [False, True, False, False, True]])
    expected = [np.median([4.0, 1.0, 3.0, 2.0]), np.median([5.0, 1.0, 8.0])]
    torch.testing.assert_close(
        masked_median(values, masks), torch.tensor(expected, dtype=torch.float32)
    )


def test_fill_scale_and_centre_read_visible_bars_only(windows) -> None:
    raw, masks, _ = windows
    tampered = raw.clone()
    tampered[masks] = torch.randn(int(masks.sum()), 6, dtype=raw.dtype) * 5.0
    for fn in (bridge_fill, visible_scale, last_visible_close):
        torch.testing.assert_close(fn(tampered, masks), fn(raw, masks), rtol=0, atol=0)
    # The check can fail: a visible bar does move the scale.
    visible = (~masks[0, 1]).nonzero()[0, 0]
    tampered[0, 1, visible, 1] += 0.01
    assert not torch.equal(visible_scale(tampered, masks), visible_scale(raw, masks))


def test_untrained_model_with_bridge_prior_reproduces_the_bridge(windows) -> None:
    raw, masks, _ = windows
    config = load_config("configs/test.yaml")
    model = Stage1Model(config).eval()
    mean, std = raw.mean(dim=(0, 2)).float(), raw.std(dim=(0, 2)).float()
    model.set_normalizer(mean, std)
    x = ((raw - mean[:, None, :].double()) / std[:, None, :].double()).float()
    with torch.no_grad():
        out = model(x, masks)["reconstructed"].double() * std[:, None, :] + mean[:, None, :]
    fill = bridge_fill(raw, masks)
    hidden = masks.unsqueeze(-1).expand_as(fill)
    torch.testing.assert_close(out[hidden], fill[hidden], rtol=0, atol=2e-5)


def test_torch_agg_equals_the_evaluation_agg(windows) -> None:
    raw, masks, times = windows
    expected, covered = baseline_agg(raw.numpy(), masks.numpy(), times.numpy(), TIMEFRAMES)
    assert covered[:, 1:].any(), "the fixture has covered coarse bars"
    durations = [tf_ns(tf) for tf in TIMEFRAMES]
    fill, source = agg_fill(raw, masks, times, durations)
    got = fill.numpy()
    own = torch.arange(len(TIMEFRAMES))[None, :, None].expand_as(masks)
    assert torch.equal(source < own, torch.from_numpy(covered)), "covered bars name a finer source"
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    # ...and it reads visible bars only
    tampered = raw.clone()
    tampered[masks] = torch.randn(int(masks.sum()), 6, dtype=raw.dtype) * 5.0
    np.testing.assert_array_equal(agg_fill(tampered, masks, times, durations)[0].numpy(), got)
