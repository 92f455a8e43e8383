"""Configs: typed sections loaded from YAML with dotted overrides (see :mod:`.schema`).

A leaf package: it imports only itself and ``algo.config`` (pure dataclasses). Sections defined
elsewhere register themselves (:mod:`.sections`): ``rl`` from ``megatron_vp2o/rl/config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vp2o.algo.config import SpecializationConfig, SteinConfig, TrustRegionConfig
from megatron_vp2o.config.loader import ConfigError, apply_overrides, build, load_yaml, to_dict
from megatron_vp2o.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RouterConfig,
    TrainConfig,
)
from megatron_vp2o.config.sections import register_section, section_slot, section_type
from megatron_vp2o.config.validate import Layout, check_layout


@dataclass
class VP2OConfig:
    """The VP2O method's knobs (spec section 3 defaults); see megatron_vp2o/algo/config.py."""

    enabled: bool = True  # false: plain megatron layers and steps, configured policy loss, refresh every batch
    stein: SteinConfig = field(default_factory=SteinConfig)
    trust_region: TrustRegionConfig = field(default_factory=TrustRegionConfig)
    specialization: SpecializationConfig = field(default_factory=SpecializationConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    vp2o: VP2OConfig = field(default_factory=VP2OConfig)
    rl: Any = section_slot("rl", home="megatron_vp2o.rl.config")  # RLConfig, registered by rl/config.py


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return build(Config, apply_overrides(data, list(overrides or [])))


__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "Layout", "LoggingConfig", "ModelConfig",
    "ParallelConfig", "RouterConfig", "TrainConfig", "VP2OConfig", "check_layout", "load_config", "register_section",
    "section_type", "to_dict",
]
