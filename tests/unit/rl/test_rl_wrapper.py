"""Stage1ObservationWrapper: the store's row at the env's time, live or precomputed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

gym = pytest.importorskip("gymnasium", reason="the rl extra (gymnasium) is not installed")

from gymnasium import spaces  # noqa: E402
from gymnasium.wrappers import TransformObservation  # noqa: E402

from stage1.errors import ConfigError  # noqa: E402
from stage1.rl import (  # noqa: E402
    EmbeddingStore,
    EmbeddingUnavailableError,
    FXTradingEnv,
    Stage1Encoder,
    Stage1ObservationWrapper,
)


@pytest.fixture(scope="module")
def store(checkpoint: Path, frames, span) -> EmbeddingStore:
    return EmbeddingStore.build(checkpoint, frames, start=span[0], end=span[1], device="cpu")


def _env(frames, span, stride: int = 1) -> FXTradingEnv:
    return FXTradingEnv(frames, start=span[0], end=span[1], seq_len=16, stride=stride)


def _rollout(env: gym.Env, n: int) -> list:
    observations = [env.reset(seed=0)[0]]
    for step in range(n):
        observations.append(env.step(step % 3)[0])
    return observations


def test_dict_observations_get_the_store_row_at_the_envs_time(
    frames, span, store: EmbeddingStore
) -> None:
    env = _env(frames, span, stride=5)
    wrapped = Stage1ObservationWrapper(env, store=store, key="stage1")
    assert set(wrapped.observation_space.spaces) == {"market", "position", "stage1"}
    assert wrapped.observation_space["stage1"].shape == (store.dim,)
    observations = _rollout(wrapped, env.n_steps)
    rows = np.searchsorted(store.anchor_ns, env.times_ns)
    assert (store.anchor_ns[rows] == env.times_ns).all()  # env times are store anchors
    for k, obs in enumerate(observations):
        np.testing.assert_array_equal(obs["stage1"], store.embeddings[rows[k]])
        assert wrapped.observation_space.contains(obs)


def test_box_observations_are_replaced(frames, span, store: EmbeddingStore) -> None:
    env = _env(frames, span, stride=25)
    position_only = TransformObservation(
        env, lambda obs: obs["position"], spaces.Box(-1.0, 1.0, (1,), np.float32)
    )
    wrapped = Stage1ObservationWrapper(position_only, store=store)
    assert wrapped.observation_space == spaces.Box(-np.inf, np.inf, (store.dim,), np.float32)
    for obs, t in zip(_rollout(wrapped, 10), env.decision_times, strict=False):
        np.testing.assert_array_equal(obs, store.asof(t))
    keyed = Stage1ObservationWrapper(position_only, store=store, key="emb")
    assert set(keyed.observation_space.spaces) == {"observation", "emb"}


def test_live_path_equals_the_store_path(
    checkpoint: Path, frames, span, store: EmbeddingStore, tol
) -> None:
    """Across the weekend inside the span, and again after a reset (episodes restart)."""
    env = _env(frames, span)
    weekend = int(np.argmax(np.diff(env.times_ns)))
    start = env.decision_times[weekend - 20]
    env = FXTradingEnv(frames, start=start, end=span[1], seq_len=16)
    encoder = Stage1Encoder.from_checkpoint(checkpoint, device="cpu")
    live = Stage1ObservationWrapper(
        env,
        encoder=encoder,
        key="stage1",
        bars_fn=lambda e, t: e.unwrapped.bars_closed_by(t, 2 * encoder.seq_len),
    )
    assert (
        live.observation_space
        == Stage1ObservationWrapper(env, store=store, key="stage1").observation_space
    )
    for _ in range(2):
        for k, obs in enumerate(_rollout(live, 40)):
            np.testing.assert_allclose(obs["stage1"], store.asof(env.decision_times[k]), **tol)


def test_a_time_without_embedding_is_an_error_not_a_stale_value(
    checkpoint: Path, frames, span
) -> None:
    env = _env(frames, span, stride=5)
    later = EmbeddingStore.build(
        checkpoint, frames, start=env.decision_times[3], end=span[1], device="cpu"
    )
    wrapped = Stage1ObservationWrapper(env, store=later, key="stage1")
    with pytest.raises(EmbeddingUnavailableError, match="before the first anchor"):
        wrapped.reset()
    # A store that ends at the episode's first time: served while fresh, then an error.
    env = FXTradingEnv(frames, start=later.index[0], end=span[1], seq_len=16, stride=5)
    short = EmbeddingStore(later.anchor_ns[:1], later.embeddings[:1], later.metadata)
    wrapped = Stage1ObservationWrapper(env, store=short, key="stage1")
    served = _rollout(wrapped, 1)  # 0 and 5 minutes old: within the 5-minute limit
    np.testing.assert_array_equal(served[1]["stage1"], later.embeddings[0])
    with pytest.raises(EmbeddingUnavailableError, match="10 min old, more than max_staleness"):
        wrapped.step(1)


def test_live_bars_from_the_future_are_refused(checkpoint: Path, frames, span) -> None:
    env = _env(frames, span, stride=5)
    encoder = Stage1Encoder.from_checkpoint(checkpoint, device="cpu")
    peeking = Stage1ObservationWrapper(
        env,
        encoder=encoder,
        key="stage1",
        bars_fn=lambda e, t: e.unwrapped.bars_closed_by(t + pd.Timedelta(minutes=2), 40),
    )
    with pytest.raises(EmbeddingUnavailableError, match="bars_fn delivered bars closing after"):
        peeking.reset()


def test_bad_arguments_are_one_clear_error(checkpoint: Path, frames, span, store) -> None:
    env = _env(frames, span, stride=50)
    with pytest.raises(ConfigError, match="exactly one of store= or encoder="):
        Stage1ObservationWrapper(env)
    encoder = Stage1Encoder.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(ConfigError, match="bars_fn: live encoding"):
        Stage1ObservationWrapper(env, encoder=encoder)
    with pytest.raises(ConfigError, match="key: 'market' is already"):
        Stage1ObservationWrapper(env, store=store, key="market")
