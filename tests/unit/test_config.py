"""stage1.config: YAML inheritance, overrides, schema validation with key paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from stage1.config import (
    CONFIG_DIR,
    Stage1Config,
    as_config,
    config_to_dict,
    load_config,
    resolve_config_path,
)
from stage1.errors import ConfigError

SHIPPED = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def test_all_expected_configs_are_shipped() -> None:
    expected = {"base", "test", "medium", "production", "overfit_test", "performance", "demo"}
    assert expected <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.data.timeframes and cfg.data.seq_len >= 4
    assert as_config(config_to_dict(cfg)) == cfg  # round-trips through a plain dict


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


# --- plain mappings (yaml.safe_load output, a checkpoint's 'config') -------------------------


def _error_text(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize(
    "section_yaml",
    [
        "training:\n  max_epoch: 3\n",  # unknown key
        "training:\n  batch_size: abc\n",  # wrong type
        "model:\n  encoder:\n    n_layerz: 2\n",  # unknown nested key
        "masking:\n  mask_ratio: 1.5\n",  # value rule
    ],
)
def test_a_plain_dict_fails_with_the_same_error_as_its_yaml_file(
    tmp_path: Path, section_yaml: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("defaults: [base]\n" + section_yaml)
    from_file = _error_text(lambda: load_config(path))
    from_dict = _error_text(lambda: as_config(yaml.safe_load(path.read_text())))
    assert from_dict == from_file
    assert from_file.split(":")[0] in {
        "training.max_epoch",
        "training.batch_size",
        "model.encoder.n_layerz",
        "masking.mask_ratio",
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_a_safe_loaded_shipped_config_equals_load_config(name: str) -> None:
    """``defaults: [base]`` inside a plain dict resolves among the shipped configs."""
    plain = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert as_config(plain) == load_config(name)


def test_a_plain_dict_edited_the_guides_way_is_typed_and_validated() -> None:
    config = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
    config["training"]["batch_size"] = 32
    config["model"]["encoder"]["n_layers"] = 12
    config["training"]["precision"] = "bf16"
    cfg = as_config(config)
    assert OmegaConf.get_type(cfg) is Stage1Config
    assert (cfg.training.batch_size, cfg.model.encoder.n_layers) == (32, 12)
    assert cfg.training.precision == "bf16-mixed"
    assert config["training"]["precision"] == "bf16"  # the caller's dict is not modified


def test_a_typed_config_is_returned_as_is_and_rechecked() -> None:
    cfg = load_config("test")
    assert as_config(cfg) is cfg
    cfg.data.seq_len = 2
    with pytest.raises(ConfigError, match=r"data\.seq_len: must be >= 4"):
        as_config(cfg)


def test_an_untyped_dictconfig_goes_through_the_schema() -> None:
    with pytest.raises(ConfigError, match=r"data\.seq_lenn"):
        as_config(OmegaConf.create({"data": {"seq_lenn": 3}}))
    assert as_config(OmegaConf.create({"data": {"seq_len": 20}})).data.seq_len == 20


def test_not_a_mapping_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected an OmegaConf config or a mapping, got list"):
        as_config([1, 2])  # type: ignore[arg-type]


# --- where configs are found ---------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling", ["test", "test.yaml", "configs/test.yaml", "./configs/test.yaml"]
)
def test_shipped_configs_are_found_from_any_directory(
    spelling: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(spelling) == CONFIG_DIR / "test.yaml"
    assert load_config(spelling).experiment_name == "stage1_test"


def test_a_users_own_file_wins_over_the_shipped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "test.yaml").write_text("experiment_name: mine\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/test.yaml").experiment_name == "mine"
    assert load_config("test").experiment_name == "stage1_test"  # a bare name is the shipped one


def test_a_users_experiment_inherits_the_shipped_base(tmp_path: Path) -> None:
    """The guide's experiment file (``defaults: - base``) outside the package."""
    (tmp_path / "deep.yaml").write_text(
        "defaults:\n  - base\nmodel:\n  encoder:\n    n_layers: 16\n"
        "training:\n  batch_size: 16\nexperiment_name: deep_encoder_v1\n"
    )
    cfg = load_config(tmp_path / "deep.yaml")
    assert cfg.experiment_name == "deep_encoder_v1"
    assert (cfg.model.encoder.n_layers, cfg.training.batch_size) == (16, 16)
    assert cfg.model.d_model == load_config("base").model.d_model


def test_a_missing_config_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found.*shipped configs: base, .*test"):
        load_config(tmp_path / "nope.yaml")


def test_configs_are_package_data() -> None:
    import stage1

    assert Path(stage1.__file__).parent / "configs" == CONFIG_DIR


def _entry_points() -> dict[str, Any]:
    """Every public constructor or function that takes a config, called with ``config``."""
    from stage1.checkpoint import export_checkpoint
    from stage1.data.dataset import Stage1DataModule, Stage1Dataset, build_sampler
    from stage1.data.features import FeatureEngineer
    from stage1.data.masking import MaskingStrategy
    from stage1.losses import Stage1CombinedLoss
    from stage1.model.model import Stage1Model
    from stage1.training import Stage1LightningModule, build_trainer

    return {
        "FeatureEngineer": FeatureEngineer,
        "Stage1Model": Stage1Model,
        "Stage1CombinedLoss": Stage1CombinedLoss,
        "MaskingStrategy": lambda c: MaskingStrategy(c.get("masking", {}), ["m1", "m5"], 16),
        "Stage1Dataset": lambda c: Stage1Dataset("no/such/dir", c, split="train"),
        "Stage1DataModule": lambda c: Stage1DataModule("no/such/dir", c),
        "build_sampler": lambda c: build_sampler("no/such/dir", c),
        "Stage1LightningModule": lambda c: Stage1LightningModule(c, {}),
        "build_trainer": lambda c: build_trainer(c, "no/such/dir"),
        "export_checkpoint": lambda c: export_checkpoint("no/such/x.pth", {}, c, {}, 0, None),
    }


@pytest.mark.parametrize("entry", sorted(_entry_points()))
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"masking": {"mask_ratioo": 0.2}}, "masking.mask_ratioo: Key 'mask_ratioo' not in"),
        ({"masking": {"span_min_bars": "many"}}, "masking.span_min_bars: Value 'many' of type"),
    ],
)
def test_every_entry_point_checks_a_plain_dict_like_load_config(
    entry: str, bad: dict, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    expected = _error_text(lambda: load_config(path))
    assert expected.startswith(message)
    assert _error_text(lambda: _entry_points()[entry](bad)) == expected
