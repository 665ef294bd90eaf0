"""EmbeddingStore: encode()'s rows, point-in-time lookups that never look ahead, round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1.data.io import file_sha256
from stage1.errors import ConfigError
from stage1.inference import Stage1InferenceEngine
from stage1.rl import EmbeddingStore, EmbeddingUnavailableError

MINUTE_NS = 60_000_000_000


@pytest.fixture(scope="module")
def store(checkpoint: Path, frames, span) -> EmbeddingStore:
    return EmbeddingStore.build(checkpoint, frames, start=span[0], end=span[1], device="cpu")


def test_rows_equal_encode_for_the_same_anchors(
    store: EmbeddingStore, engine: Stage1InferenceEngine, frames, span, tol
) -> None:
    timestamps, expected = engine.encode(frames, start=span[0], end=span[1], pool="mean")
    assert store.index.equals(timestamps)
    assert str(store.index.dtype) == "datetime64[ns, UTC]"
    np.testing.assert_allclose(store.embeddings, expected, **tol)
    frame = store.to_frame()
    assert frame.shape == (len(timestamps), store.dim) and frame.index.equals(timestamps)
    assert list(frame.columns[:2]) == ["e0", "e1"]


def test_build_from_a_data_dir_with_stride(
    checkpoint: Path, synthetic_data_dir: Path, store: EmbeddingStore, span, tol
) -> None:
    sparse = EmbeddingStore.build(
        checkpoint, synthetic_data_dir, start=span[0], end=span[1], stride=7, device="cpu"
    )
    assert sparse.index.equals(store.index[::7])
    np.testing.assert_allclose(sparse.embeddings, store.embeddings[::7], **tol)


def _random_times(store: EmbeddingStore, rng: np.random.Generator) -> np.ndarray:
    """Exact anchors, anchors +- 1 ns, uniform times over the span (between anchors, inside
    the weekend gap, after the end) and times before the first anchor."""
    a = store.anchor_ns
    picks = rng.choice(a, 200)
    uniform = rng.integers(a[0] - 30 * MINUTE_NS, a[-1] + 60 * MINUTE_NS, 2000)
    return np.concatenate([picks, picks - 1, picks + 1, uniform])


def test_asof_never_returns_a_later_anchor(store: EmbeddingStore) -> None:
    rng = np.random.default_rng(0)
    times = _random_times(store, rng)
    a, limit = store.anchor_ns, store.max_staleness_ns
    assert limit is not None
    rows = store.positions(times)
    served = rows >= 0
    # Served: the newest anchor at or before t, and not older than the staleness limit.
    assert (a[rows[served]] <= times[served]).all()
    later = rows[served] + 1
    has_later = later < len(a)
    assert (a[later[has_later]] > times[served][has_later]).all()
    assert (times[served] - a[rows[served]] <= limit).all()
    # Unavailable: before the first anchor, or the newest earlier anchor is too old.
    idx = np.searchsorted(a, times[~served], side="right") - 1
    too_old = times[~served] - a[np.maximum(idx, 0)] > limit
    assert ((idx < 0) | too_old).all()
    # Exact anchors are served as themselves; one ns before an anchor gives the previous one.
    picks = times[:200]
    assert (a[store.positions(picks)] == picks).all()
    # The vectorised and the scalar lookups agree.
    vector = store.asof_many(times, missing="nan")
    for k in rng.choice(len(times), 50, replace=False):
        stamp = pd.Timestamp(int(times[k]), tz="UTC")
        if served[k]:
            np.testing.assert_array_equal(store.asof(stamp), vector[k])
            assert store.anchor_asof(stamp) <= stamp
        else:
            assert np.isnan(vector[k]).all()
            with pytest.raises(EmbeddingUnavailableError):
                store.asof(stamp)


def test_weekend_and_out_of_range_times_are_unavailable_not_stale(store: EmbeddingStore) -> None:
    a = store.anchor_ns
    gap = int(np.argmax(np.diff(a)))  # the weekend
    saturday = pd.Timestamp(int(a[gap]), tz="UTC") + pd.Timedelta(hours=20)
    with pytest.raises(EmbeddingUnavailableError, match="min old, more than max_staleness"):
        store.asof(saturday)
    with pytest.raises(EmbeddingUnavailableError, match="before the first anchor"):
        store.asof(store.index[0] - pd.Timedelta(minutes=1))
    with pytest.raises(EmbeddingUnavailableError, match=r"timestamps\[1\].*1 of 2 times"):
        store.asof_many([store.index[-1], store.index[-1] + pd.Timedelta(hours=1)])
    # The limit is configurable; None serves the newest earlier anchor however old.
    relaxed = EmbeddingStore(a, store.embeddings, store.metadata, max_staleness=None)
    np.testing.assert_array_equal(relaxed.asof(saturday), store.embeddings[gap])


def test_times_in_other_units_and_zones_are_read_as_the_same_instants(
    store: EmbeddingStore,
) -> None:
    index = store.index[10:20] + pd.Timedelta(seconds=30)
    expected = store.asof_many(index)
    as_us = index.as_unit("us")
    np.testing.assert_array_equal(store.asof_many(as_us), expected)
    np.testing.assert_array_equal(store.asof_many(index.tz_convert("Asia/Tokyo")), expected)
    np.testing.assert_array_equal(store.asof_many(index.tz_localize(None)), expected)
    np.testing.assert_array_equal(store.asof_many(index.asi8), expected)  # int64 = ns
    np.testing.assert_array_equal(store.asof(str(index[0])), expected[0])


def test_window_is_the_n_newest_rows_oldest_first(store: EmbeddingStore) -> None:
    ts = store.index[50] + pd.Timedelta(seconds=1)
    np.testing.assert_array_equal(store.window(ts, 5), store.embeddings[46:51])
    with pytest.raises(EmbeddingUnavailableError, match="only 51 anchors"):
        store.window(ts, 52)


def test_save_load_round_trip_keeps_values_and_metadata(
    store: EmbeddingStore, checkpoint: Path, tmp_path: Path
) -> None:
    path = store.save(tmp_path / "store.parquet")
    loaded = EmbeddingStore.load(path)
    np.testing.assert_array_equal(loaded.anchor_ns, store.anchor_ns)
    np.testing.assert_array_equal(loaded.embeddings, store.embeddings)
    assert loaded.metadata == store.metadata
    meta = loaded.metadata
    assert meta["checkpoint_sha256"] == file_sha256(checkpoint)
    assert meta["timeframes"] == ["m1", "m5", "m15", "m30", "h1", "h4"]
    assert meta["pool"] == "mean" and meta["dim"] == 6 * 64 == loaded.dim
    period = meta["normalizer_train_period"]
    assert pd.Timestamp(period[0]) < pd.Timestamp(period[1])
    assert loaded.max_staleness_ns == store.max_staleness_ns == 5 * MINUTE_NS


def test_bad_inputs_are_clear_errors(store: EmbeddingStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        EmbeddingStore.load(tmp_path / "missing.parquet")
    with pytest.raises(ConfigError, match=r"row 1 .* strictly increasing"):
        EmbeddingStore(store.anchor_ns[[1, 0]], store.embeddings[:2], store.metadata)
    with pytest.raises(ConfigError, match="max_staleness: 'soon' is not a duration"):
        EmbeddingStore(store.anchor_ns, store.embeddings, store.metadata, max_staleness="soon")
    with pytest.raises(ConfigError, match="ts: 'soon' is not a time"):
        store.asof("soon")
    with pytest.raises(ConfigError, match="position 1 is not a time"):
        store.asof_many(pd.DatetimeIndex([store.index[0], pd.NaT]))
