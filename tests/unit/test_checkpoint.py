"""Export and load of self-describing checkpoints (stage1.checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from stage1.checkpoint import (
    EXPORT_FORMAT,
    export_checkpoint,
    load_checkpoint,
    strip_wrapper_prefixes,
)
from stage1.config import config_to_dict, load_config
from stage1.errors import CheckpointError, ConfigError
from stage1.model.model import Stage1Model

# The layout TFNormalizer.to_dict() produces: plain lists, so weights_only loading accepts it.
NORMALIZER = {
    "timeframes": ["m1", "m5", "m15", "m30", "h1", "h4"],
    "feature_names": ["open", "high", "low", "close", "delta_close", "body_ratio"],
    "mean": [[0.0] * 6] * 6,
    "std": [[1.0] * 6] * 6,
}


@pytest.fixture(scope="module")
def config() -> DictConfig:
    return load_config("test")


@pytest.fixture(scope="module")
def model(config: DictConfig) -> Stage1Model:
    torch.manual_seed(0)
    return Stage1Model(config).eval()


def _inputs(config: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n_tf, seq_len = len(config.data.timeframes), config.data.seq_len
    x = torch.randn(3, n_tf, seq_len, 6, generator=gen)
    masks = torch.rand(3, n_tf, seq_len, generator=gen) < 0.2
    return x, masks


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, config: DictConfig) -> None:
    x, masks = _inputs(config)
    with torch.no_grad():
        out_a, out_b = a(x, masks), b(x, masks)
    for key in ("reconstructed", "encoded"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)


def test_strip_wrapper_prefixes_anywhere_in_key() -> None:
    weight = torch.zeros(1)
    stripped = strip_wrapper_prefixes(
        {
            "module._orig_mod.encoder.w": weight,
            "encoder._orig_mod.layers.0.b": weight,
            "stems.0.depthwise.weight": weight,
        }
    )
    assert list(stripped) == ["encoder.w", "encoder.layers.0.b", "stems.0.depthwise.weight"]


def test_export_is_weights_only_and_self_describing(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    path = export_checkpoint(
        tmp_path / "stage1_best.pth", model.state_dict(), config, NORMALIZER, 3, 0.25
    )
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == EXPORT_FORMAT
    assert blob["config"] == config_to_dict(config)
    assert blob["normalizer"] == NORMALIZER
    assert (blob["epoch"], blob["best_loss"]) == (3, 0.25)
    assert set(blob["versions"]) == {"stage1", "torch", "lightning"}
    assert blob["model_state_dict"].keys() == model.state_dict().keys()
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temp file behind"


def test_wrapped_weights_load_into_an_equal_model(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    """Weights saved from a DDP-wrapped, compiled model come back without the wrappers."""
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    path = export_checkpoint(tmp_path / "m.pth", wrapped, config, NORMALIZER, 1, None)
    loaded, loaded_config, normalizer, meta = load_checkpoint(path)
    assert config_to_dict(loaded_config) == config_to_dict(config)
    assert normalizer == NORMALIZER
    assert meta["source"] == "export" and meta["best_loss"] is None
    assert not loaded.training
    _assert_same_outputs(model, loaded, config)


def test_lightning_checkpoint_layout_is_accepted(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    """A .ckpt as stage1 train writes it: LightningModule keys ('model.' prefix) + hparams."""
    ckpt = {
        "epoch": 4,
        "global_step": 40,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            "criterion.norm_std": torch.ones(6, 6),  # non-model state is ignored
        },
        "hyper_parameters": {"config": config_to_dict(config), "normalizer_stats": NORMALIZER},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded, _, normalizer, meta = load_checkpoint(tmp_path / "last.ckpt")
    assert (meta["source"], meta["epoch"], meta["global_step"]) == ("lightning", 4, 40)
    assert normalizer == NORMALIZER
    _assert_same_outputs(model, loaded, config)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth: checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_corrupt_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"PK\x03\x04 this is not a torch archive")
    with pytest.raises(CheckpointError, match=r"corrupt\.pth: not a readable"):
        load_checkpoint(path)


def test_truncated_export_is_a_checkpoint_error(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    path = export_checkpoint(tmp_path / "t.pth", model.state_dict(), config, NORMALIZER, 1, 0.1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"t\.pth: not a readable"):
        load_checkpoint(path)


def test_pickled_objects_are_refused(tmp_path: Path, model: Stage1Model) -> None:
    """A whole pickled nn.Module needs arbitrary unpickling: refused, not executed."""
    path = tmp_path / "pickled.pth"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pth: not a readable weights-only"):
        load_checkpoint(path)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth: unknown checkpoint format"):
        load_checkpoint(path)


def test_export_missing_a_key_is_refused(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    path = export_checkpoint(tmp_path / "k.pth", model.state_dict(), config, NORMALIZER, 1, 0.1)
    blob = torch.load(path, weights_only=True)
    del blob["normalizer"]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"k\.pth: missing key 'normalizer'"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_refused(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    wider = load_config("test", ["model.d_model=32"])
    path = export_checkpoint(tmp_path / "w.pth", model.state_dict(), wider, NORMALIZER, 1, 0.1)
    with pytest.raises(CheckpointError, match=r"w\.pth: weights do not fit"):
        load_checkpoint(path)


def test_invalid_stored_config_is_a_checkpoint_error(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    path = export_checkpoint(tmp_path / "c.pth", model.state_dict(), config, NORMALIZER, 1, 0.1)
    blob = torch.load(path, weights_only=True)
    blob["config"]["model"]["no_such_key"] = 1  # e.g. written by another version of stage1
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"c\.pth: stored config is invalid"):
        load_checkpoint(path)


def test_export_refuses_an_invalid_config(
    tmp_path: Path, config: DictConfig, model: Stage1Model
) -> None:
    bad = config_to_dict(config)
    bad["model"]["no_such_key"] = 1
    with pytest.raises(ConfigError, match=r"model\.no_such_key"):
        export_checkpoint(tmp_path / "c.pth", model.state_dict(), bad, NORMALIZER, 1, 0.1)
    assert not (tmp_path / "c.pth").exists()


def test_failed_export_keeps_the_previous_file(
    tmp_path: Path, config: DictConfig, model: Stage1Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export_checkpoint(tmp_path / "a.pth", model.state_dict(), config, NORMALIZER, 1, 0.5)
    before = path.read_bytes()

    def interrupted_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(path, model.state_dict(), config, NORMALIZER, 2, 0.4)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]
