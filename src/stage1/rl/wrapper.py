"""Stage1ObservationWrapper: a Gymnasium wrapper that adds Stage 1's embedding to observations.

The embedding is the one of the newest window anchored at or before the env's current time
(``time_fn(env)``): from an :class:`EmbeddingStore` (``asof``), or encoded live from the bars a
callback delivers (``LiveEncoder``); both give the same vector for the same time. A time with no
usable embedding (before the first anchor, or stale) is an
:class:`~stage1.rl.store.EmbeddingUnavailableError`, never an old vector passed off as new.

Needs gymnasium (``pip install stage1[rl]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import numpy.typing as npt
import pandas as pd
from gymnasium import spaces

from stage1.data.timeframes import tf_ns
from stage1.errors import ConfigError
from stage1.live import LiveEncoder
from stage1.rl.encoder import Stage1Encoder
from stage1.rl.store import (
    DEFAULT_STALENESS_BARS,
    EmbeddingStore,
    EmbeddingUnavailableError,
    asof_positions,
    staleness_ns,
    unavailable_reason,
)

TimeFn = Callable[[gym.Env[Any, Any]], pd.Timestamp]
BarsFn = Callable[[gym.Env[Any, Any], pd.Timestamp], Mapping[str, pd.DataFrame]]


def env_time(env: gym.Env[Any, Any]) -> pd.Timestamp:
    """Default ``time_fn``: the unwrapped env's ``current_time`` (as :class:`FXTradingEnv`)."""
    return pd.Timestamp(env.unwrapped.current_time)  # type: ignore[attr-defined]


class Stage1ObservationWrapper(gym.ObservationWrapper[Any, Any, Any]):
    """Adds ``[dim]`` float32 embeddings to ``env``'s observations.

    ``key=None``: the observation is replaced by the embedding (``Box(dim)``). ``key='name'``:
    a ``Dict`` observation gets that key added; any other observation becomes
    ``{'observation': original, key: embedding}``.

    Give ``store=`` (precomputed), or ``encoder=`` (a :class:`Stage1Encoder`) with ``bars_fn(env,
    time) -> {tf: DataFrame}``: the bars closed by ``time`` (at least the newest ``keep_bars``
    of each timeframe, :meth:`FXTradingEnv.bars_closed_by` does this); times must increase
    within an episode (``reset`` starts a fresh live encoder). ``max_staleness``: as
    the store's (default: the store's own; live: ``DEFAULT_STALENESS_BARS`` base bars).
    """

    def __init__(
        self,
        env: gym.Env[Any, Any],
        store: EmbeddingStore | None = None,
        encoder: Stage1Encoder | None = None,
        time_fn: TimeFn = env_time,
        key: str | None = None,
        bars_fn: BarsFn | None = None,
        max_staleness: pd.Timedelta | str | None = "default",
    ) -> None:
        super().__init__(env)
        if (store is None) == (encoder is None):
            raise ConfigError("Stage1ObservationWrapper: give exactly one of store= or encoder=")
        if encoder is not None and bars_fn is None:
            raise ConfigError("bars_fn: live encoding (encoder=) needs a bars callback")
        self.store, self.encoder, self.time_fn, self.key, self.bars_fn = (
            store,
            encoder,
            time_fn,
            key,
            bars_fn,
        )
        self.live: LiveEncoder | None = None
        if encoder is not None:
            self.live = encoder.engine.stream(pool=encoder.pool)
            self.dim = encoder.dim
            default_ns: int | None = DEFAULT_STALENESS_BARS * tf_ns(encoder.timeframes[0])
        else:
            assert store is not None
            self.dim = store.dim
            default_ns = store.max_staleness_ns
        self.max_staleness_ns = staleness_ns(max_staleness, default_ns)
        embedding_space = spaces.Box(-np.inf, np.inf, (self.dim,), np.float32)
        inner = env.observation_space
        self.observation_space: spaces.Space[Any]
        if key is None:
            self.observation_space = embedding_space
        elif isinstance(inner, spaces.Dict):
            if key in inner.spaces:
                raise ConfigError(f"key: {key!r} is already in the env's observation space")
            self.observation_space = spaces.Dict({**inner.spaces, key: embedding_space})
        else:
            self.observation_space = spaces.Dict({"observation": inner, key: embedding_space})

    def embedding_at(self, ts: pd.Timestamp) -> npt.NDArray[np.float32]:
        """The embedding for time ``ts`` from the store or the live encoder."""
        if self.store is not None:
            t_ns = int(pd.Timestamp(ts).as_unit("ns").value)
            row = int(
                asof_positions(self.store.anchor_ns, np.array([t_ns]), self.max_staleness_ns)[0]
            )
            if row < 0:
                raise EmbeddingUnavailableError(
                    "no embedding at "
                    + unavailable_reason(self.store.anchor_ns, t_ns, self.max_staleness_ns)
                )
            return self.store.embeddings[row].copy()
        return self._live_embedding(ts)

    def _live_embedding(self, ts: pd.Timestamp) -> npt.NDArray[np.float32]:
        assert self.live is not None and self.bars_fn is not None
        self.live.update(self.bars_fn(self.env, ts))
        t_ns = int(pd.Timestamp(ts).as_unit("ns").value)
        latest = self.live.latest
        if latest is None:
            raise EmbeddingUnavailableError(
                f"no live embedding at {pd.Timestamp(ts)}: no valid window in the bars so far"
            )
        anchor_ns = int(latest[0].as_unit("ns").value)
        if anchor_ns > t_ns:
            raise EmbeddingUnavailableError(
                f"bars_fn delivered bars closing after {pd.Timestamp(ts)} (anchor {latest[0]}): "
                "it must return only bars closed by the asked time"
            )
        anchors = np.array([anchor_ns], dtype=np.int64)
        if asof_positions(anchors, np.array([t_ns]), self.max_staleness_ns)[0] < 0:
            raise EmbeddingUnavailableError(
                "no live embedding at " + unavailable_reason(anchors, t_ns, self.max_staleness_ns)
            )
        return np.asarray(latest[1], dtype=np.float32)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """Resets the env and, when encoding live, the encoder's bar history: an episode starts
        again at an earlier time, and a live encoder only moves forward in time."""
        if self.encoder is not None:
            self.live = self.encoder.engine.stream(pool=self.encoder.pool)
        return super().reset(**kwargs)

    def observation(self, observation: Any) -> Any:
        embedding = self.embedding_at(self.time_fn(self.env))
        if self.key is None:
            return embedding
        if isinstance(observation, dict):
            return {**observation, self.key: embedding}
        return {"observation": observation, self.key: embedding}
