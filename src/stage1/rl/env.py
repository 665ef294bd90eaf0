"""FXTradingEnv: a minimal FX environment for examples and tests. NOT a backtester.

It has one instrument, three positions (short / flat / long), a constant cost per unit of
position change, no spread model, slippage, financing, margin or position sizing. Its only
rules are the ones look-ahead hides behind:

* decision times are window anchors of the training sampler (the close of a base bar), and the
  observation at anchor ``t`` comes from the window at ``t``, built only from bars closed by
  ``t`` (:class:`MultiTFWindowSampler`);
* the position chosen at ``t`` fills at the OPEN of the next base bar (opened at or after ``t``);
* the reward of a step is ``position × log(next fill / this fill) − cost × |position change|``,
  with the cost ``cost_pips`` pips as a log return at the fill price;
* an episode is the decision times in ``[start, end]`` (every ``stride``-th anchor).

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

from stage1.data.io import bars_from_frame, validate_bars
from stage1.data.sampler import MultiTFWindowSampler
from stage1.data.timeframes import sort_timeframes, tf_ns
from stage1.errors import ConfigError, DataValidationError
from stage1.evaluation.metrics import pip_size
from stage1.inference import Stage1InferenceEngine, TimeLike, to_utc_ns

# Observations are computed ahead for all decision times, this many windows per call.
FEATURE_CHUNK = 4096
POSITIONS = np.array([-1.0, 0.0, 1.0])  # action 0, 1, 2

WindowFeatures = Callable[[npt.NDArray[np.float64]], npt.NDArray[Any]]


def log_relative_window(ohlc: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """``log(ohlc / first base open)`` per window, ``[B, n_tf, L, 4]`` float32: small numbers
    that keep their precision in float32 (SB3 casts observations to float32, and absolute JPY
    prices would lose ~1e-7 of their value, a large part of a minute's move).
    :class:`Stage1FeaturesExtractor` turns it back into prices (``exp``) in float64; Stage 1's
    features are scale-free, so that reads like the raw window."""
    return np.log(ohlc / ohlc[:, :1, :1, :1]).astype(np.float32)


def model_input_features(engine: Stage1InferenceEngine) -> WindowFeatures:
    """The model's own input (normalised ``[n_tf, L, 6]`` features of the window): the "raw
    window" observation."""
    return lambda ohlc: engine.window_features(ohlc).numpy()


def probe_summary_features(engine: Stage1InferenceEngine) -> WindowFeatures:
    """The probe's hand-made features (``window_summary_features``: newest bar's features,
    realised volatility and range per timeframe), ``[n_tf * 8]``."""
    from stage1.evaluation.probe import window_summary_features

    def summary(ohlc: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        raw, _ = engine.feature_engineer.process_batch(ohlc)
        normalized = engine.normalizer.normalize(raw)
        return window_summary_features(raw.numpy(), normalized.numpy()).astype(np.float32)

    return summary


class FXTradingEnv(gym.Env[dict[str, npt.NDArray[np.float32]], int]):
    """``bars``: ``{tf: DataFrame}`` (``load_tf_data`` layout); ``features``: a function of a
    batch of windows ``ohlc [B, n_tf, seq_len, 4]`` float64 → ``[B, ...]`` (e.g.
    :func:`log_relative_window`, :func:`probe_summary_features`, or ``None`` for no market
    observation); ``seq_len`` / ``staleness_factor``: the window rule (use the checkpoint's to
    line decision times up with an :class:`EmbeddingStore`).

    Observation: ``{'market': features at t, 'position': [current position]}`` (``market``
    absent without features). Action: ``Discrete(3)``, 0 short, 1 flat, 2 long. ``info``:
    ``time`` (observation time), ``position``, ``fill_price``, ``cost``.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012  (gymnasium's convention)

    def __init__(
        self,
        bars: Mapping[str, pd.DataFrame],
        features: WindowFeatures | None = log_relative_window,
        cost_pips: float = 0.5,
        start: TimeLike = None,
        end: TimeLike = None,
        seq_len: int = 32,
        staleness_factor: float = 1.0,
        stride: int = 1,
        timeframes: list[str] | None = None,
    ) -> None:
        super().__init__()
        if cost_pips < 0:
            raise ConfigError(f"cost_pips: must be >= 0, got {cost_pips}")
        if stride < 1:
            raise ConfigError(f"stride: must be >= 1, got {stride}")
        names = sort_timeframes(list(timeframes or bars))
        missing = [tf for tf in names if tf not in bars]
        if missing:
            raise DataValidationError(f"bars: missing timeframe(s) {missing}")
        self.bars: dict[str, pd.DataFrame] = {}
        for tf in names:
            frame = bars_from_frame(bars[tf], f"bars[{tf!r}]")
            validate_bars(frame, f"bars[{tf!r}]")
            self.bars[tf] = frame
        self.sampler = MultiTFWindowSampler(self.bars, seq_len, staleness_factor)
        base = self.bars[self.sampler.base_tf]
        self.window_ids = decision_windows(self.sampler, len(base), start, end, stride)
        fill_rows = self.sampler.end_rows[self.window_ids, 0] + 1
        self.fill_prices = base["open"].to_numpy()[fill_rows]
        self.times_ns = self.sampler.anchor_ns[self.window_ids]
        self.pip = pip_size(float(np.median(self.fill_prices)))
        self.cost_log = cost_pips * self.pip / self.fill_prices  # per unit of position change
        self._close_ns = {
            tf: pd.DatetimeIndex(frame.index).as_unit("ns").asi8 + tf_ns(tf)
            for tf, frame in self.bars.items()
        }
        self.market = None if features is None else self._compute(features)
        obs_spaces: dict[str, spaces.Space[Any]] = {
            "position": spaces.Box(-1.0, 1.0, (1,), np.float32)
        }
        if self.market is not None:
            obs_spaces["market"] = spaces.Box(-np.inf, np.inf, self.market.shape[1:], np.float32)
        self.observation_space = spaces.Dict(obs_spaces)  # type: ignore[assignment]
        self.action_space = spaces.Discrete(3)  # type: ignore[assignment]
        self.step_index = 0
        self.position = 0.0

    def _compute(self, features: WindowFeatures) -> npt.NDArray[np.float32]:
        chunks = [
            np.asarray(features(self.sampler.gather(self.window_ids[i : i + FEATURE_CHUNK])[0]))
            for i in range(0, len(self.window_ids), FEATURE_CHUNK)
        ]
        return np.concatenate(chunks).astype(np.float32)

    # ------------------------------------------------------------------------ time
    @property
    def n_steps(self) -> int:
        """Steps per episode: one per decision time except the last (it has no next fill)."""
        return len(self.window_ids) - 1

    @property
    def decision_times(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(self.times_ns.view("datetime64[ns]")).tz_localize("UTC")

    @property
    def current_time(self) -> pd.Timestamp:
        """The time of the current observation (an anchor: a base bar's close)."""
        return pd.Timestamp(int(self.times_ns[self.step_index]), tz="UTC")

    def bars_closed_by(self, ts: TimeLike, n: int) -> dict[str, pd.DataFrame]:
        """The newest ``n`` bars of each timeframe that closed at or before ``ts`` (for a
        live encoder: what a live feed would have delivered by then)."""
        t_ns = to_utc_ns(ts, "ts")
        if t_ns is None:
            raise ConfigError("ts: a time is required")
        out = {}
        for tf, frame in self.bars.items():
            stop = int(np.searchsorted(self._close_ns[tf], t_ns, side="right"))
            out[tf] = frame.iloc[max(0, stop - n) : stop]
        return out

    # ------------------------------------------------------------------------ gym API
    def _obs(self) -> dict[str, npt.NDArray[np.float32]]:
        obs = {"position": np.array([self.position], dtype=np.float32)}
        if self.market is not None:
            obs["market"] = self.market[self.step_index].copy()  # the caller may keep it
        return obs

    def _info(self, cost: float = 0.0) -> dict[str, Any]:
        return {
            "time": self.current_time,
            "position": self.position,
            "fill_price": float(self.fill_prices[self.step_index]),
            "cost": cost,
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, Any]]:
        super().reset(seed=seed)
        self.step_index, self.position = 0, 0.0
        return self._obs(), self._info()

    def step(
        self, action: int
    ) -> tuple[dict[str, npt.NDArray[np.float32]], float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ConfigError(f"action: {action!r} is not in Discrete(3) (0 short, 1 flat, 2 long)")
        if self.step_index >= self.n_steps:
            raise ConfigError("step: the episode has ended; call reset()")
        i = self.step_index
        new_position = float(POSITIONS[int(action)])
        cost = float(self.cost_log[i] * abs(new_position - self.position))
        log_return = float(np.log(self.fill_prices[i + 1] / self.fill_prices[i]))
        reward = new_position * log_return - cost
        self.position = new_position
        self.step_index = i + 1
        terminated = self.step_index >= self.n_steps
        return self._obs(), reward, terminated, False, self._info(cost)


def decision_windows(
    sampler: MultiTFWindowSampler, n_base_bars: int, start: TimeLike, end: TimeLike, stride: int
) -> npt.NDArray[np.int64]:
    """Window ids of the decision times: anchors in ``[start, end]``, every ``stride``-th, each
    with a next base bar to fill at. At least two are needed (one step)."""
    start_ns, end_ns = to_utc_ns(start, "start"), to_utc_ns(end, "end")
    anchors = sampler.anchor_ns
    first = 0 if start_ns is None else int(np.searchsorted(anchors, start_ns, side="left"))
    stop = len(anchors) if end_ns is None else int(np.searchsorted(anchors, end_ns, "right"))
    ids = np.arange(first, stop, stride, dtype=np.int64)
    ids = ids[sampler.end_rows[ids, 0] + 1 < n_base_bars]
    if len(ids) < 2:
        raise DataValidationError(
            f"start/end: [{start}, {end}] holds {len(ids)} decision time(s) with a next bar; "
            "an episode needs at least 2"
        )
    return ids
