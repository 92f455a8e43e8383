"""Configs: typed sections loaded from YAML with dotted overrides (see :mod:`.schema`).

Every section is a declared, typed field of :class:`Config` (torchtitan style): ``model``,
``parallel``, ``train``, ``data``, ``checkpoint``, ``logging`` (:mod:`.schema`), ``vp2o``
(``algo.config``) and ``rl`` (:mod:`.rl`). A low package: it imports only itself and
``algo.config`` (pure dataclasses); checks that need megatron-core's release (``compat``) run in
the CLI pre-flight, not here (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_vp2o.algo.config import SpecializationConfig, SteinConfig, TrustRegionConfig
from megatron_vp2o.config.loader import ConfigError, apply_overrides, build, load_yaml, to_dict
from megatron_vp2o.config.migrate import migrate_input
from megatron_vp2o.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RouterConfig,
    TrainConfig,
)
from megatron_vp2o.config.rl import (AblationConfig, BudgetConfig, EvalTaskConfig, GRPOLoopConfig, RLConfig,
                                     SamplingConfig, VP2OLoopConfig)
from megatron_vp2o.config.validate import Layout, check_layout


@dataclass
class VP2OConfig:
    """The VP2O method's knobs (method §3 defaults); see megatron_vp2o/algo/config.py."""

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
    rl: RLConfig = field(default_factory=RLConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides; keys of
    older versions in either are read through the migration table (:mod:`.migrate`)."""
    data = load_yaml(path) if path is not None else {}
    return build(Config, migrate_input(data, list(overrides or [])))


__all__ = [
    "AblationConfig", "BudgetConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalTaskConfig",
    "GRPOLoopConfig", "Layout", "LoggingConfig", "ModelConfig", "ParallelConfig", "RLConfig", "RouterConfig",
    "SamplingConfig", "TrainConfig", "VP2OConfig", "VP2OLoopConfig", "check_layout", "load_config", "to_dict",
]
