"""Contract: every config section is a declared, typed field of Config (no registration by import side
effect), and the config package imports neither rl nor compat."""

import dataclasses
import subprocess
import sys
import typing

from megatron_vp2o.config import Config, RLConfig, SamplingConfig, build


def test_rl_is_a_declared_typed_field():
    hints = typing.get_type_hints(Config)
    assert hints["rl"] is RLConfig
    assert typing.get_type_hints(RLConfig)["sampling"] is SamplingConfig
    cfg = build(Config, {"rl": {"algo": "grpo", "sampling": {"top_p": 0.9}}})
    assert isinstance(cfg.rl, RLConfig) and cfg.rl.sampling.top_p == 0.9 and cfg.rl.algo == "grpo"
    assert isinstance(Config().rl, RLConfig)
    assert dataclasses.replace(cfg, train=cfg.train).rl == cfg.rl


def test_loading_a_config_imports_neither_rl_nor_compat():
    code = ("import sys; from megatron_vp2o.config import load_config; "
            "load_config('examples/configs/tiny_cpu.yaml', ['rl.algo=grpo']); "
            "bad = [m for m in sys.modules if m.startswith(('megatron_vp2o.rl', 'megatron_vp2o.compat', "
            "'megatron.core'))]; print(bad); assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
