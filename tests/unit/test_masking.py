"""MaskingStrategy and mask_model_input: ratios, spans, sync, and nothing hidden reaches the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stage1.config import load_config
from stage1.data.device_batch import DeviceBatchBuilder
from stage1.data.features import DELTA_CLOSE, FeatureEngineer
from stage1.data.io import load_tf_data
from stage1.data.masking import MaskingStrategy, evaluation_masking, mask_model_input
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.timeframes import tf_ns
from stage1.errors import ConfigError

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


@pytest.fixture(scope="module")
def frames(synthetic_data_dir: Path):
    return load_tf_data(synthetic_data_dir, TIMEFRAMES)


def window_times(frames, seq_len: int, n: int = 4096) -> torch.Tensor:
    sampler = MultiTFWindowSampler(frames, seq_len)
    ids = np.random.default_rng(0).choice(len(sampler), size=min(n, len(sampler)), replace=False)
    return torch.from_numpy(sampler.gather(ids)[1])


def strategy(seq_len: int, *overrides: str) -> MaskingStrategy:
    """The per-timeframe span draw alone (sync and right-edge spans are tested on their own)."""
    base = [f"data.seq_len={seq_len}", "masking.sync_tf=false", "masking.right_edge_ratio=0"]
    cfg = load_config("test", [*base, *overrides])
    return MaskingStrategy(cfg.masking, cfg.data.timeframes, seq_len)


def runs(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden runs of a bool ``[N, L]`` array: (row of each run, its length)."""
    padded = np.pad(masks.astype(np.int8), ((0, 0), (1, 1)))
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, ends - starts


def test_shape_dtype_device_and_base_reference_visible(frames) -> None:
    times = window_times(frames, 16, 512)
    masks = strategy(16).generate(times, torch.Generator().manual_seed(0))
    assert masks.shape == times.shape and masks.dtype == torch.bool
    assert masks.device == times.device
    assert not masks[:, 0, 0].any()  # the reference price is never hidden
    assert masks.any(-1).all()  # at least one hidden bar per timeframe and window


@pytest.mark.parametrize(
    ("seq_len", "ratio"), [(16, 0.15), (48, 0.15), (48, 0.3), (16, 0.05), (32, 0.5)]
)
def test_realised_ratio_is_the_target(frames, seq_len: int, ratio: float) -> None:
    times = window_times(frames, seq_len)
    masks = strategy(seq_len, f"masking.mask_ratio={ratio}").generate(
        times, torch.Generator().manual_seed(1)
    )
    realised = masks.float().mean(dim=(0, 2))
    assert torch.all((realised - max(ratio, 1 / seq_len)).abs() <= 0.02), realised


@pytest.mark.parametrize(("seq_len", "span"), [(16, (2, 8)), (48, (5, 60)), (48, (3, 6))])
def test_span_lengths_in_range(frames, seq_len: int, span: tuple[int, int]) -> None:
    overrides = [f"masking.span_min_bars={span[0]}", f"masking.span_max_bars={span[1]}"]
    masking = strategy(seq_len, *overrides)
    times = window_times(frames, seq_len, 2048)
    masks = masking.generate(times, torch.Generator().manual_seed(2)).numpy()
    for k, tf in enumerate(TIMEFRAMES):
        shortest, longest = masking.span_bounds(k)
        expected_longest = max(1, round(span[1] * tf_ns("m1") / tf_ns(tf)))
        assert longest == expected_longest
        rows, lengths = runs(masks[:, k])
        assert lengths.max() <= longest, tf
        # Only the span clipped to the remaining budget may be shorter: one per window at most.
        short_rows = rows[lengths < shortest]
        assert len(np.unique(short_rows)) == len(short_rows), tf


def test_spans_sometimes_end_at_the_newest_bar(frames) -> None:
    times = window_times(frames, 48)
    masks = strategy(48, "masking.span_min_bars=5", "masking.span_max_bars=60").generate(
        times, torch.Generator().manual_seed(3)
    )
    right_edge = masks[:, :, -1].float().mean(0)
    assert (right_edge > 0.005).all() and (right_edge < 0.5).all(), right_edge
    left_edge = masks[:, 1:, 0].float().mean(0)
    assert (left_edge > 0).all()


def test_generator_makes_masks_reproducible(frames) -> None:
    times = window_times(frames, 16, 256)
    masking = strategy(16)
    a = masking.generate(times, torch.Generator().manual_seed(7))
    b = masking.generate(times, torch.Generator().manual_seed(7))
    c = masking.generate(times, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def overlap_required(masks: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Brute force: coarse bars that overlap (in calendar time) a hidden finer bar."""
    required = np.zeros_like(masks)
    durations = np.array([tf_ns(tf) for tf in TIMEFRAMES])
    for b in range(masks.shape[0]):
        for j in range(1, len(TIMEFRAMES)):
            start_j = times[b, j][:, None]
            for k in range(j):
                start_k = times[b, k][None, :]
                overlap = (start_j < start_k + durations[k]) & (start_k < start_j + durations[j])
                required[b, j] |= (overlap & masks[b, k][None, :]).any(axis=1)
    return required


@pytest.mark.parametrize("seq_len", [16, 48])
def test_sync_hides_the_same_calendar_time(frames, seq_len: int) -> None:
    times = window_times(frames, seq_len, 200)
    masking = strategy(seq_len, "masking.span_min_bars=5", "masking.span_max_bars=60")
    free = masking.generate(times, torch.Generator().manual_seed(4), sync=False).numpy()
    synced = masking.generate(times, torch.Generator().manual_seed(4), sync=True).numpy()
    required = overlap_required(synced, times.numpy())
    assert (synced[required]).all(), "a coarse bar overlapping hidden finer bars stayed visible"
    # sync only adds the overlapping bars to the same random spans
    np.testing.assert_array_equal(synced, free | required)
    # Without sync, coarse bars overlapping hidden minutes do stay visible (the leak sync fixes).
    assert (overlap_required(free, times.numpy()) & ~free).any()
    assert synced[:, 1:].mean() > free[:, 1:].mean()


def irregular_times(n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Open times ``[n, 6, seq_len]`` ending at each window's anchor: half the windows on the
    aligned grid (coarse bars touch the finer windows' edges exactly), half with gaps of up to
    three days and coarse bars shifted off the grid (not nested in one another)."""
    rng = np.random.default_rng(seed)
    durations = [tf_ns(tf) for tf in TIMEFRAMES]
    minute = tf_ns("m1")
    times = np.empty((n, len(TIMEFRAMES), seq_len), dtype=np.int64)
    for b in range(n):
        anchor = int(rng.integers(10**4, 10**5)) * durations[-1]
        irregular = b % 2 == 1
        for k, d in enumerate(durations):
            shift = int(rng.integers(0, max(1, d // minute))) * minute if irregular and k else 0
            close = anchor - shift - (int(rng.integers(0, 3)) * d if irregular else 0)
            opens = []
            for _ in range(seq_len):
                opens.append(close - d)
                gap = (
                    int(rng.integers(1, 3 * 1440)) * minute
                    if irregular and rng.random() < 0.1
                    else 0
                )
                close -= d + gap
            times[b, k] = opens[::-1]
    return torch.from_numpy(times)


@pytest.mark.parametrize("seq_len", [16, 48])
def test_sync_is_exact_on_gaps_and_timeframes_that_do_not_nest(seq_len: int) -> None:
    """The CPU's narrowed search (only the coarse bars that close after a finer window opens)
    against the brute-force overlap rule, on windows where that bound is tight or loose."""
    times = irregular_times(120, seq_len, seed=3)
    masking = strategy(seq_len, "masking.span_min_bars=5", "masking.span_max_bars=60")
    for seed in range(3):
        free = masking.generate(times, torch.Generator().manual_seed(seed), sync=False).numpy()
        synced = masking.generate(times, torch.Generator().manual_seed(seed), sync=True).numpy()
        required = overlap_required(synced, times.numpy())
        np.testing.assert_array_equal(synced, free | required)
        assert (required & ~free).any()  # sync had work to do


def test_narrowed_and_full_sync_search_agree(frames, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's narrowed search and the every-position search accelerators run (no count
    read back) hide the same bars, on real-looking and on gapped, non-nested windows."""
    masking = strategy(48, "masking.span_min_bars=5", "masking.span_max_bars=60")
    for times in (window_times(frames, 48, 300), irregular_times(120, 48, seed=5)):
        free = masking.generate(times, torch.Generator().manual_seed(1), sync=False)
        narrowed = masking._sync(free, times)
        with monkeypatch.context() as patch:
            patch.setattr(MaskingStrategy, "read_back_devices", ())
            full = masking._sync(free, times)
        assert torch.equal(narrowed, full)
        assert not torch.equal(narrowed, free)


def parents_sync_is_the_rule(sampler: MultiTFWindowSampler, n: int) -> None:
    """On nesting timeframes a batch's ``parents`` are each bar's containing bar in the next
    coarser window, and the sync through them hides exactly the brute-force rule's bars."""
    ids = np.random.default_rng(0).choice(len(sampler), size=n, replace=False)
    batch = DeviceBatchBuilder(sampler).batch(ids)
    times, parents = batch["times"], batch["parents"]
    opens, length = times.numpy(), sampler.seq_len
    durations = [tf_ns(tf) for tf in TIMEFRAMES]
    for k in range(len(TIMEFRAMES) - 1):
        fine, coarse = opens[:, k, :, None], opens[:, k + 1, None, :]
        inside = (coarse <= fine) & (fine + durations[k] <= coarse + durations[k + 1])
        expected = np.where(inside.any(-1), inside.argmax(-1), length)
        np.testing.assert_array_equal(parents[:, k].numpy(), expected)
    masking = strategy(length, "masking.span_min_bars=5", "masking.span_max_bars=60")
    for seed in range(3):
        free = masking.generate(times, torch.Generator().manual_seed(seed), sync=False)
        synced = masking.generate(
            times, torch.Generator().manual_seed(seed), sync=True, parents=parents
        )
        rule = free.numpy() | overlap_required(synced.numpy(), opens)
        np.testing.assert_array_equal(synced.numpy(), rule)
        assert torch.equal(synced, masking._sync(free, times))  # the search finds the same


@pytest.mark.parametrize("seq_len", [16, 48])
def test_parents_sync_is_the_rule_on_nesting_timeframes(frames, seq_len: int) -> None:
    sampler = MultiTFWindowSampler(frames, seq_len)
    assert sampler.parent_rows() is not None  # resampled from the same M1 bars
    parents_sync_is_the_rule(sampler, 200)


@pytest.mark.real_data
def test_parents_sync_is_the_rule_on_real_usdjpy(real_data_dir) -> None:
    sampler = MultiTFWindowSampler(load_tf_data(real_data_dir, TIMEFRAMES), 48)
    assert sampler.parent_rows() is not None
    parents_sync_is_the_rule(sampler, 300)


def test_timeframes_that_do_not_nest_are_found(frames) -> None:
    def nest_after(tf: str, edit) -> bool:
        edited = {k: (edit(v) if k == tf else v) for k, v in frames.items()}
        return MultiTFWindowSampler(edited, 16).parent_rows() is not None

    def shift(minutes: int):
        return lambda df: df.set_axis(df.index + pd.Timedelta(minutes=minutes))

    def add_bar_at(time: pd.Timestamp):
        return lambda df: pd.concat([df.iloc[[0]].set_axis([time]), df]).sort_index()

    def move_bar(row: int, seconds: int):
        return lambda df: df.set_axis(
            df.index.delete(row).insert(row, df.index[row] + pd.Timedelta(seconds=seconds))
        )

    assert MultiTFWindowSampler(frames, 16).parent_rows() is not None
    assert not nest_after("h4", shift(-30))  # H1 bars straddle their closes
    straddling = {k: (shift(-30)(v) if k == "h4" else v) for k, v in frames.items()}
    assert "parents" not in DeviceBatchBuilder(MultiTFWindowSampler(straddling, 16)).batch([0])
    assert not nest_after("m5", lambda df: df.drop(df.index[100]))  # M1 bars with no M5 bar
    day_before = frames["m15"].index[0] - pd.Timedelta(days=1)
    assert not nest_after("m15", add_bar_at(day_before))  # an M15 bar with no M5 bar in it
    assert not nest_after("m1", move_bar(5, -30))  # two M1 bars overlap


def test_sync_default_comes_from_the_config(frames) -> None:
    times = window_times(frames, 16, 200)
    synced = strategy(16, "masking.sync_tf=true")
    plain = strategy(16)
    a = synced.generate(times, torch.Generator().manual_seed(5))
    b = plain.generate(times, torch.Generator().manual_seed(5), sync=True)
    c = synced.generate(times, torch.Generator().manual_seed(5), sync=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_model_input_hides_values_and_dependent_deltas() -> None:
    features = torch.randn(2, 3, 8, 6)
    masks = torch.zeros(2, 3, 8, dtype=torch.bool)
    masks[0, 1, 2:4] = True
    out = mask_model_input(features, masks)
    assert (out[0, 1, 2:4] == 0).all()
    assert out[0, 1, 4, DELTA_CLOSE] == 0  # the bar after a hidden one: its delta is hidden too
    keep = ~masks.clone()
    keep[0, 1, 4] = False
    assert torch.equal(out[keep], features[keep])
    assert torch.equal(out[0, 1, 4, :DELTA_CLOSE], features[0, 1, 4, :DELTA_CLOSE])


def assert_hidden_values_do_not_reach_the_model(
    sampler: MultiTFWindowSampler, seq_len: int, sync: bool
) -> None:
    """Perturb hidden bars' raw OHLC, rebuild features, normalise, mask: model input and the
    reference price are identical. Perturbing a visible bar does change the input."""
    config = load_config("test", [f"data.seq_len={seq_len}"])
    engineer = FeatureEngineer(config)
    masking = MaskingStrategy(config.masking, config.data.timeframes, seq_len)
    ids = np.random.default_rng(0).choice(len(sampler), size=256, replace=False)
    ohlc, times = sampler.gather(ids)
    normalizer = TFNormalizer(sampler.timeframes).fit(engineer.process_batch(ohlc)[0])
    masks = masking.generate(torch.from_numpy(times), torch.Generator().manual_seed(6), sync=sync)

    def model_input(prices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        features = normalizer.normalize(engineer.process_batch(prices)[0])
        return mask_model_input(features, masks), engineer.reference_prices(prices)

    base_input, base_ref = model_input(ohlc)
    rng = np.random.default_rng(1)
    perturbed = ohlc.copy()
    hidden = masks.numpy()
    factor = np.exp(rng.normal(0.0, 0.05, size=(int(hidden.sum()), 1)))
    perturbed[hidden] = perturbed[hidden] * factor
    perturbed[hidden, 1] *= 1.01  # and a wider high
    new_input, new_ref = model_input(perturbed)
    assert torch.equal(new_input, base_input)
    assert torch.equal(new_ref, base_ref)

    visible = ohlc.copy()
    b, k, t = (int(i[0]) for i in np.nonzero(~hidden[:, :, 1:]))
    visible[b, k, t + 1] *= 1.01
    assert not torch.equal(model_input(visible)[0], base_input)


@pytest.mark.parametrize("sync", [False, True])
def test_hidden_values_change_nothing_the_model_receives(frames, sync: bool) -> None:
    assert_hidden_values_do_not_reach_the_model(MultiTFWindowSampler(frames, 16), 16, sync)


@pytest.mark.real_data
@pytest.mark.parametrize("sync", [False, True])
def test_hidden_values_change_nothing_the_model_receives_real(real_data_dir, sync) -> None:
    sampler = MultiTFWindowSampler(load_tf_data(real_data_dir, TIMEFRAMES), 48)
    assert_hidden_values_do_not_reach_the_model(sampler, 48, sync)


def test_wrong_times_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"times must be \[B, 6, 16\]"):
        strategy(16).generate(torch.zeros(2, 6, 15, dtype=torch.long))


def test_evaluation_scores_on_its_own_mask_ratio(frames) -> None:
    """Training may hide 40 % while evaluate and validation score on evaluation.mask_ratio."""
    cfg = load_config(
        "test",
        [
            "data.seq_len=48",
            "masking.sync_tf=false",
            "masking.right_edge_ratio=0",
            "masking.mask_ratio=0.4",
            "evaluation.mask_ratio=0.15",
        ],
    )
    times = window_times(frames, 48, n=1024)
    gen = torch.Generator().manual_seed(0)
    train = MaskingStrategy(cfg.masking, cfg.data.timeframes, 48).generate(times, gen)
    scored = evaluation_masking(cfg, cfg.data.timeframes, 48).generate(times, gen)
    # Every timeframe's realised share follows its strategy's ratio.
    assert torch.all((train.float().mean(dim=(0, 2)) - 0.4).abs() <= 0.02)
    assert torch.all((scored.float().mean(dim=(0, 2)) - 0.15).abs() <= 0.02)
    unset = load_config("test", ["masking.mask_ratio=0.4", "evaluation.mask_ratio=null"])
    assert evaluation_masking(unset, unset.data.timeframes, 48).mask_ratio == 0.4
    with pytest.raises(ConfigError, match=r"evaluation.mask_ratio: must lie in \(0, 1\)"):
        load_config("test", ["evaluation.mask_ratio=1.5"])
