"""Stage1FeaturesExtractor inside PPO: pretrained weights survive orthogonal init and learning,
the encoder stays in eval mode, a saved agent loads and acts the same."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="the rl extra (gymnasium) is not installed")
sb3 = pytest.importorskip(
    "stable_baselines3", reason="the rl extra (stable-baselines3) is not installed"
)

from gymnasium import spaces  # noqa: E402
from gymnasium.wrappers import TransformObservation  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.policies import ActorCriticPolicy  # noqa: E402

from stage1.checkpoint import read_checkpoint  # noqa: E402
from stage1.errors import ConfigError  # noqa: E402
from stage1.rl import FXTradingEnv, Stage1Encoder, Stage1FeaturesExtractor  # noqa: E402


def _kwargs(checkpoint: Path, **extra) -> dict:
    return {
        "features_extractor_class": Stage1FeaturesExtractor,
        "features_extractor_kwargs": {"checkpoint": checkpoint, "pool": "mean", **extra},
    }


def _same_as_checkpoint(model: torch.nn.Module, checkpoint: Path) -> bool:
    pretrained, _, _, _ = read_checkpoint(checkpoint)
    state = model.state_dict()
    return state.keys() == pretrained.keys() and all(
        torch.equal(state[key], pretrained[key]) for key in pretrained
    )


def test_orthogonal_init_would_overwrite_the_encoder_without_the_guard(checkpoint: Path) -> None:
    """The threat is real: SB3's init, applied the plain way, changes the encoder's Linears."""
    encoder = Stage1Encoder.from_checkpoint(checkpoint, device="cpu")
    torch.nn.Module.apply(encoder, partial(ActorCriticPolicy.init_weights, gain=np.sqrt(2)))
    assert not _same_as_checkpoint(encoder.model, checkpoint)


def test_ppo_keeps_the_frozen_encoder_bit_identical_and_in_eval_mode(
    checkpoint: Path, frames, span, tmp_path: Path
) -> None:
    env = FXTradingEnv(frames, start=span[0], end=span[1], seq_len=16, stride=2)
    agent = PPO(
        "MultiInputPolicy",
        env,
        n_steps=512,
        batch_size=256,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=_kwargs(checkpoint, passthrough_keys=("position",)),
    )
    extractor = agent.policy.features_extractor
    assert isinstance(extractor, Stage1FeaturesExtractor)
    assert extractor.features_dim == 6 * 64 + 1
    assert _same_as_checkpoint(extractor.encoder.model, checkpoint)  # after construction
    head_before = [p.detach().clone() for p in agent.policy.action_net.parameters()]
    agent.learn(2048)
    assert _same_as_checkpoint(extractor.encoder.model, checkpoint)  # after learning
    assert any(
        not torch.equal(a, b)
        for a, b in zip(head_before, agent.policy.action_net.parameters(), strict=True)
    )
    agent.policy.set_training_mode(True)
    assert agent.policy.training
    assert not any(m.training for m in extractor.encoder.model.modules())

    observations = {
        "market": env.market[:64],
        "position": np.tile(np.float32([[0.0], [1.0]]), (32, 1)),
    }
    actions, _ = agent.predict(observations, deterministic=True)
    agent.save(tmp_path / "agent.zip")
    loaded = PPO.load(tmp_path / "agent.zip", device="cpu")
    np.testing.assert_array_equal(loaded.predict(observations, deterministic=True)[0], actions)
    assert _same_as_checkpoint(loaded.policy.features_extractor.encoder.model, checkpoint)


def test_mlp_policy_on_a_window_box(checkpoint: Path, frames, span) -> None:
    env = FXTradingEnv(frames, start=span[0], end=span[1], seq_len=16, stride=20)
    window_only = TransformObservation(
        env, lambda obs: obs["market"], env.observation_space["market"]
    )
    agent = PPO(
        "MlpPolicy",
        window_only,
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        device="cpu",
        policy_kwargs=_kwargs(checkpoint),
    )
    extractor = agent.policy.features_extractor
    assert extractor.features_dim == 6 * 64
    assert _same_as_checkpoint(extractor.encoder.model, checkpoint)
    # The extractor's embedding of a log-relative window equals the encoder's of its prices.
    ohlc = env.sampler.gather(env.window_ids[:4])[0]
    with torch.no_grad():
        features = extractor(torch.from_numpy(env.market[:4]))
    np.testing.assert_allclose(features, extractor.encoder(ohlc), rtol=1e-4, atol=1e-5)


def test_mismatched_observation_space_is_a_clear_error(checkpoint: Path) -> None:
    wrong = spaces.Box(-1.0, 1.0, (6, 15, 4), np.float32)
    with pytest.raises(ConfigError, match=r"window must have shape \(6, 16, 4\)"):
        Stage1FeaturesExtractor(wrong, checkpoint)
    space = spaces.Dict({"market": spaces.Box(-1.0, 1.0, (6, 16, 4), np.float32)})
    with pytest.raises(ConfigError, match=r"passthrough_keys: \['position'\] not in"):
        Stage1FeaturesExtractor(space, checkpoint, passthrough_keys=("position",))


def test_a_calendar_model_is_refused_at_construction(
    tmp_path: Path, synthetic_data_dir: Path, rl_config
) -> None:
    """A model with calendar inputs needs bar open times the extractor cannot get: one clear
    error when the policy is built, not a failure inside the first rollout."""
    from omegaconf import OmegaConf

    from stage1.checkpoint import export_checkpoint
    from stage1.data.dataset import Stage1Dataset
    from stage1.model.model import Stage1Model

    config = OmegaConf.merge(rl_config, {"model": {"time_features": True}})
    normalizer = Stage1Dataset(synthetic_data_dir, config, "train").normalizer
    path = export_checkpoint(
        tmp_path / "calendar.pth", Stage1Model(config).state_dict(), config,
        normalizer.to_dict(), 0, None,
    )  # fmt: skip
    space = spaces.Box(-1.0, 1.0, (6, 16, 4), np.float32)
    with pytest.raises(ConfigError, match=r"model\.time_features=true .* EmbeddingStore"):
        Stage1FeaturesExtractor(space, path)
