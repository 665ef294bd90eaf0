"""DeviceBatchBuilder: the batch path equals the NumPy reference (gather, the NumPy feature
code it replaced, TFNormalizer) on real USDJPY windows, and a float64 computation of the same
features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stage1.config import load_config
from stage1.data import device_batch
from stage1.data.dataset import build_sampler, build_splits, fit_normalizer
from stage1.data.device_batch import DeviceBatchBuilder, _take_rows
from stage1.data.features import FeatureEngineer, numpy_reference_features
from stage1.data.io import load_tf_data
from stage1.data.masking import MaskingStrategy
from stage1.data.normalization import TFNormalizer
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.synthetic import write_synthetic_dataset

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


@pytest.fixture(scope="module")
def real(real_data_dir: Path) -> tuple[MultiTFWindowSampler, TFNormalizer, np.ndarray]:
    """The base config's sampler on real USDJPY 2017-2019, its train normaliser, and window
    ids: random ones plus the 2019-01-03 flash crash (the largest z-scores in the data)."""
    config = load_config("base")
    sampler = build_sampler(real_data_dir, config)
    normalizer = fit_normalizer(sampler, build_splits(sampler, config)["train"], seed=0)
    random_ids = np.random.default_rng(0).choice(len(sampler), 3000, replace=False)
    crash = np.datetime64("2019-01-02T22:30", "ns").astype(np.int64)
    first = int(np.searchsorted(sampler.anchor_ns, crash))
    ids = np.concatenate([np.sort(random_ids), np.arange(first, first + 120)])
    return sampler, normalizer, ids


def float64_z(ohlc: np.ndarray, normalizer: TFNormalizer) -> np.ndarray:
    """The features of ``ohlc`` ``[B, n_tf, L, 4]`` computed and normalised in float64."""
    open_, high, low, close = (ohlc[..., i] for i in range(4))
    ref = open_[:, 0, 0][:, None, None, None]
    prev_close = np.concatenate([open_[..., :1], close[..., :-1]], axis=-1)
    body = (close - open_) / np.maximum(high - low, np.finfo(np.float64).tiny)
    raw = np.concatenate(
        [np.log(ohlc / ref), np.log(close / prev_close)[..., None], body[..., None]], axis=-1
    )
    mean = normalizer.mean.double().numpy()[:, None, :]
    return (raw - mean) / normalizer.std.double().numpy()[:, None, :]


def test_features_are_the_float64_values_rounded_to_float32(real) -> None:
    """Within 1e-6 z units, or half a float32 step of z where |z| > 8 (1e-6 is then finer than
    float32 can represent; the flash crash reaches |z| ~ 97)."""
    sampler, normalizer, ids = real
    builder = DeviceBatchBuilder(sampler, normalizer)
    new = builder.features(ids).numpy().astype(np.float64)
    exact = float64_z(sampler.gather(ids)[0], normalizer)
    half_step = 0.5 * np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    error = np.abs(new - exact)
    assert (error <= np.maximum(1e-6, half_step * 1.001)).all(), error.max()
    assert np.abs(exact).max() > 16  # the crash windows are in: the float32 bound matters


def test_features_equal_the_numpy_reference_path(real) -> None:
    """Against gather → the NumPy features → TFNormalizer.normalize (its float32 log1p puts
    it ~1e-7 relative off the float64 values itself)."""
    sampler, normalizer, ids = real
    ohlc, _ = sampler.gather(ids)
    reference_raw = numpy_reference_features(ohlc)
    new = DeviceBatchBuilder(sampler, normalizer).features(ids)
    torch.testing.assert_close(new, normalizer.normalize(reference_raw), atol=1e-6, rtol=2e-7)
    raw = DeviceBatchBuilder(sampler).features(ids, normalize=False)
    torch.testing.assert_close(raw, reference_raw, atol=1e-9, rtol=3e-7)


def test_batches_do_not_depend_on_how_they_are_cut(real, monkeypatch) -> None:
    """The tables are built in chunks of rows and batches in chunks of windows: a table built
    in chunks of 1 000 rows (one row of overlap each) and a batch taken in one piece or in
    pieces of 7 windows give the same bits."""
    sampler, normalizer, ids = real
    expected = DeviceBatchBuilder(sampler, normalizer).batch(ids)
    monkeypatch.setattr(device_batch, "TABLE_CHUNK_ROWS", 1000)
    monkeypatch.setattr(device_batch, "GATHER_CHUNK", 7)
    builder = DeviceBatchBuilder(sampler, normalizer)
    got = builder.batch(ids)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    parts = [builder.batch(ids[i : i + 500])["features"] for i in range(0, len(ids), 500)]
    assert torch.equal(torch.cat(parts), expected["features"])


def test_a_builder_without_normalizer_gives_the_raw_features(real) -> None:
    """Without statistics the table holds raw values: its batches equal the price path of the
    normaliser's fit (``normalize=False``) bit for bit."""
    sampler, normalizer, ids = real
    raw = DeviceBatchBuilder(sampler, normalizer).features(ids, normalize=False)
    assert torch.equal(DeviceBatchBuilder(sampler).batch(ids)["features"], raw)


def test_raw_price_windows_get_the_same_features(real) -> None:
    """``FeatureEngineer.process_batch`` (raw windows, e.g. live RL ones) is the same math."""
    sampler, normalizer, ids = real
    ohlc, _ = sampler.gather(ids)
    engineer = FeatureEngineer(load_config("base"))
    builder = DeviceBatchBuilder(sampler, normalizer)
    assert torch.equal(engineer.process_batch(ohlc, normalizer)[0], builder.features(ids))
    raw = builder.features(ids, normalize=False)
    assert torch.equal(engineer.process_batch(ohlc)[0], raw)


def test_gathered_times_reference_prices_and_masks_are_exactly_equal(real) -> None:
    sampler, normalizer, ids = real
    batch = DeviceBatchBuilder(sampler, normalizer).batch(ids)
    ohlc, times = sampler.gather(ids)
    assert torch.equal(batch["times"], torch.from_numpy(times))
    assert torch.equal(batch["ref_price"], torch.from_numpy(ohlc[:, 0, 0, 0].copy()))
    assert torch.equal(batch["window_ids"], torch.from_numpy(ids))
    assert torch.equal(batch["features"], batch["targets"])
    masking = MaskingStrategy(load_config("base").masking, sampler.timeframes, sampler.seq_len)
    new = masking.generate(batch["times"], torch.Generator().manual_seed(7))
    reference = masking.generate(torch.from_numpy(times), torch.Generator().manual_seed(7))
    assert torch.equal(new, reference)


@pytest.fixture(scope="module")
def synthetic_frames(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data_dir = write_synthetic_dataset(
        tmp_path_factory.mktemp("device_batch") / "data", n_rows=20_000, timeframes=TIMEFRAMES
    )
    return load_tf_data(data_dir, TIMEFRAMES)


@pytest.fixture(scope="module")
def synthetic_sampler(synthetic_frames: dict) -> MultiTFWindowSampler:
    return MultiTFWindowSampler(synthetic_frames, seq_len=16)


def test_features_are_scale_free(synthetic_sampler: MultiTFWindowSampler) -> None:
    """Multiplying every price by a constant changes no feature (beyond float rounding)."""
    scaled = MultiTFWindowSampler.__new__(MultiTFWindowSampler)
    scaled.__dict__.update(synthetic_sampler.__dict__)
    scaled._ohlc = [ohlc * 1000.0 for ohlc in synthetic_sampler._ohlc]
    ids = np.arange(0, len(synthetic_sampler), 97)
    plain = DeviceBatchBuilder(synthetic_sampler).features(ids)
    torch.testing.assert_close(DeviceBatchBuilder(scaled).features(ids), plain, atol=1e-9, rtol=0)


def test_the_accelerator_gather_equals_the_cpu_one(synthetic_sampler) -> None:
    """``_take_rows`` uses np.take on the CPU and torch indexing elsewhere: the same rows."""
    builder = DeviceBatchBuilder(synthetic_sampler)
    rows = builder.rows(np.arange(0, len(synthetic_sampler), 31))
    table = builder.tables()[0]
    assert torch.equal(_take_rows(table, rows), table[rows])
    assert torch.equal(_take_rows(builder.open_ns, rows), builder.open_ns[rows])


def mapped_batch_files() -> int:
    """This process's mappings of the builder's (unlinked) per-bar array files."""
    return Path("/proc/self/maps").read_text().count("stage1-batch-tables-")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_with_cached_bars_the_per_bar_arrays_are_file_backed(
    synthetic_frames: dict, synthetic_sampler: MultiTFWindowSampler, tmp_path: Path
) -> None:
    """With ``cache_dir`` (many instruments) the CPU's tables, times, opens, log closes and
    parents live in mapped files, not anonymous memory, and the batches are the same bits."""
    cached = MultiTFWindowSampler(synthetic_frames, seq_len=16, cache_dir=tmp_path)
    normalizer = fit_normalizer(synthetic_sampler, np.arange(0, len(synthetic_sampler), 7), 0)
    ids = np.arange(0, len(synthetic_sampler), 13)
    before = mapped_batch_files()
    plain = DeviceBatchBuilder(synthetic_sampler, normalizer, horizons=[4]).batch(ids)
    assert mapped_batch_files() == before
    builder = DeviceBatchBuilder(cached, normalizer, horizons=[4])
    batch = builder.batch(ids)
    assert mapped_batch_files() == before + 6  # opens, base opens, table, first, log close, parents
    assert batch.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(batch[key], value), key
    assert not list(tmp_path.glob("stage1-batch-tables-*"))  # unlinked once mapped


def test_a_cache_dir_it_cannot_write_keeps_the_arrays_in_memory(
    synthetic_frames: dict, synthetic_sampler: MultiTFWindowSampler, tmp_path: Path, monkeypatch
) -> None:
    """A read-only cache (the index already there) still trains: one warning, same batches."""
    cached = MultiTFWindowSampler(synthetic_frames, seq_len=16, cache_dir=tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(device_batch.tempfile, "mkstemp", refuse)
    ids = np.arange(0, len(synthetic_sampler), 13)
    with pytest.warns(UserWarning, match="cannot hold the batch builder's per-bar arrays"):
        batch = DeviceBatchBuilder(cached).batch(ids)
    assert torch.equal(
        batch["features"], DeviceBatchBuilder(synthetic_sampler).batch(ids)["features"]
    )


def test_a_foreign_normalizer_is_refused(synthetic_sampler) -> None:
    with pytest.raises(ValueError, match="normalizer is for timeframes"):
        DeviceBatchBuilder(synthetic_sampler, TFNormalizer(["m1", "h1"]))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_batches_equal_the_cpu_ones_and_need_no_host_sync(synthetic_sampler) -> None:
    """The accelerator path (torch indexing, float64 on the GPU) gives the CPU path's batch,
    and building it waits for nothing (CUDA's sync debug mode raises on any host sync)."""
    normalizer = TFNormalizer(synthetic_sampler.timeframes)
    normalizer.mean, normalizer.std = torch.rand(6, 6), torch.rand(6, 6) + 0.5
    normalizer.fitted = True
    ids = np.arange(0, len(synthetic_sampler), 13)
    cpu = DeviceBatchBuilder(synthetic_sampler, normalizer).batch(ids)
    builder = DeviceBatchBuilder(synthetic_sampler, normalizer, "cuda")
    masking = MaskingStrategy(load_config("base").masking, builder.timeframes, builder.seq_len)
    cuda_ids = torch.from_numpy(ids).cuda()
    masking.generate(builder.batch(cuda_ids)["times"])  # its constants go to the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = builder.batch(cuda_ids)
        generator = torch.Generator("cuda").manual_seed(3)
        masks = masking.generate(batch["times"], generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for key, value in cpu.items():
        torch.testing.assert_close(batch[key].cpu(), value, rtol=0, atol=1e-6, msg=key)
    assert masks.shape == batch["times"].shape and masks.any()
