"""FXTradingEnv: observations from bars closed by their time, fills at the next open."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

gym = pytest.importorskip("gymnasium", reason="the rl extra (gymnasium) is not installed")

from gymnasium.utils.env_checker import check_env  # noqa: E402

from stage1.data.timeframes import tf_ns  # noqa: E402
from stage1.errors import ConfigError, DataValidationError  # noqa: E402
from stage1.rl import FXTradingEnv  # noqa: E402
from stage1.rl.env import log_relative_window  # noqa: E402


def _env(frames, span, **kwargs) -> FXTradingEnv:
    return FXTradingEnv(frames, start=span[0], end=span[1], seq_len=16, **kwargs)


def _shift_bars_closing_after(frames, t: pd.Timestamp) -> dict[str, pd.DataFrame]:
    """Every bar that closes after ``t`` scaled by 1.01 (still valid OHLC)."""
    out = {}
    for tf, frame in frames.items():
        frame = frame.copy()
        later = frame.index + pd.Timedelta(tf_ns(tf), "ns") > t
        frame.loc[later, ["open", "high", "low", "close"]] *= 1.01
        out[tf] = frame
    return out


def test_observation_uses_only_bars_closed_by_its_time(frames, span) -> None:
    env = _env(frames, span)
    rng = np.random.default_rng(1)
    for k in rng.choice(env.n_steps - 1, 3, replace=False):
        t = env.decision_times[k]
        changed = _env(_shift_bars_closing_after(frames, t), span)
        assert changed.decision_times.equals(env.decision_times)
        np.testing.assert_array_equal(changed.market[: k + 1], env.market[: k + 1])
        # The next observation sees the changed bars (so this check can fail).
        assert not np.array_equal(changed.market[k + 1], env.market[k + 1])


def test_steps_fill_at_the_next_open_and_pay_the_cost(frames, span) -> None:
    env = _env(frames, span, cost_pips=0.5)
    base = frames["m1"]
    open_ns = base.index.as_unit("ns").asi8
    actions = [2, 2, 0, 1, 1, 2]
    obs, info = env.reset(seed=0)
    assert obs["position"][0] == 0.0
    position = 0.0
    for action in actions:
        t = info["time"]
        fill_row = int(np.searchsorted(open_ns, t.value, side="left"))  # first bar opened >= t
        assert info["fill_price"] == base["open"].iloc[fill_row]
        obs, reward, terminated, truncated, info = env.step(action)
        next_fill = base["open"].iloc[int(np.searchsorted(open_ns, info["time"].value))]
        new_position = float(action - 1)
        cost = 0.5 * 0.01 / base["open"].iloc[fill_row] * abs(new_position - position)
        expected = new_position * np.log(next_fill / base["open"].iloc[fill_row]) - cost
        assert reward == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert obs["position"][0] == new_position == info["position"]
        assert not terminated and not truncated
        position = new_position


def test_an_episode_is_the_date_range(frames, span) -> None:
    env = _env(frames, span, stride=10)
    times = env.decision_times
    assert times[0] >= span[0] and times[-1] <= span[1]
    assert len(times) == env.n_steps + 1
    env.reset()
    terminated = False
    for _ in range(env.n_steps):
        assert not terminated
        _, _, terminated, _, info = env.step(1)
    assert terminated and info["time"] == times[-1]
    with pytest.raises(ConfigError, match="the episode has ended"):
        env.step(1)
    _, info = env.reset()
    assert info["time"] == times[0]


def test_passes_gymnasiums_env_checker(frames, span) -> None:
    env = _env(frames, span, stride=50)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*infinity.*")  # embeddings are unbounded
        check_env(env, skip_render_check=True)
    assert env.observation_space["market"].shape == (6, 16, 4)


def test_bad_input_is_one_clear_error(frames, span) -> None:
    env = _env(frames, span, stride=50)
    env.reset()
    with pytest.raises(ConfigError, match=r"action: 3 is not in Discrete\(3\)"):
        env.step(3)
    with pytest.raises(ConfigError, match="cost_pips: must be >= 0"):
        _env(frames, span, cost_pips=-1)
    with pytest.raises(DataValidationError, match="an episode needs at least 2"):
        FXTradingEnv(frames, start="2030-01-01", seq_len=16)
    assert log_relative_window(np.full((1, 6, 16, 4), 110.0)).max() == 0.0
