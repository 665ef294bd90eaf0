"""Stage1InferenceEngine: same windows and embeddings as training, no look-ahead, live use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig

from stage1.checkpoint import export_checkpoint
from stage1.config import load_config
from stage1.data.dataset import Stage1DataModule, Stage1Dataset
from stage1.data.io import aggregate_bars, load_tf_data
from stage1.data.normalization import TFNormalizer
from stage1.data.timeframes import tf_ns
from stage1.errors import CheckpointError, ConfigError, DataValidationError
from stage1.inference import Stage1InferenceEngine, pool_embeddings, to_utc_ns
from stage1.model.model import Stage1Model
from stage1.training import Stage1LightningModule

# The synthetic fixture holds about 4 weeks; the test config's 16-bar H4 windows need a 64 h
# embargo on each side, which the default 70/15/15 split cannot fit into the val part.
SPLIT_OVERRIDES = ["data.train_frac=0.4", "data.val_frac=0.3"]
# Embeddings computed in different batch compositions may differ by float rounding only
# (on the reference machine they are bitwise equal).
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def config() -> DictConfig:
    return load_config("test", SPLIT_OVERRIDES)


@pytest.fixture(scope="module")
def train_dataset(synthetic_data_dir: Path, config: DictConfig) -> Stage1Dataset:
    return Stage1Dataset(synthetic_data_dir, config, "train")


@pytest.fixture(scope="module")
def model(config: DictConfig, train_dataset: Stage1Dataset) -> Stage1Model:
    """An untrained model holding the train split's normaliser, as training gives it."""
    torch.manual_seed(0)
    model = Stage1Model(config).eval()
    model.set_normalizer(train_dataset.normalizer.mean, train_dataset.normalizer.std)
    return model


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
    config: DictConfig,
    model: Stage1Model,
    train_dataset: Stage1Dataset,
) -> Path:
    """A fresh (untrained) model and a normaliser fitted by Stage1Dataset, exported."""
    path = tmp_path_factory.mktemp("ckpt") / "stage1_best.pth"
    return export_checkpoint(
        path, model.state_dict(), config, train_dataset.normalizer.to_dict(), 0, None
    )


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Stage1InferenceEngine:
    return Stage1InferenceEngine(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def frames(synthetic_data_dir: Path, config: DictConfig) -> dict[str, pd.DataFrame]:
    return load_tf_data(synthetic_data_dir, config.data.timeframes)


@pytest.fixture(scope="module")
def anchors(engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame]) -> pd.DatetimeIndex:
    return engine.build_sampler(frames).anchor_times


def _close_ns(frame: pd.DataFrame, tf: str) -> np.ndarray:
    return frame.index.as_unit("ns").asi8 + tf_ns(tf)


def _opened_before(frames: dict[str, pd.DataFrame], time: pd.Timestamp) -> dict:
    """Every bar opened before ``time`` (a coarse bar may still be running at ``time``)."""
    return {tf: frame[frame.index < time] for tf, frame in frames.items()}


# ------------------------------------------------------------------------------ loading
def test_engine_rebuilds_config_normalizer_and_model_in_eval_mode(
    engine: Stage1InferenceEngine, config: DictConfig, train_dataset: Stage1Dataset
) -> None:
    assert engine.config.data.seq_len == config.data.seq_len
    assert engine.timeframes == ["m1", "m5", "m15", "m30", "h1", "h4"]
    assert not engine.model.training
    assert engine.device == torch.device("cpu")
    torch.testing.assert_close(engine.normalizer.mean, train_dataset.normalizer.mean)
    torch.testing.assert_close(engine.normalizer.std, train_dataset.normalizer.std)
    assert (engine.latent_len, engine.d_model) == (4, 64)


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.pth: checkpoint file not found"):
        Stage1InferenceEngine(tmp_path / "absent.pth")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, checkpoint: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(checkpoint.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"corrupt\.pth: not a readable"):
        Stage1InferenceEngine(corrupt)


def test_checkpoint_with_foreign_normalizer_is_refused(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    stats = TFNormalizer(["m1", "m5"]).to_dict()
    path = export_checkpoint(tmp_path / "n.pth", model.state_dict(), config, stats, 0, None)
    with pytest.raises(CheckpointError, match=r"n\.pth: normalizer is for timeframes"):
        Stage1InferenceEngine(path)


@pytest.mark.parametrize(
    "wrap",
    [torch.compile, torch.nn.DataParallel],
    ids=["torch.compile (_orig_mod.)", "DDP/DataParallel (module.)"],
)
def test_wrapped_model_checkpoints_load(
    tmp_path: Path,
    wrap: Callable[[torch.nn.Module], torch.nn.Module],
    model: Stage1Model,
    config: DictConfig,
    train_dataset: Stage1Dataset,
    engine: Stage1InferenceEngine,
    frames: dict[str, pd.DataFrame],
) -> None:
    """Weights saved from a wrapped model carry the wrapper's prefix; they still load."""
    state = wrap(model).state_dict()
    assert all(key.startswith(("_orig_mod.", "module.")) for key in state)
    stats = train_dataset.normalizer.to_dict()
    path = export_checkpoint(tmp_path / "wrapped.pth", state, config, stats, 0, None)
    loaded = Stage1InferenceEngine(path, device="cpu")
    torch.testing.assert_close(
        loaded.extract_features(frames), engine.extract_features(frames), rtol=0, atol=0
    )


def test_lightning_checkpoint_loads(
    tmp_path: Path,
    synthetic_data_dir: Path,
    config: DictConfig,
    train_dataset: Stage1Dataset,
    frames: dict[str, pd.DataFrame],
) -> None:
    """A .ckpt written by a real Trainer after one step encodes like its module's network."""
    stats = train_dataset.normalizer.to_dict()
    module = Stage1LightningModule(config, stats)
    datamodule = Stage1DataModule(synthetic_data_dir, config, train_dataset.normalizer)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    loaded = Stage1InferenceEngine(tmp_path / "last.ckpt", device="cpu")
    assert loaded.meta["source"] == "lightning"
    sampler = loaded.build_sampler(frames)
    ohlc, _ = sampler.gather([len(sampler) - 1])
    features = loaded.normalizer.normalize(loaded.feature_engineer.process_batch(ohlc)[0])
    with torch.no_grad():
        expected = module.model.eval()(features, masks=None)["encoded"]
    torch.testing.assert_close(loaded.extract_features(frames), expected, **TOL)


# ------------------------------------------------------------------------------ encoding
def test_extract_features_shape(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame]
) -> None:
    out = engine.extract_features(frames)
    assert out.shape == (1, 6, engine.latent_len, engine.d_model)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    assert not out.is_inference()  # usable as input to a network the agent trains


def test_encode_last_embedding_equals_extract_features(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame], anchors: pd.DatetimeIndex
) -> None:
    timestamps, embeddings = engine.encode(frames, start=anchors[-70], batch_size=32)
    assert timestamps[-1] == anchors[-1]
    assert len(timestamps) == 70 and embeddings.shape == (70, 6, 4, 64)
    np.testing.assert_allclose(embeddings[-1], engine.extract_features(frames)[0].numpy(), **TOL)


def test_embedding_equals_training_pipeline_encoded(
    synthetic_data_dir: Path,
    config: DictConfig,
    model: Stage1Model,
    engine: Stage1InferenceEngine,
    frames: dict[str, pd.DataFrame],
) -> None:
    """Train/inference parity: a DataModule test batch through the ORIGINAL model equals what
    the engine (loaded from the export) computes for the same anchor times."""
    datamodule = Stage1DataModule(synthetic_data_dir, config, engine.normalizer)
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    with torch.no_grad():
        expected = model(batch["features"], masks=None)["encoded"].numpy()
    assert datamodule.sampler is not None
    batch_anchors = datamodule.sampler.anchor_times[batch["window_ids"].numpy()]
    timestamps, embeddings = engine.encode(frames, start=batch_anchors[0], end=batch_anchors[-1])
    rows = timestamps.get_indexer(batch_anchors)
    assert (rows >= 0).all(), "every training window's anchor is encoded"
    np.testing.assert_allclose(embeddings[rows], expected, **TOL)


def test_repeated_calls_are_identical(
    engine: Stage1InferenceEngine,
    checkpoint: Path,
    frames: dict[str, pd.DataFrame],
    anchors: pd.DatetimeIndex,
) -> None:
    window = {"start": anchors[500], "end": anchors[600], "batch_size": 40}
    first_times, first = engine.encode(frames, **window)
    second_times, second = engine.encode(frames, **window)
    _, from_new_engine = Stage1InferenceEngine(checkpoint, device="cpu").encode(frames, **window)
    assert first_times.equals(second_times)
    assert np.array_equal(first, second) and np.array_equal(first, from_new_engine)


@pytest.mark.parametrize("position", [0.3, 0.55, 0.8])
def test_bars_after_the_anchor_do_not_change_its_embedding(
    position: float,
    engine: Stage1InferenceEngine,
    frames: dict[str, pd.DataFrame],
    anchors: pd.DatetimeIndex,
) -> None:
    """Data ending at the anchor, data continuing past it, and data whose every bar closing
    after it is distorted all give the anchor the same embedding (no look-ahead)."""
    anchor = anchors[int(len(anchors) * position)]
    distorted = {}
    for tf, frame in frames.items():
        after = _close_ns(frame, tf) > anchor.value
        assert after.any()
        distorted[tf] = frame.copy()
        distorted[tf].loc[after, ["open", "high", "low", "close"]] *= 1.5
    (full_time,), full = engine.encode(frames, start=anchor, end=anchor)
    _, with_distorted_future = engine.encode(distorted, start=anchor, end=anchor)
    up_to_anchor = engine.extract_features(_opened_before(frames, anchor)).numpy()
    assert full_time == anchor
    assert np.array_equal(full, with_distorted_future)
    assert np.array_equal(full, up_to_anchor)


def test_iter_encode_chunks_make_up_encode(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame], anchors: pd.DatetimeIndex
) -> None:
    window = {"start": anchors[1000], "end": anchors[1099], "pool": "mean"}
    chunks = list(engine.iter_encode(frames, batch_size=30, **window))
    assert [len(t) for t, _ in chunks] == [30, 30, 30, 10]
    timestamps, embeddings = engine.encode(frames, batch_size=30, **window)
    assert timestamps.equals(chunks[0][0].append([t for t, _ in chunks[1:]]))
    assert np.array_equal(embeddings, np.concatenate([e for _, e in chunks]))


def test_range_bounds_are_inclusive_utc(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame], anchors: pd.DatetimeIndex
) -> None:
    start, end = anchors[200], anchors[260]
    naive_start = start.tz_convert(None).isoformat()  # naive = UTC
    tokyo_end = end.tz_convert("Asia/Tokyo")
    timestamps, _ = engine.encode(frames, start=naive_start, end=tokyo_end, pool="mean")
    assert timestamps.equals(anchors[200:261])
    assert str(timestamps.dtype) == "datetime64[ns, UTC]"


def test_pooling_shapes_and_values(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame], anchors: pd.DatetimeIndex
) -> None:
    window = {"start": anchors[300], "end": anchors[309]}
    _, full = engine.encode(frames, **window)
    _, mean = engine.encode(frames, pool="mean", **window)
    _, flat = engine.encode(frames, pool="flatten", **window)
    _, last = engine.encode(frames, pool="last", **window)
    assert mean.shape == (10, 6 * 64) and flat.shape == (10, 6 * 4 * 64)
    assert last.shape == (10, *engine.embedding_shape("last")) == (10, 6 * 64)
    np.testing.assert_allclose(mean[:, 64:128], full[:, 1].mean(axis=1), **TOL)
    np.testing.assert_allclose(last[:, 64:128], full[:, 1, -1], **TOL)
    assert np.array_equal(flat, full.reshape(10, -1))
    assert pool_embeddings(torch.from_numpy(full), None).shape == full.shape


def test_timestamp_column_and_naive_times_are_accepted(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame]
) -> None:
    as_columns = {
        tf: frame.tz_convert(None).reset_index() for tf, frame in frames.items()
    }  # a naive `timestamp` column, RangeIndex
    assert "timestamp" in as_columns["m1"].columns
    assert torch.equal(engine.extract_features(as_columns), engine.extract_features(frames))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pool": "max"}, ConfigError, r"pool: 'max' is not one of"),
        ({"start": "not a time"}, ConfigError, r"start: 'not a time' is not a time"),
        ({"start": "2020-02-01", "end": "2020-01-20"}, ConfigError, r"start: .* is after end"),
        ({"start": "2031-01-01"}, DataValidationError, r"no valid window has its anchor in"),
        ({"batch_size": 0}, ConfigError, r"batch_size: must be >= 1"),
    ],
)
def test_bad_encode_arguments_are_clear_errors(
    engine: Stage1InferenceEngine,
    frames: dict[str, pd.DataFrame],
    kwargs: dict,
    error: type,
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        engine.encode(frames, **kwargs)


def test_bad_input_data_names_the_timeframe_and_rule(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame]
) -> None:
    without_h4 = {tf: frame for tf, frame in frames.items() if tf != "h4"}
    with pytest.raises(DataValidationError, match=r"missing timeframe\(s\) \['h4'\]"):
        engine.extract_features(without_h4)
    broken = dict(frames)
    broken["m5"] = frames["m5"].copy()
    broken["m5"].iloc[7, broken["m5"].columns.get_loc("high")] = 0.5
    with pytest.raises(DataValidationError, match=r"multi_tf_data\['m5'\]: row 7 .*high"):
        engine.extract_features(broken)


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", r"device: 'gpu0' is not a torch device"), ("cuda", r"CUDA is not available")],
)
def test_unusable_device_is_a_config_error(checkpoint: Path, device: str, message: str) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so 'cuda' is a usable device")
    with pytest.raises(ConfigError, match=message):
        Stage1InferenceEngine(checkpoint, device=device)


def test_to_utc_ns_reads_common_time_forms() -> None:
    expected = pd.Timestamp("2020-01-06 09:00", tz="UTC").value
    assert to_utc_ns("2020-01-06 09:00", "start") == expected
    assert to_utc_ns("2020-01-06T18:00+09:00", "start") == expected
    assert to_utc_ns(np.datetime64("2020-01-06T09:00"), "start") == expected
    assert to_utc_ns(None, "end") is None


# ------------------------------------------------------------------------------ live use
def _feed(
    frames: dict[str, pd.DataFrame], after: pd.Timestamp, until: pd.Timestamp
) -> dict[str, pd.DataFrame]:
    """What a live feed delivers at ``until``: every bar that closed in ``(after, until]``, plus
    each coarse timeframe's running bar with its values so far (aggregated from the M1 bars
    opened before ``until``); its final version comes in a later update."""
    out = {}
    m1 = frames["m1"]
    for tf, frame in frames.items():
        close = _close_ns(frame, tf)
        new = frame[(close > after.value) & (close <= until.value)]
        running = (frame.index < until) & (close > until.value)
        if tf != "m1" and running.any():
            bin_open = frame.index[running][0]
            so_far = m1[(m1.index >= bin_open) & (m1.index < until)]
            new = pd.concat([new, aggregate_bars(so_far, tf)])
        if len(new):
            out[tf] = new
    return out


def test_live_encoder_equals_encode(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame], anchors: pd.DatetimeIndex
) -> None:
    """Bars delivered as they close (coarse ones also while running), one base bar at a time:
    every valid anchor is emitted once, with encode()'s embedding, from a short tail."""
    start = anchors[int(len(anchors) * 0.6)]
    live = engine.stream(history=_feed(frames, pd.Timestamp(0, tz="UTC"), start), pool="mean")
    assert live.last_anchor == start and live.latest is not None
    (_,), at_start = engine.encode(frames, start=start, end=start, pool="mean")
    np.testing.assert_allclose(live.latest[1], at_start[0], **TOL)
    m1_close = frames["m1"].index + pd.Timedelta(minutes=1)
    closes = m1_close[m1_close > start][:30]
    emitted, now = {}, start
    for close in closes:
        result = live.update(_feed(frames, now, close))
        now = close
        if result is not None:
            emitted[result[0]] = result[1]
    timestamps, expected = engine.encode(frames, start=closes[0], end=closes[-1], pool="mean")
    assert list(emitted) == list(timestamps)
    np.testing.assert_allclose(np.stack(list(emitted.values())), expected, **TOL)
    assert all(len(bars) <= live.keep_bars for bars in live._bars.values())


def test_live_encoder_waits_for_history_and_replaces_resent_bars(
    engine: Stage1InferenceEngine, frames: dict[str, pd.DataFrame], anchors: pd.DatetimeIndex
) -> None:
    anchor = anchors[len(anchors) // 2]
    history = _feed(frames, pd.Timestamp(0, tz="UTC"), anchor)
    live = engine.stream()
    assert live.update({tf: bars.iloc[:3] for tf, bars in history.items()}) is None
    result = live.update(history)  # starts with the 3 bars held: replaced, not doubled
    assert result is not None and result[0] == anchor
    (_, expected) = engine.encode(frames, start=anchor, end=anchor)
    assert np.array_equal(result[1], expected[0])
    assert live.update(history) is None, "nothing new: no second emission for the same anchor"
    with pytest.raises(DataValidationError, match=r"unknown timeframe\(s\) \['d'\]"):
        live.update({"d": history["h4"]})
