"""PPO on FXTradingEnv with three observations, same seeds: does Stage 1 help an RL agent?

(a) ``embedding``: Stage 1 embeddings from an :class:`EmbeddingStore` through
    :class:`Stage1ObservationWrapper`; (b) ``summary``: the probe's hand-made window features
    (newest bar, realised volatility and range per timeframe); (c) ``window``: the raw window
    (the model's own normalised input features, flattened by the policy). All three also see the
    current position. Each is trained with PPO on a train period and scored out of sample, with a
    deterministic policy, on a later test period; flat and always-long are shown for scale.

    python examples/ppo_fx.py --ckpt runs/stage1_demo/checkpoints/stage1_best.pth \\
        --data_dir data/usdjpy --out runs/ppo_fx

Prints and writes ``results.json`` and ``results.md`` (mean reward per step in basis points of
log return, after costs, over seeds) and ``equity.png`` (cumulative test reward). An example, not
a backtest: see :class:`stage1.rl.env.FXTradingEnv` for what the env leaves out.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from gymnasium.wrappers import TransformReward
from stable_baselines3 import PPO

from stage1.data.io import load_tf_data
from stage1.inference import Stage1InferenceEngine
from stage1.rl import EmbeddingStore, FXTradingEnv, Stage1ObservationWrapper
from stage1.rl.env import model_input_features, probe_summary_features

BP = 1e4  # rewards are log returns; reported (and trained on) in basis points
VARIANTS = ("embedding", "summary", "window")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="Stage 1 checkpoint (stage1_best.pth)")
    parser.add_argument("--data_dir", required=True, help="prepared data directory")
    parser.add_argument("--out", default="runs/ppo_fx", help="output directory")
    parser.add_argument("--train", nargs=2, default=["2019-03-01", "2019-06-30"], metavar="T")
    parser.add_argument("--test", nargs=2, default=["2019-09-01", "2019-12-20"], metavar="T")
    parser.add_argument("--stride", type=int, default=15, help="decide every N base bars")
    parser.add_argument("--timesteps", type=int, default=20_000, help="PPO steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cost_pips", type=float, default=0.5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    return parser.parse_args()


class Setup:
    """Envs for one variant: a train env (reward in bp) and a test env."""

    def __init__(self, args: argparse.Namespace, engine: Stage1InferenceEngine, frames: Any):
        self.args, self.engine, self.frames = args, engine, frames
        self.stores: dict[str, EmbeddingStore] = {}

    def env(self, variant: str, period: str) -> Any:
        start, end = getattr(self.args, period)
        features: Callable[[np.ndarray], np.ndarray] | None = {
            "embedding": None,
            "summary": probe_summary_features(self.engine),
            "window": model_input_features(self.engine),
        }[variant]
        common = {
            "cost_pips": self.args.cost_pips,
            "start": start,
            "end": end,
            "seq_len": self.engine.seq_len,
            "staleness_factor": float(self.engine.config.data.staleness_factor),
            "stride": self.args.stride,
            "timeframes": self.engine.timeframes,
        }
        env: Any = FXTradingEnv(self.frames, features=features, **common)
        if variant == "embedding":
            env = Stage1ObservationWrapper(env, store=self.store(period), key="stage1")
        return env

    def store(self, period: str) -> EmbeddingStore:
        """One store per period, built with the env's start and stride (same anchors)."""
        if period not in self.stores:
            start, end = getattr(self.args, period)
            self.stores[period] = EmbeddingStore.build(
                self.args.ckpt, self.frames, start, end, stride=self.args.stride, device="cpu"
            )
        return self.stores[period]


def evaluate(agent: PPO | None, env: Any, fixed_action: int | None = None) -> np.ndarray:
    """Rewards (bp) of one deterministic pass over the env's episode."""
    obs, _ = env.reset()
    rewards, done = [], False
    while not done:
        action = fixed_action if agent is None else int(agent.predict(obs, deterministic=True)[0])
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward * BP)
        done = terminated or truncated
    return np.asarray(rewards)


def train(setup: Setup, variant: str, seed: int) -> tuple[PPO, float]:
    env = TransformReward(setup.env(variant, "train"), lambda r: r * BP)
    agent = PPO(
        "MultiInputPolicy",
        env,
        n_steps=1024,
        batch_size=256,
        n_epochs=4,
        learning_rate=3e-4,
        ent_coef=0.01,
        seed=seed,
        device="cpu",
        verbose=0,
    )
    started = time.process_time()
    agent.learn(setup.args.timesteps)
    return agent, time.process_time() - started


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Stage1InferenceEngine(args.ckpt, device="cpu")
    frames = load_tf_data(args.data_dir, engine.timeframes)
    period = engine.normalizer.train_period
    if period is not None and pd.Timestamp(args.test[0], tz="UTC") <= pd.Timestamp(period[1]):
        print(f"WARNING: the test period starts inside the encoder's train period {period}")
    setup = Setup(args, engine, frames)
    started = time.process_time()
    test_envs = {variant: setup.env(variant, "test") for variant in args.variants}
    setup.store("train")
    prep_cpu_s = time.process_time() - started
    print(f"stores and envs ready in {prep_cpu_s:.0f} CPU s")

    results: dict[str, Any] = {"baselines": {}, "variants": {}}
    curves: dict[str, list[np.ndarray]] = {}
    base_env = next(iter(test_envs.values()))
    for name, action in (("flat", 1), ("long", 2)):
        rewards = evaluate(None, base_env, action)
        results["baselines"][name] = float(rewards.mean())
        curves[name] = [rewards]
    for variant in args.variants:
        per_seed, train_means, cpu = [], [], 0.0
        curves[variant] = []
        for seed in args.seeds:
            agent, seconds = train(setup, variant, seed)
            cpu += seconds
            rewards = evaluate(agent, test_envs[variant])
            per_seed.append(float(rewards.mean()))
            train_means.append(float(evaluate(agent, setup.env(variant, "train")).mean()))
            curves[variant].append(rewards)
            print(f"{variant} seed {seed}: test {per_seed[-1]:+.3f} bp/step")
        results["variants"][variant] = {
            "test_mean_bp": float(np.mean(per_seed)),
            "test_std_bp": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
            "test_per_seed_bp": per_seed,
            "train_mean_bp": float(np.mean(train_means)),
            "train_cpu_s": cpu,
        }
    n_test_steps = base_env.unwrapped.n_steps
    results["settings"] = {
        **vars(args),
        "checkpoint_train_period": period,
        "test_steps": n_test_steps,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results, args)
    (out / "results.md").write_text(table)
    plot_equity(curves, base_env.unwrapped.decision_times[1:], out / "equity.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'equity.png'}")


def markdown_table(results: dict[str, Any], args: argparse.Namespace) -> str:
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"| observation | test mean reward (bp/step), mean ± sd over seeds {seeds} | per seed | "
        "train (in-sample) bp/step | PPO CPU s |",
        "|---|---|---|---|---|",
    ]
    for variant, row in results["variants"].items():
        per_seed = " / ".join(f"{v:+.3f}" for v in row["test_per_seed_bp"])
        lines.append(
            f"| {variant} | {row['test_mean_bp']:+.3f} ± {row['test_std_bp']:.3f} | {per_seed} | "
            f"{row['train_mean_bp']:+.3f} | {row['train_cpu_s']:.0f} |"
        )
    for name, value in results["baselines"].items():
        lines.append(f"| always {name} | {value:+.3f} | — | — | — |")
    return "\n".join(lines) + "\n"


def plot_equity(curves: dict[str, list[np.ndarray]], times: pd.DatetimeIndex, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    colours = {"embedding": "C0", "summary": "C1", "window": "C2", "long": "0.4", "flat": "0.7"}
    for name, runs in curves.items():
        for k, rewards in enumerate(runs):
            ax.plot(
                times[: len(rewards)],
                np.cumsum(rewards),
                color=colours.get(name, "C3"),
                alpha=0.8 if len(runs) == 1 else 0.55,
                label=name if k == 0 else None,
            )
    ax.set_ylabel("cumulative reward (bp of log return, after costs)")
    ax.set_title("PPO on FXTradingEnv, test period (deterministic policy, one line per seed)")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
