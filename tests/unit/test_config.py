"""stage1.config: YAML inheritance, overrides, schema validation with key paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stage1.config import CONFIG_DIR, config_from_dict, config_to_dict, load_config
from stage1.errors import ConfigError

SHIPPED = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def test_all_expected_configs_are_shipped() -> None:
    expected = {"base", "test", "medium", "production", "overfit_test", "performance", "demo"}
    assert expected <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.data.timeframes and cfg.data.seq_len >= 4
    assert config_from_dict(config_to_dict(cfg)) == cfg  # round-trips through a plain dict


def test_test_config_inherits_base_values() -> None:
    base, test = load_config("base"), load_config("test")
    assert test.experiment_name == "stage1_test"
    assert test.model.encoder.n_layers == 2  # overridden in test.yaml
    assert test.model.encoder.ff_mult == base.model.encoder.ff_mult  # inherited sibling key
    assert test.data.timeframes == base.data.timeframes == ["m1", "m5", "m15", "m30", "h1", "h4"]
    assert test.loss.weights == base.loss.weights


def test_inheritance_chains_deep_merge(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text(
        "experiment_name: parent\nmodel:\n  encoder:\n    n_layers: 6\n    dropout: 0.2\n"
    )
    (tmp_path / "child.yaml").write_text(
        "defaults: [parent]\nexperiment_name: child\nmodel:\n  encoder:\n    n_layers: 3\n"
    )
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.experiment_name == "child"
    assert cfg.model.encoder.n_layers == 3
    assert cfg.model.encoder.dropout == 0.2  # from parent, not lost by the child's section
    assert cfg.model.encoder.n_heads == 8  # schema default


def test_overfit_config_inherits_through_test() -> None:
    cfg = load_config("overfit_test")
    assert cfg.model.d_model == load_config("test").model.d_model


def test_overrides_apply_last() -> None:
    cfg = load_config(
        "test",
        ["training.batch_size=8", "data.timeframes=[m5,h1]", "model.encoder.flash_attn=false"],
    )
    assert cfg.training.batch_size == 8
    assert list(cfg.data.timeframes) == ["m5", "h1"]
    assert cfg.model.encoder.flash_attn is False


def test_unknown_key_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"model\.encoder\.n_layerz") as info:
        load_config("test", ["model.encoder.n_layerz=3"])
    assert "n_layerz" in str(info.value)


def test_unknown_key_in_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("training:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match="max_epoch"):
        load_config(tmp_path / "typo.yaml")


def test_wrong_type_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"training\.batch_size") as info:
        load_config("test", ["training.batch_size=abc"])
    assert "abc" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.timeframes=[m1,x5]", "data.timeframes"),
        ("data.timeframes=[m1,m1]", "data.timeframes"),
        ("data.seq_len=2", "data.seq_len"),
        ("training.precision=fp8", "training.precision"),
        ("masking.mask_ratio=1.5", "masking.mask_ratio"),
    ],
)
def test_invalid_values_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("test", [override])


@pytest.mark.parametrize(
    ("alias", "precision"),
    [("32", "32-true"), ("16", "16-mixed"), ("bf16", "bf16-mixed"), ("bf16-mixed", "bf16-mixed")],
)
def test_precision_aliases(alias: str, precision: str) -> None:
    assert load_config("test", [f"training.precision={alias}"]).training.precision == precision


def test_malformed_override_and_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config("test", ["training.batch_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_loaded_config_is_a_typed_dictconfig() -> None:
    cfg = load_config("test")
    assert OmegaConf.get_type(cfg).__name__ == "Stage1Config"


def test_public_names_are_exported_at_top_level() -> None:
    import stage1

    for name in ("MultiTFWindowSampler", "Stage1Dataset", "Stage1DataModule", "Stage1Model"):
        assert getattr(stage1, name).__name__ == name
    for name in ("Stage1CombinedLoss", "Stage1LightningModule", "Stage1InferenceEngine"):
        assert getattr(stage1, name).__name__ == name
    assert callable(stage1.load_config)
