"""Contract: config sections defined outside config/ register themselves (config stays a leaf); a
slot nobody registered is a one-line error naming the module to import; names cannot be hijacked."""

import dataclasses

import pytest

from megatron_vp2o.config import Config, ConfigError, build, register_section, section_type
from megatron_vp2o.config.sections import section_slot
from megatron_vp2o.rl.config import RLConfig


def test_rl_registers_itself_and_configs_build_it():
    assert section_type("rl") is RLConfig
    cfg = build(Config, {"rl": {"algo": "grpo", "sampling": {"top_p": 0.9}}})
    assert isinstance(cfg.rl, RLConfig) and cfg.rl.sampling.top_p == 0.9 and cfg.rl.algo == "grpo"
    assert isinstance(Config().rl, RLConfig)
    assert dataclasses.replace(cfg, train=cfg.train).rl == cfg.rl


def test_unregistered_slot_and_hijack_are_refused():
    @dataclasses.dataclass
    class Root:
        extra: object = section_slot("not_registered_anywhere", home="some.module")

    assert Root().extra is None
    with pytest.raises(ConfigError, match="config section 'extra' is not available: import some.module"):
        build(Root, {"extra": {"x": 1}})

    @dataclasses.dataclass
    class Other:
        x: int = 0

    with pytest.raises(ValueError, match="already registered"):
        register_section("rl", Other)
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_section("new_section", int)
