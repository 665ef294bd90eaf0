"""The forecast objective (``model.forecast_horizons``): its labels follow the probe's rule, come
only from bars after the anchor, never reach the model's input, stay inside the train split
(the embargo covers them), and the head and loss behave as documented."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule, build_sampler, build_splits, embargo_ns
from stage1.data.device_batch import DeviceBatchBuilder
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.targets import horizon_rows, horizon_targets
from stage1.data.timeframes import NS_PER_MINUTE
from stage1.errors import ConfigError
from stage1.evaluation.probe import probe_targets
from stage1.losses import forecast_loss
from stage1.model.model import Stage1Model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HORIZONS = [3, 10, 30]


def loop_targets(
    close: np.ndarray, open_ns: np.ndarray, end: int, row_end: int, h: int
) -> tuple[float, float] | None:
    """The documented rule, one anchor at a time: ``(log_vol, log_return)`` or None."""
    if end + h >= row_end or open_ns[end + h] - open_ns[end] > 2 * h * NS_PER_MINUTE:
        return None
    returns = np.diff(np.log(close[end : end + h + 1]))
    sum_sq = float((returns**2).sum())
    return (0.5 * math.log(sum_sq), float(returns.sum())) if sum_sq > 0 else None


def test_horizon_targets_follow_the_rule_anchor_by_anchor() -> None:
    rng = np.random.default_rng(0)
    n = 400
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    close[200:206] = close[200]  # a flat stretch: zero realised volatility
    open_ns = np.arange(n) * NS_PER_MINUTE
    open_ns[300:] += 90 * NS_PER_MINUTE  # a data gap
    block_end = np.where(np.arange(n) < 250, 250, n)  # two instrument blocks in one row space
    ends = np.arange(n - 1)
    rows = horizon_rows(torch.from_numpy(ends), torch.from_numpy(block_end[ends]), max(HORIZONS))
    log_vol, log_ret, valid = horizon_targets(
        torch.from_numpy(np.log(close[rows.numpy()])),
        torch.from_numpy(open_ns[rows.numpy()]),
        torch.from_numpy(block_end[ends] - 1 - ends),
        HORIZONS,
        NS_PER_MINUTE,
    )
    seen = {True: 0, False: 0}
    for i, end in enumerate(ends):
        for j, h in enumerate(HORIZONS):
            expected = loop_targets(close, open_ns, int(end), int(block_end[end]), h)
            seen[expected is not None] += 1
            assert bool(valid[i, j]) == (expected is not None), (end, h)
            if expected is not None:
                assert log_vol[i, j].item() == pytest.approx(expected[0], abs=1e-12)
                assert log_ret[i, j].item() == pytest.approx(expected[1], abs=1e-15)
            else:
                assert log_vol[i, j] == 0 and log_ret[i, j] == 0
    assert seen[True] > 500 and seen[False] > 50  # both kinds of anchors were exercised


def test_horizon_targets_read_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch builder computes the labels on the device every training step: no
    .item(), .cpu(), .tolist(), .numpy() or Python truth test of a tensor in them."""
    rows = torch.arange(64)[:, None] + torch.arange(max(HORIZONS) + 1)
    log_close = torch.log(100 + torch.rand(64 + max(HORIZONS), dtype=torch.float64))[rows]
    open_ns = (rows * NS_PER_MINUTE).long()
    n_after = torch.full((64,), max(HORIZONS))

    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> object:
        raise AssertionError("horizon_targets read a tensor back to the host")

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    log_vol, _, valid = horizon_targets(log_close, open_ns, n_after, HORIZONS, NS_PER_MINUTE)
    monkeypatch.undo()
    assert valid.all() and torch.isfinite(log_vol).all()


@pytest.fixture(scope="module")
def sampler(synthetic_data_dir: Path) -> MultiTFWindowSampler:
    return build_sampler(synthetic_data_dir, load_config("test"))


def test_batch_labels_are_the_probe_targets(sampler) -> None:
    ids = np.random.default_rng(1).choice(len(sampler), 500, replace=False)
    open_ns, ohlc = sampler.timeframe_bars(0)
    end_rows = sampler.end_rows[ids, 0]
    batch = DeviceBatchBuilder(sampler, horizons=HORIZONS).batch(ids)
    assert batch["future_log_vol"].shape == (500, len(HORIZONS))
    assert batch["future_log_vol"].dtype == torch.float32
    for j, h in enumerate(HORIZONS):
        log_vol, _, valid = probe_targets(ohlc[:, 3], open_ns, end_rows, h, NS_PER_MINUTE)
        assert valid.any() and not valid.all()
        assert np.array_equal(batch["future_valid"][:, j].numpy(), valid)
        np.testing.assert_allclose(batch["future_log_vol"][:, j].numpy(), log_vol, atol=1e-5)


def test_bars_after_the_anchor_change_the_labels_but_not_what_the_model_sees(
    synthetic_data_dir: Path,
) -> None:
    """Look-ahead: the labels read the bars after each anchor; the features, times and the
    model's outputs of the same windows do not change when those bars do."""
    config = load_config("test", ["model.forecast_horizons=[3,10,30]"])
    ids = 1000 + 200 * np.arange(64)  # apart: no window holds another's future bars
    batches, outputs = [], []
    for scramble in (False, True):
        sampler = build_sampler(synthetic_data_dir, config)
        if scramble:
            ends = sampler.end_rows[ids, 0]
            future = (ends[:, None] + np.arange(1, 31)).ravel()
            sampler._ohlc[0][future] *= 1 + np.linspace(0.001, 0.01, len(future))[:, None]
        batch = DeviceBatchBuilder(sampler, horizons=HORIZONS).batch(ids)
        torch.manual_seed(0)
        model = Stage1Model(config).eval()
        with torch.no_grad():
            out = model(batch["features"], None, batch["times"])
            outputs.append(out | {"forecast": model.forecast(out["encoded"])})
        batches.append(batch)
    for key in ("features", "times", "ref_price"):
        assert torch.equal(batches[0][key], batches[1][key]), key
    for key in ("encoded", "reconstructed", "forecast"):
        assert torch.equal(outputs[0][key], outputs[1][key]), key
    changed = (batches[0]["future_log_vol"] != batches[1]["future_log_vol"]).any(dim=1)
    assert changed.float().mean() > 0.9


def test_the_embargo_covers_the_longest_forecast_horizon(synthetic_data_dir: Path) -> None:
    """No train window's labels reach the val split: the embargo grows to twice the longest
    horizon (the label rule's gap allowance) when that exceeds the window span."""
    short = ["data.timeframes=[m1,m5,m15]"]  # a short window span: the horizon decides
    plain = load_config("test", short)
    horizon = int(0.6 * embargo_ns(plain) / NS_PER_MINUTE)  # 2 x horizon > the window span
    config = load_config("test", [*short, f"model.forecast_horizons=[5,{horizon}]"])
    assert embargo_ns(config) == 2 * horizon * NS_PER_MINUTE > embargo_ns(plain)
    sampler = build_sampler(synthetic_data_dir, config)
    splits = build_splits(sampler, config)
    builder = DeviceBatchBuilder(sampler, horizons=[horizon])
    train = splits["train"][-3000:]  # the windows nearest the boundary
    _, valid = builder.future(torch.from_numpy(train))
    assert valid.any()
    last_label_row = sampler.end_rows[train[valid[:, 0].numpy()], 0] + horizon
    open_ns, _ = sampler.timeframe_bars(0)
    first_val_bar = sampler.first_open_ns(splits["val"]).min()
    assert open_ns[last_label_row].max() < first_val_bar


def test_forecast_head_starts_at_the_typical_volatility_and_trains_the_encoder() -> None:
    config = load_config("test", ["model.forecast_horizons=[4,16]"])
    model = Stage1Model(config)
    std = torch.full((len(config.data.timeframes), 6), 2e-4)
    model.set_normalizer(torch.zeros_like(std), std)
    n_tf, seq_len = len(config.data.timeframes), int(config.data.seq_len)
    x = torch.randn(8, n_tf, seq_len, 6)
    forecast = model.forecast(model.encode(x))
    expected = torch.log(torch.tensor(2e-4)) + 0.5 * torch.log(torch.tensor([4.0, 16.0]))
    torch.testing.assert_close(forecast, expected.expand(8, 2))
    # Zero-initialised head: the first step moves the head, then the gradient reaches the encoder.
    target = forecast.detach() + torch.randn(8, 2)
    loss = forecast_loss(forecast, target, torch.ones(8, 2, dtype=torch.bool))
    loss.backward()
    assert model.forecast_head is not None and model.forecast_head.weight.grad is not None
    assert model.forecast_head.weight.grad.abs().sum() > 0


def test_forecast_horizons_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"model\.forecast_horizons"):
        Stage1Model(load_config("test", ["model.forecast_horizons=[0,5]"]))


def test_forecast_loss_scores_valid_entries_only() -> None:
    predicted = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.5, 0.0], [3.0, 2.0]])
    valid = torch.tensor([[True, False], [True, True]])
    assert forecast_loss(predicted, target, valid).item() == pytest.approx((0.25 + 0 + 4) / 3)
    moved = predicted.clone()
    moved[0, 1] = 100.0  # an invalid entry: no effect
    assert forecast_loss(moved, target, valid) == forecast_loss(predicted, target, valid)
    assert forecast_loss(predicted, target, torch.zeros_like(valid)).item() == 0.0


def test_training_batches_carry_labels_only_with_a_forecast_head(synthetic_data_dir) -> None:
    short = ["data.timeframes=[m1,m5,m15]"]  # three weeks of bars fit three splits
    for overrides, expected in ((short, False), ([*short, "model.forecast_horizons=[5]"], True)):
        module = Stage1DataModule(synthetic_data_dir, load_config("test", overrides))
        module.setup()
        batch = module.on_after_batch_transfer({"window_ids": torch.arange(4)}, 0)
        assert ("future_log_vol" in batch) == expected
