"""Typed configuration: dataclass schema, YAML loading with ``defaults`` inheritance, overrides.

``load_config("configs/test.yaml", overrides=["training.batch_size=8"])`` returns an OmegaConf
``DictConfig`` backed by :class:`Stage1Config`, so unknown keys and wrong types are rejected by
OmegaConf itself; we only translate its errors into one :class:`ConfigError` naming the key path.
The shipped configs are package data (``stage1/configs/*.yaml``), found by bare name (``test``)
or by the guide's path (``configs/test.yaml``) from any directory; a user's own file wins.

Every public class and function that takes a config calls :func:`as_config`, so a plain
mapping (``yaml.safe_load`` output, a checkpoint's ``'config'``) goes through the same schema,
the same checks and the same error text as a loaded YAML file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stage1.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRECISIONS = {"32": "32-true", "32-true": "32-true", "16": "16-mixed", "16-mixed": "16-mixed"}
PRECISIONS |= {"bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
_TF_PATTERN = re.compile(r"^(m\d+|h\d+|d)$")
# What public entry points accept as a config: a loaded DictConfig or a plain mapping.
ConfigLike: TypeAlias = DictConfig | Mapping[str, Any]


@dataclass
class DataConfig:
    timeframes: list[str] = field(default_factory=lambda: ["m1", "m5", "m15", "m30", "h1", "h4"])
    seq_len: int = 48
    train_frac: float = 0.7
    val_frac: float = 0.15
    # Gap between splits; null = the longest timeframe's window span (seq_len bars of it).
    embargo_minutes: int | None = None
    # A timeframe's newest bar must close no earlier than staleness_factor * its duration
    # before the anchor; otherwise the window is invalid (e.g. right after a weekend).
    staleness_factor: float = 1.0
    # Directory for the sampler's index cache; null disables caching.
    cache_dir: str | None = None
    # Use only the first N train windows (overfit tests); null = all.
    limit_train_windows: int | None = None
    # Instruments of a data root (ROOT/<name>/{tf}.parquet) to use; null = all found.
    instruments: list[str] | None = None
    # How training batches mix instruments: "size" (every train window equally likely, so
    # instruments weigh by their window count) or "uniform" (every instrument equally often).
    instrument_mixing: str = "size"


@dataclass
class StemConfig:
    kernel_size: int = 3


@dataclass
class EncoderConfig:
    n_layers: int = 4
    n_heads: int = 8
    ff_mult: int = 4
    dropout: float = 0.1
    flash_attn: bool = True


@dataclass
class BottleneckConfig:
    stride: int = 4


@dataclass
class ModelConfig:
    d_model: int = 128
    stem: StemConfig = field(default_factory=StemConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    # Hidden bars start from a naive fill of visible bars (agg | bridge | none).
    prior: str = "agg"
    # Inputs/outputs in units of each window's visible bar range (+ hidden flag, log scale).
    window_scale: bool = True
    # Calendar inputs from bar open times: time of day, day of week, age before the anchor.
    time_features: bool = False
    # Forecast head on the pooled embedding: log realised volatility of the next h base bars,
    # one output per horizon (labels only; trained with loss.weights.forecast). [] = no head.
    forecast_horizons: list[int] = field(default_factory=list)


@dataclass
class MaskingConfig:
    mask_ratio: float = 0.15
    # Span lengths in base-timeframe bars; mapped to each timeframe by calendar time.
    span_min_bars: int = 5
    span_max_bars: int = 60
    # Hide every coarser bar that overlaps a hidden finer bar (same calendar time hidden), as
    # the evaluation does: train on the task you evaluate.
    sync_tf: bool = True
    # Share of (window, timeframe) rows whose newest span is placed to end at the newest bar
    # (what the RL agent faces live). Training only; evaluation places spans at random.
    right_edge_ratio: float = 0.2


@dataclass
class LossWeights:
    # The guide's four terms; measured, only the hidden-bar term pays (docs/RESULTS.md).
    huber: float = 1.0
    stft: float = 0.0
    cross_tf: float = 0.0
    amp_phase: float = 0.0
    # The forecast head's squared error (log vol units); used when model.forecast_horizons is set.
    forecast: float = 0.0


@dataclass
class LossConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    huber_delta: float = 0.01
    unmasked_weight: float = 0.0
    stft_fft_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])


@dataclass
class SchedulerConfig:
    max_lr: float = 1e-3
    pct_start: float = 0.05
    interval: str = "step"


@dataclass
class TrainingConfig:
    # Global batch per optimizer micro-step, summed over all devices; each device gets
    # batch_size // world_size, so changing the device count keeps the experiment the same.
    batch_size: int = 64
    max_epochs: int = 20
    max_steps: int = -1
    # Wall-clock guard "DD:HH:MM:SS" (Lightning max_time): stops after the step that crosses it.
    max_time: str | None = None
    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip: float = 1.0
    compile: bool = False
    early_stopping_patience: int = 5
    log_every_n_steps: int = 50
    profile_every_n_steps: int = 100
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    val_check_interval: float | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class DataLoaderConfig:
    num_workers: int = 0
    prefetch_factor: int = 4
    persistent_workers: bool = True
    pin_memory: bool = True


@dataclass
class EvaluationConfig:
    split: str = "test"
    seed: int = 1234
    # Probe target: realised volatility and sign of the next horizon_bars base bars.
    probe_horizon_bars: int = 60
    probe_max_train_windows: int = 20000
    sync_masks: bool = True
    n_plot_windows: int = 4
    # Score an evenly spaced subset of at most this many windows of the split (null = all).
    max_windows: int | None = None
    # Share of bars hidden per timeframe when scoring (evaluate and validation); null = the
    # training masks' masking.mask_ratio. Fixing it lets models trained on other masks be
    # compared on one task.
    mask_ratio: float | None = None


@dataclass
class Stage1Config:
    experiment_name: str = "stage1"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


@contextmanager
def _config_errors() -> Iterator[None]:
    """Turn OmegaConf's errors (unknown key, wrong type) into one ConfigError naming the key."""
    try:
        yield
    except OmegaConfBaseException as exc:
        full_key = getattr(exc, "full_key", None)
        raise ConfigError(f"{full_key or '?'}: {str(exc).splitlines()[0]}") from exc


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``base``, ``test``, ``demo``, ...)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def _shipped_path(name: str) -> Path:
    return CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")


def resolve_config_path(path: str | Path) -> Path:
    """A user's existing file wins; otherwise a bare name (``test``, ``test.yaml``) or the
    guide's relative path (``configs/test.yaml``) names a shipped config, from any directory."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.parent in (Path("."), Path("configs")):
        shipped = _shipped_path(candidate.name)
        if shipped.is_file():
            return shipped
    raise ConfigError(
        f"{path}: config file not found (shipped configs: {', '.join(shipped_configs())})"
    )


def _with_defaults(node: DictConfig, source: str, here: Path | None, seen: tuple[str, ...]) -> Any:
    """Deep-merge ``node`` over the configs its ``defaults`` list names. A parent is looked up
    beside the file that names it (``here``), then among the shipped configs."""
    parents = node.pop("defaults", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, ListConfig | list):
        raise ConfigError(f"{source}: 'defaults' must be a list of config names")
    merged: Any = OmegaConf.create()
    for name in map(str, parents):
        file_name = name if name.endswith(".yaml") else f"{name}.yaml"
        beside = here / file_name if here is not None else None
        parent = beside if beside is not None and beside.is_file() else _shipped_path(name)
        merged = OmegaConf.merge(merged, _read_yaml(parent, (*seen, source)))
    return OmegaConf.merge(merged, node)


def _read_yaml(path: Path, seen: tuple[str, ...] = ()) -> Any:
    """Read one YAML file and deep-merge it over its ``defaults``."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if str(path) in seen:
        raise ConfigError(f"{path}: circular 'defaults' chain")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: report as a config problem
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    return _with_defaults(node, str(path), path.parent, seen)


def _validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express."""
    data, training = cfg.data, cfg.training
    if not data.timeframes:
        raise ConfigError("data.timeframes: must list at least one timeframe")
    for tf in data.timeframes:
        if not _TF_PATTERN.match(str(tf)):
            raise ConfigError(f"data.timeframes: {tf!r} is not a timeframe like m1, m5, h1, h4, d")
    if len(set(data.timeframes)) != len(data.timeframes):
        raise ConfigError(f"data.timeframes: duplicate entries in {list(data.timeframes)}")
    if data.seq_len < 4:
        raise ConfigError(f"data.seq_len: must be >= 4, got {data.seq_len}")
    if not (0 < data.train_frac < 1 and 0 <= data.val_frac < 1):
        raise ConfigError("data.train_frac / data.val_frac: must lie in (0, 1) and [0, 1)")
    if data.train_frac + data.val_frac >= 1:
        raise ConfigError(
            "data.train_frac + data.val_frac: must be < 1 (the rest is the test split)"
        )
    if training.precision not in PRECISIONS:
        raise ConfigError(
            f"training.precision: {training.precision!r} is not one of {sorted(PRECISIONS)}"
        )
    if training.batch_size < 1:
        raise ConfigError(f"training.batch_size: must be >= 1, got {training.batch_size}")
    if cfg.model.d_model % cfg.model.encoder.n_heads:
        raise ConfigError("model.d_model: must be divisible by model.encoder.n_heads")
    if not 0 < cfg.masking.mask_ratio < 1:
        raise ConfigError(f"masking.mask_ratio: must lie in (0, 1), got {cfg.masking.mask_ratio}")
    eval_ratio = cfg.evaluation.mask_ratio
    if eval_ratio is not None and not 0 < eval_ratio < 1:
        raise ConfigError(f"evaluation.mask_ratio: must lie in (0, 1) or be null, got {eval_ratio}")
    if not 1 <= cfg.masking.span_min_bars <= cfg.masking.span_max_bars:
        raise ConfigError("masking.span_min_bars: must be >= 1 and <= masking.span_max_bars")
    if not 0 <= cfg.masking.right_edge_ratio <= 1:
        raise ConfigError(
            f"masking.right_edge_ratio: must lie in [0, 1], got {cfg.masking.right_edge_ratio}"
        )
    if cfg.evaluation.split not in ("train", "val", "test", "all"):
        raise ConfigError(f"evaluation.split: {cfg.evaluation.split!r} is not train|val|test|all")
    if data.instrument_mixing not in ("size", "uniform"):
        raise ConfigError(f"data.instrument_mixing: {data.instrument_mixing!r} is not size|uniform")


def _checked(cfg: DictConfig) -> DictConfig:
    """Validate a typed config and spell its precision the way Lightning expects."""
    _validate(cfg)
    if cfg.training.precision != PRECISIONS[cfg.training.precision]:
        cfg.training.precision = PRECISIONS[cfg.training.precision]
    return cfg


def _typed(layers: Sequence[Any], overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults, then each layer, then ``key.sub=value`` overrides; validated."""
    with _config_errors():
        cfg = OmegaConf.structured(Stage1Config)
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key.sub=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    assert isinstance(cfg, DictConfig)
    OmegaConf.set_readonly(cfg, False)
    return _checked(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``path`` (or the schema defaults), apply ``key.sub=value`` overrides, validate."""
    with _config_errors():
        layers = [] if path is None else [_read_yaml(resolve_config_path(path))]
    return _typed(layers, overrides)


def as_config(config: ConfigLike) -> DictConfig:
    """The validated, typed config for an OmegaConf config or a plain mapping.

    A typed config (from :func:`load_config`) is re-checked and returned as is, so edits made
    to it are seen; anything else (``yaml.safe_load`` output, a checkpoint's ``'config'``, an
    untyped DictConfig) is merged over the schema defaults exactly as a YAML file would be,
    its ``defaults: [base]`` resolved among the shipped configs.
    """
    if isinstance(config, DictConfig) and OmegaConf.get_type(config) is Stage1Config:
        return _checked(config)
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"config: expected an OmegaConf config or a mapping, got {type(config).__name__}"
        )
    with _config_errors():
        node = OmegaConf.create(
            OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)
        )
        assert isinstance(node, DictConfig)
        layer = _with_defaults(node, "config", None, ())
    return _typed([layer])


def config_to_dict(cfg: ConfigLike) -> dict[str, Any]:
    """Plain, JSON-safe dict of a config (for checkpoints, JSON files)."""
    out = OmegaConf.to_container(as_config(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def config_hash(cfg: ConfigLike, sections: Sequence[str] = ("data",)) -> str:
    """Short sha256 of the named config sections (what shapes a derived artifact)."""
    values = {name: config_to_dict(cfg)[name] for name in sections}
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: ConfigLike, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from stage1.utils import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(as_config(cfg), resolve=True))
