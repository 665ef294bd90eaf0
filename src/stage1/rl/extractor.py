"""Stage1FeaturesExtractor: Stage 1's encoder as a Stable-Baselines3 features extractor.

Two things in SB3 would silently spoil a pretrained encoder inside a policy, and both are
defended against here:

* ``ActorCriticPolicy`` (PPO, A2C) with ``ortho_init=True`` (the default) calls
  ``features_extractor.apply(init_weights)``, which re-initialises every ``nn.Linear`` it
  visits orthogonally, the encoder's included. ``apply`` is overridden so that it does not
  descend into the encoder (frozen or not); its weights stay the checkpoint's (tested bit
  for bit before construction, after construction and after learning).
* ``policy.set_training_mode(True)`` puts every module in train mode (dropout on). A frozen
  :class:`Stage1Encoder` keeps its model in eval mode whatever ``train()`` is called with.

Observations: the window as log prices relative to its first open, ``[n_tf, seq_len, 4]``
(:func:`stage1.rl.env.log_relative_window`; SB3 hands Box observations over as float32, in
which absolute JPY prices would lose precision), either as the whole ``Box`` or under
``window_key`` of a ``Dict`` together with ``passthrough_keys`` (e.g. the position) that are
flattened and concatenated after the embedding.

Needs stable-baselines3 (``pip install stage1[rl]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_flattened_obs_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from stage1.errors import ConfigError
from stage1.rl.encoder import Stage1Encoder


class Stage1FeaturesExtractor(BaseFeaturesExtractor):
    """``features_dim = encoder.dim + sum of the passthrough keys' flattened sizes``.

    Pass through ``policy_kwargs=dict(features_extractor_class=Stage1FeaturesExtractor,
    features_extractor_kwargs=dict(checkpoint=path, pool='mean', passthrough_keys=('position',)))``.
    The checkpoint path is stored in the saved agent's kwargs, so ``PPO.load`` needs the file
    at that path again (its weights are then overwritten by the agent's saved ones).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        checkpoint: str | Path,
        pool: str = "mean",
        freeze: bool = True,
        passthrough_keys: Sequence[str] = (),
        window_key: str = "market",
        device: str | None = "cpu",
    ) -> None:
        encoder = Stage1Encoder.from_checkpoint(checkpoint, pool=pool, freeze=freeze, device=device)
        if encoder.model.time_features:
            raise ConfigError(
                f"{checkpoint}: this model was trained with model.time_features=true and needs "
                "each bar's open time, which SB3's float32 observations cannot carry exactly; "
                "serve its embeddings through EmbeddingStore (FXTradingEnv's store) or call "
                "Stage1Encoder(ohlc, times) yourself"
            )
        keys = list(passthrough_keys)
        if isinstance(observation_space, spaces.Dict):
            if window_key not in observation_space.spaces:
                raise ConfigError(
                    f"window_key: {window_key!r} is not in the observation space "
                    f"(keys: {list(observation_space.spaces)})"
                )
            window_space = observation_space.spaces[window_key]
            unknown = [key for key in keys if key not in observation_space.spaces]
            if unknown:
                raise ConfigError(f"passthrough_keys: {unknown} not in the observation space")
            extra = sum(get_flattened_obs_dim(observation_space.spaces[key]) for key in keys)
        else:
            if keys:
                raise ConfigError("passthrough_keys: need a Dict observation space")
            window_space, extra = observation_space, 0
        if tuple(window_space.shape or ()) != encoder.input_shape:
            raise ConfigError(
                f"observation space: the window must have shape {encoder.input_shape} "
                f"(timeframes {encoder.timeframes}, seq_len {encoder.seq_len}, OHLC), "
                f"got {window_space.shape}"
            )
        super().__init__(observation_space, features_dim=encoder.dim + extra)
        self.encoder = encoder
        self.passthrough_keys = keys
        self.window_key = window_key if isinstance(observation_space, spaces.Dict) else None

    def apply(self, fn: Callable[[nn.Module], None]) -> Stage1FeaturesExtractor:
        """``nn.Module.apply`` that skips the encoder: SB3's orthogonal init goes through
        ``apply``, and the encoder must start from its pretrained weights, frozen or not
        (fine-tuning from a random re-initialisation would throw Stage 1 away)."""
        for child in self.children():
            if child is not self.encoder:
                child.apply(fn)
        fn(self)
        return self

    def forward(self, observations: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(observations, dict):
            window = observations[self.window_key or ""]
            parts = [self.encoder(window.double().exp())]
            parts += [observations[key].flatten(1).float() for key in self.passthrough_keys]
            return torch.cat(parts, dim=1)
        return self.encoder(observations.double().exp())
