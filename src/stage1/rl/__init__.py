"""Stage 2 surfaces: what an RL agent needs from Stage 1, with no glue left to write.

* :class:`Stage1Encoder` (:mod:`stage1.rl.encoder`): the encoder as an ``nn.Module``, raw OHLC
  windows in, pooled ``[B, dim]`` out, frozen by default.
* :class:`EmbeddingStore` (:mod:`stage1.rl.store`): point-in-time embeddings; ``asof(ts)`` is
  the newest anchor at or before ``ts``, never a later one.
* :class:`Stage1ObservationWrapper` (:mod:`stage1.rl.wrapper`, needs gymnasium).
* :class:`Stage1FeaturesExtractor` (:mod:`stage1.rl.extractor`, needs stable-baselines3).
* :class:`FXTradingEnv` (:mod:`stage1.rl.env`, needs gymnasium): a small example env.

Names are imported lazily: ``import stage1.rl`` needs neither gymnasium nor stable-baselines3,
and asking for a name whose library is missing says how to install it.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Stage1Encoder": "stage1.rl.encoder",
    "EmbeddingStore": "stage1.rl.store",
    "EmbeddingUnavailableError": "stage1.rl.store",
    "Stage1ObservationWrapper": "stage1.rl.wrapper",
    "Stage1FeaturesExtractor": "stage1.rl.extractor",
    "FXTradingEnv": "stage1.rl.env",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'stage1.rl' has no attribute {name!r}")
    try:
        module = importlib.import_module(_LAZY[name])
    except ModuleNotFoundError as exc:
        if exc.name in ("gymnasium", "stable_baselines3"):
            raise ModuleNotFoundError(
                f"stage1.rl.{name} needs {exc.name}: pip install 'stage1[rl]' "
                "(gymnasium and stable-baselines3)",
                name=exc.name,
            ) from exc
        raise
    return getattr(module, name)
