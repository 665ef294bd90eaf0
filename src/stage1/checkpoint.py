"""Self-describing checkpoints: export ``stage1_best.pth`` and load it (or a Lightning ``.ckpt``).

An export is one dict readable with ``torch.load(weights_only=True)`` (tensors, plain dicts,
lists, strings and numbers only, so loading never unpickles arbitrary objects)::

    {'format': 'stage1-export-v1',
     'model_state_dict': {...},   # Stage1Model keys, no '_orig_mod.' / 'module.' wrappers
     'config': {...},             # the resolved config as a plain dict
     'normalizer': {...},         # TFNormalizer.to_dict()
     'epoch': int, 'best_loss': float | None,
     'versions': {'stage1', 'torch', 'lightning'}}

A Lightning ``.ckpt`` written by ``stage1 train`` is accepted too: its ``state_dict`` holds the
LightningModule's keys (``model.`` prefix) and its ``hyper_parameters`` hold ``config`` and
``normalizer_stats`` as plain dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from stage1.config import ConfigLike, as_config, config_to_dict
from stage1.errors import CheckpointError, Stage1Error
from stage1.utils import atomic_path

if TYPE_CHECKING:
    from stage1.model.model import Stage1Model

EXPORT_FORMAT = "stage1-export-v1"
# Module names that wrappers insert into parameter names: torch.compile and DDP/DataParallel.
WRAPPER_NAMES = frozenset({"_orig_mod", "module"})
# The LightningModule keeps the network as ``self.model``.
LIGHTNING_MODEL_PREFIX = "model."


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop every ``_orig_mod`` / ``module`` component from the keys, wherever it appears
    (``module._orig_mod.encoder.w`` and ``encoder._orig_mod.w`` both become ``encoder.w``)."""
    return {
        ".".join(part for part in key.split(".") if part not in WRAPPER_NAMES): value
        for key, value in state_dict.items()
    }


def package_versions() -> dict[str, str]:
    """Versions that wrote a checkpoint (helps explain a load failure months later)."""
    out = {"torch": str(torch.__version__)}  # TorchVersion is a class: weights_only refuses it
    for name in ("stage1", "lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def export_checkpoint(
    path: str | Path,
    model_state_dict: Mapping[str, torch.Tensor],
    config: ConfigLike,
    normalizer_stats: Mapping[str, Any],
    epoch: int,
    best_loss: float | None,
) -> Path:
    """Write the self-describing export to ``path`` atomically; return the path.

    Tensors are detached CPU copies so the file loads on a machine without the training device.
    The model's ``norm_mean``/``norm_std`` buffers are written from ``normalizer_stats``, so the
    guide's ``Stage1Model(config).load_state_dict(...)`` gets the statistics it was trained with.
    """
    path = Path(path)
    config_dict = config_to_dict(config)
    weights = {
        key: value.detach().cpu().clone()
        for key, value in strip_wrapper_prefixes(model_state_dict).items()
    }
    # The model's normaliser buffers ARE the checkpoint's statistics, whoever built the model.
    for key, name in (("norm_mean", "mean"), ("norm_std", "std")):
        if key in weights and name in normalizer_stats:
            value = torch.as_tensor(normalizer_stats[name], dtype=weights[key].dtype)
            if value.shape == weights[key].shape:  # else the loader names the mismatch
                weights[key] = value
    payload = {
        "format": EXPORT_FORMAT,
        "model_state_dict": weights,
        "config": config_dict,
        "normalizer": dict(normalizer_stats),
        "epoch": int(epoch),
        "best_loss": None if best_loss is None else float(best_loss),
        "versions": package_versions(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _load_failure_reason(exc: Exception) -> str:
    """The informative line of torch.load's error (weights_only errors bury it mid-message)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into one CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled objects: all unreadable
        raise CheckpointError(
            f"{path}: not a readable weights-only checkpoint ({_load_failure_reason(exc)})"
        ) from exc
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(blob).__name__}")
    return blob


def _require(blob: Mapping[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in blob:
        raise CheckpointError(f"{path}: missing key {key!r}")
    if not isinstance(blob[key], kind):
        raise CheckpointError(f"{path}: {key!r} must be a {kind.__name__}")
    return blob[key]


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(model state_dict, config dict, normalizer dict, meta)`` of an export or a stage1
    Lightning ``.ckpt``, without building the model. State keys are Stage1Model's own."""
    path = Path(path)
    blob = _read(path, map_location)
    if blob.get("format") == EXPORT_FORMAT:
        meta = {
            "source": "export",
            "format": EXPORT_FORMAT,
            "epoch": blob.get("epoch"),
            "best_loss": blob.get("best_loss"),
            "versions": blob.get("versions", {}),
        }
        return (
            strip_wrapper_prefixes(_require(blob, "model_state_dict", dict, path)),
            _require(blob, "config", dict, path),
            _require(blob, "normalizer", dict, path),
            meta,
        )
    if "state_dict" in blob and "hyper_parameters" in blob:
        hparams = _require(blob, "hyper_parameters", dict, path)
        state = {
            key[len(LIGHTNING_MODEL_PREFIX) :]: value
            for key, value in _require(blob, "state_dict", dict, path).items()
            if key.startswith(LIGHTNING_MODEL_PREFIX)
        }
        meta = {
            "source": "lightning",
            "format": "lightning",
            "epoch": blob.get("epoch"),
            "global_step": blob.get("global_step"),
            "best_loss": None,
            "versions": {"lightning": str(blob.get("pytorch-lightning_version", "unknown"))},
        }
        return (
            strip_wrapper_prefixes(state),
            _require(hparams, "config", dict, path),
            _require(hparams, "normalizer_stats", dict, path),
            meta,
        )
    raise CheckpointError(
        f"{path}: unknown checkpoint format (neither {EXPORT_FORMAT!r} nor a stage1 Lightning .ckpt)"
    )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Stage1Model, DictConfig, dict[str, Any], dict[str, Any]]:
    """Rebuild the trained network from an export (``.pth``) or a Lightning ``.ckpt``.

    Returns ``(model in eval mode on map_location, config, normalizer stats, meta)``; ``meta``
    has ``source`` ('export' | 'lightning'), ``epoch``, ``best_loss`` and ``versions``.
    Raises :class:`CheckpointError` (one line naming the file) when the file is missing,
    corrupt, of another format, or does not fit the network its config describes.
    """
    from stage1.model.model import Stage1Model

    path = Path(path)
    state_dict, config_dict, normalizer, meta = read_checkpoint(path, map_location)
    try:
        config = as_config(config_dict)
        model = Stage1Model(config)
    except Stage1Error as exc:
        raise CheckpointError(f"{path}: stored config is invalid ({exc})") from exc
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{path}: weights do not fit the model its config describes ({detail})"
        ) from exc
    model.to(map_location).eval()
    return model, config, normalizer, meta
