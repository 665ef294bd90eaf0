"""Stage1CombinedLoss and its parts: zero at the truth, growth with error, fp32 spectra under
autocast, and cross-timeframe aggregation over real bar boundaries."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from stage1 import load_config
from stage1.data.timeframes import tf_minutes, tf_ns
from stage1.losses import (
    AmplitudePhaseCorrelationLoss,
    CrossTFConsistencyLoss,
    HuberLoss,
    Stage1CombinedLoss,
    STFTLoss,
)

TIMEFRAMES = ["m1", "m5", "m15", "h1"]
SEQ_LEN = 32
PARTS = ("huber", "stft", "cross_tf", "amp_phase")  # reconstruction terms


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def m1_bars(n_rows: int, seed: int) -> pd.DataFrame:
    """Random-walk M1 OHLC bars with ~5 % of minutes missing (gaps stay gaps)."""
    rng = np.random.default_rng(seed)
    index = pd.date_range("2024-03-04 00:00", periods=n_rows, freq="1min", tz="UTC")
    close = 150.0 * np.exp(np.cumsum(rng.normal(0, 2e-4, n_rows)))
    open_ = np.concatenate([[150.0], close[:-1]]) * np.exp(rng.normal(0, 2e-5, n_rows))
    wick = np.abs(rng.normal(0, 1e-4, (2, n_rows))) * close
    bars = pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) + wick[0],
            "low": np.minimum(open_, close) - wick[1],
            "close": close,
        },
        index=index,
    )
    return bars[rng.random(n_rows) > 0.05]


def aggregate(m1: pd.DataFrame, tf: str) -> pd.DataFrame:
    """OHLC bars of ``tf`` labelled by open time, empty bins dropped (the prepare contract)."""
    rule = f"{tf_minutes(tf)}min"
    agg = {"open": "first", "high": "max", "low": "min", "close": "last"}
    return m1.resample(rule, label="left", closed="left").agg(agg).dropna()


def real_windows(n_windows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows as the sampler builds them, straight from pandas: for each anchor (the close of a
    base bar) every timeframe holds its SEQ_LEN newest bars complete at the anchor.

    Returns log(price / ref) OHLC ``[B, n_tf, L, 4]`` (float64; ref = the base window's first
    open) and bar open times int64 ns ``[B, n_tf, L]``.
    """
    m1 = m1_bars(4000, seed)
    frames = [m1] + [aggregate(m1, tf) for tf in TIMEFRAMES[1:]]
    opens = [frame.index.as_unit("ns").asi8 for frame in frames]
    rng = np.random.default_rng(seed)
    anchor_rows = rng.choice(np.arange(len(m1) - 1000, len(m1)), n_windows, replace=False)
    prices, times = [], []
    for row in anchor_rows:
        anchor = opens[0][row] + tf_ns("m1")
        window_prices, window_times = [], []
        for tf, frame, open_ns in zip(TIMEFRAMES, frames, opens, strict=True):
            end = np.searchsorted(open_ns + tf_ns(tf), anchor, side="right")
            window_prices.append(frame.to_numpy()[end - SEQ_LEN : end])
            window_times.append(open_ns[end - SEQ_LEN : end])
        ref = window_prices[0][0, 0]
        prices.append(np.log(np.stack(window_prices) / ref))
        times.append(np.stack(window_times))
    return torch.tensor(np.stack(prices)), torch.tensor(np.stack(times))


def features_from_prices(prices: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` log OHLC -> ``[..., 6]`` features (delta_close and body_ratio appended)."""
    close = prices[..., 3]
    delta = torch.cat([close[..., :1] - prices[..., :1, 0], close.diff(dim=-1)], dim=-1)
    body = (prices[..., 3] - prices[..., 0]) / (prices[..., 1] - prices[..., 2]).clamp(min=1e-9)
    return torch.cat([prices, delta.unsqueeze(-1), body.unsqueeze(-1)], dim=-1)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Normalised targets from real-time windows, their stats, masks and times."""
    prices, times = real_windows(6)
    features = features_from_prices(prices)
    mean = features.mean(dim=(0, 2))
    std = features.std(dim=(0, 2))
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(features.shape[:-1], generator=gen) < 0.2
    masks[:, :, 5:9] = True
    return {
        "targets": ((features - mean[:, None]) / std[:, None]).float(),
        "mean": mean.float(),
        "std": std.float(),
        "masks": masks,
        "times": times,
    }


def make_loss(batch: dict[str, torch.Tensor], *overrides: str) -> Stage1CombinedLoss:
    timeframes = f"data.timeframes=[{','.join(TIMEFRAMES)}]"
    config = load_config(
        "configs/test.yaml",
        [timeframes, f"data.seq_len={SEQ_LEN}", "loss.stft_fft_sizes=[8,16,32]", *overrides],
    )
    return Stage1CombinedLoss(config, batch["mean"], batch["std"])


def noise_like(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def test_every_loss_is_zero_for_a_perfect_prediction(batch: dict[str, torch.Tensor]) -> None:
    targets = batch["targets"]
    reconstructed = targets.clone().requires_grad_(True)
    losses = make_loss(batch)(reconstructed, targets, batch["masks"], batch["times"])
    assert set(losses) == {"total", *PARTS, "forecast"}  # forecast: 0 without a forecast head
    for name, value in losses.items():
        assert value.dtype == torch.float32 and value.ndim == 0, name
        assert abs(value.item()) < 1e-5, f"{name} = {value.item()}"
    # Gradients at the optimum stay finite (sqrt, log and norms all have floors).
    losses["total"].backward()
    assert reconstructed.grad is not None and torch.isfinite(reconstructed.grad).all()


def test_every_loss_grows_with_the_error(batch: dict[str, torch.Tensor]) -> None:
    targets, criterion = batch["targets"], make_loss(batch)
    noise = noise_like(targets)
    values = {name: [] for name in ("total", *PARTS, "forecast")}
    for scale in (0.02, 0.1, 0.5, 2.0):
        losses = criterion(targets + scale * noise, targets, batch["masks"], batch["times"])
        for name, value in losses.items():
            values[name].append(value.item())
    assert values.pop("forecast") == [0.0] * 4  # no forecast given
    for name, series in values.items():
        assert series[0] > 0, f"{name} is zero for a wrong prediction"
        assert all(a < b for a, b in itertools.pairwise(series)), f"{name} does not grow: {series}"


def test_total_is_the_configured_weighted_sum(batch: dict[str, torch.Tensor]) -> None:
    weights = {"huber": 0.5, "stft": 0.3, "cross_tf": 2.0, "amp_phase": 0.7}
    criterion = make_loss(batch, *(f"loss.weights.{k}={v}" for k, v in weights.items()))
    targets = batch["targets"]
    losses = criterion(targets + 0.3 * noise_like(targets), targets, batch["masks"], batch["times"])
    expected = sum(weights[name] * losses[name] for name in PARTS)
    torch.testing.assert_close(losses["total"], expected)


def test_shipped_default_weights(batch: dict[str, torch.Tensor]) -> None:
    """The hidden-bar term alone, L1-like: what the measurements support (docs/RESULTS.md)."""
    assert make_loss(batch).weights == {
        "huber": 1.0,
        "stft": 0.0,
        "cross_tf": 0.0,
        "amp_phase": 0.0,
        "forecast": 0.0,
    }
    assert make_loss(batch).huber.delta == 0.01


def test_huber_counts_only_hidden_positions_by_default() -> None:
    targets = torch.zeros(2, 3, 8, 6)
    masks = torch.zeros(2, 3, 8, dtype=torch.bool)
    masks[0, 1, 2:4] = True
    visible_error = targets + (~masks).unsqueeze(-1) * 0.5
    assert HuberLoss()(visible_error, targets, masks).item() == 0.0
    # With a weight on visible bars they count; the mean is over all weighted elements.
    per_element = F.huber_loss(torch.tensor(0.5), torch.tensor(0.0)).item()
    n_visible, n_hidden = (~masks).sum().item(), masks.sum().item()
    expected = 0.25 * n_visible * per_element / (0.25 * n_visible + n_hidden)
    assert HuberLoss(unmasked_weight=0.25)(visible_error, targets, masks).item() == pytest.approx(
        expected
    )
    # Hidden error: mean over the hidden elements, whatever the number of visible ones.
    hidden_error = targets + masks.unsqueeze(-1) * 3.0
    expected_hidden = F.huber_loss(torch.tensor(3.0), torch.tensor(0.0), delta=2.0).item()
    assert HuberLoss(delta=2.0)(hidden_error, targets, masks).item() == pytest.approx(
        expected_hidden
    )


def test_huber_without_hidden_bars_is_zero_not_nan() -> None:
    reconstructed = torch.randn(2, 3, 8, 6, requires_grad=True)
    loss = HuberLoss()(
        reconstructed, torch.zeros(2, 3, 8, 6), torch.zeros(2, 3, 8, dtype=torch.bool)
    )
    loss.backward()
    assert loss.item() == 0.0 and reconstructed.grad is not None
    assert torch.isfinite(reconstructed.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stft_loss_runs_fp32_dfts_under_autocast(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.dtype] = []
    real_spectrum = STFTLoss._spectrum

    def spy(self: STFTLoss, series: torch.Tensor, n_fft: int) -> torch.Tensor:
        out = real_spectrum(self, series, n_fft)
        seen.extend([series.dtype, out.dtype])
        return out

    monkeypatch.setattr(STFTLoss, "_spectrum", spy)
    layer = torch.nn.Linear(6, 6)
    inputs, targets = torch.randn(4, 2, 32, 6), torch.randn(4, 2, 32, 6)
    loss_fn = STFTLoss([8, 16, 32])
    with torch.autocast("cpu", dtype=dtype):
        reconstructed = layer(inputs)
        loss = loss_fn(reconstructed, targets)
    assert reconstructed.dtype == dtype  # the input really is half precision
    assert seen and set(seen) == {torch.float32}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    # Same value as an fp32 run on the same (rounded) inputs.
    torch.testing.assert_close(loss, loss_fn(reconstructed.detach().float(), targets))


@pytest.mark.parametrize("n_fft", [2, 8, 12, 16, 32, 48])
def test_dft_spectrum_equals_torch_stft(n_fft: int) -> None:
    """The matmul STFT is torch.stft's (Hann, centred, reflect-padded, hop n_fft // 4)."""
    series = torch.randn(64, 48, dtype=torch.float64).float()
    loss_fn = STFTLoss([n_fft])
    spec = torch.stft(
        series.double(), n_fft, hop_length=max(n_fft // 4, 1), win_length=n_fft,
        window=torch.hann_window(n_fft, dtype=torch.float64), center=True, pad_mode="reflect",
        return_complex=True,
    )  # fmt: skip
    expected = spec.abs().clamp(min=1e-4).transpose(-1, -2).float()
    actual = loss_fn._spectrum(series, n_fft).clamp(min=1e-4)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_stft_skips_fft_sizes_longer_than_the_sequence() -> None:
    reconstructed, targets = torch.randn(2, 2, 16, 6), torch.randn(2, 2, 16, 6)
    fitting = STFTLoss([4, 8])(reconstructed, targets)
    torch.testing.assert_close(STFTLoss([4, 8, 64])(reconstructed, targets), fitting)
    assert STFTLoss([32, 64])(reconstructed, targets).item() == 0.0


def test_stft_bases_are_buffers_outside_the_state_dict() -> None:
    loss_fn = STFTLoss([8, 16])
    buffers = dict(loss_fn.named_buffers())
    assert set(buffers) == {"basis_8", "basis_16"}
    assert buffers["basis_16"].shape == (16, 18) and buffers["basis_16"].dtype == torch.float32
    assert not loss_fn.state_dict()  # non-persistent: checkpoints are unchanged


def test_stft_matches_spectral_convergence_and_log_magnitude_by_hand() -> None:
    """One size, one series: ||S_t - S_r|| / ||S_t|| + mean |log S_t - log S_r|."""
    target = torch.sin(torch.arange(16.0)).view(1, 1, 16, 1).expand(1, 1, 16, 6)
    reconstructed = target * 0.5 + 0.1

    def spec(x: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(8)
        stft = torch.stft(x[0, 0, :, 0], 8, hop_length=2, window=window, return_complex=True)
        return stft.abs().clamp(min=1e-4)

    s_t, s_r = spec(target), spec(reconstructed)
    expected = (s_t - s_r).norm() / s_t.norm() + (s_t.log() - s_r.log()).abs().mean()
    torch.testing.assert_close(STFTLoss([8])(reconstructed, target), expected, rtol=1e-4, atol=1e-5)


def reference_cross_tf(
    reconstructed: torch.Tensor, times: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> float:
    """Bar-by-bar loop version of the cross-timeframe loss (the definition, spelled out)."""
    prices = reconstructed[..., :4] * std[:, None, :4] + mean[:, None, :4]
    total, count = 0.0, 0
    for b in range(prices.shape[0]):
        base_open = times[b, 0]
        window_start, window_end = base_open[0].item(), base_open[-1].item() + tf_ns(TIMEFRAMES[0])
        for k in range(1, len(TIMEFRAMES)):
            for j in range(prices.shape[2]):
                bar_open, bar_end = (
                    times[b, k, j].item(),
                    times[b, k, j].item() + tf_ns(TIMEFRAMES[k]),
                )
                members = ((base_open >= bar_open) & (base_open < bar_end)).nonzero().flatten()
                if bar_open < window_start or bar_end > window_end or len(members) == 0:
                    continue
                base = prices[b, 0, members]
                aggregated = torch.stack(
                    [base[0, 0], base[:, 1].max(), base[:, 2].min(), base[-1, 3]]
                )
                error = (aggregated - prices[b, k, j]) / std[k, :4]
                total += F.huber_loss(error, torch.zeros(4), reduction="mean").item()
                count += 1
    assert count > 0, "the fixture must contain covered coarse bars"
    return total / count


def cross_tf_loss(batch: dict[str, torch.Tensor]) -> CrossTFConsistencyLoss:
    return CrossTFConsistencyLoss(TIMEFRAMES, batch["mean"], batch["std"])


def test_cross_tf_is_zero_when_bars_aggregate_exactly(batch: dict[str, torch.Tensor]) -> None:
    loss = cross_tf_loss(batch)(batch["targets"], batch["times"])
    assert abs(loss.item()) < 1e-6


def test_cross_tf_matches_the_bar_by_bar_definition(batch: dict[str, torch.Tensor]) -> None:
    reconstructed = batch["targets"] + 0.3 * noise_like(batch["targets"])
    loss = cross_tf_loss(batch)(reconstructed, batch["times"])
    expected = reference_cross_tf(reconstructed, batch["times"], batch["mean"], batch["std"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cross_tf_ignores_coarse_bars_the_base_window_does_not_cover(
    batch: dict[str, torch.Tensor],
) -> None:
    """The oldest coarse bars start before the base window; changing them changes nothing,
    while changing a covered one does."""
    targets, times = batch["targets"], batch["times"]
    loss_fn = cross_tf_loss(batch)
    uncovered = targets.clone()
    uncovered[:, 1:, :5] += 1.0  # m5/m15/h1 bars opened far before the 32-minute base window
    assert (times[:, 1:, 4] < times[:, :1, 0]).all()
    assert abs(loss_fn(uncovered, times).item()) < 1e-6
    covered = targets.clone()
    covered[:, 1, -1, 1] += 1.0  # newest m5 high: inside the base window
    assert loss_fn(covered, times).item() > 1e-3


def test_cross_tf_is_zero_with_a_gradient_when_nothing_is_covered() -> None:
    reconstructed = torch.randn(2, 1, 8, 6, requires_grad=True)
    times = torch.arange(8).repeat(2, 1, 1) * tf_ns("m1")
    loss = CrossTFConsistencyLoss(["m1"])(reconstructed, times)
    loss.backward()
    assert loss.item() == 0.0 and reconstructed.grad is not None


def test_cross_tf_is_zero_without_times(batch: dict[str, torch.Tensor]) -> None:
    targets = batch["targets"]
    losses = make_loss(batch)(targets + noise_like(targets), targets, batch["masks"], times=None)
    assert losses["cross_tf"].item() == 0.0 and losses["total"].item() > 0


def test_amp_phase_on_a_batch_is_the_mean_over_its_windows() -> None:
    """Vectorised over the batch: no window's value depends on another window."""
    targets = torch.randn(5, 3, 32, 6).cumsum(dim=2)
    reconstructed = targets + torch.randn(5, 3, 32, 6)
    loss_fn = AmplitudePhaseCorrelationLoss()
    per_window = torch.stack(
        [loss_fn(reconstructed[i : i + 1], targets[i : i + 1]) for i in range(5)]
    )
    torch.testing.assert_close(loss_fn(reconstructed, targets), per_window.mean())


def test_amp_phase_penalises_a_phase_shift_that_keeps_amplitudes() -> None:
    """A circular shift keeps every FFT amplitude: only the phase term can see it."""
    targets = torch.randn(4, 2, 32, 6)
    shifted = targets.roll(5, dims=2)
    loss_fn = AmplitudePhaseCorrelationLoss()
    assert loss_fn(shifted, targets).item() > 0.1
    assert loss_fn(targets, targets).item() == pytest.approx(0.0, abs=1e-5)


def test_loss_inputs_must_match(batch: dict[str, torch.Tensor]) -> None:
    targets, criterion = batch["targets"], make_loss(batch)
    with pytest.raises(ValueError, match="do not match"):
        criterion(targets[:, :, :-1], targets, batch["masks"])
    with pytest.raises(ValueError, match="do not match"):
        criterion(targets, targets, batch["masks"], batch["times"][:, :2])


def test_norm_stats_must_have_one_row_per_timeframe() -> None:
    with pytest.raises(ValueError, match=r"norm_std: expected shape \(4, 6\)"):
        CrossTFConsistencyLoss(TIMEFRAMES, torch.zeros(4, 6), torch.ones(3, 6))
