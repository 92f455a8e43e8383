"""Contract: each command's pre-flight (cli/checks.py) checks only the fields that command reads: RL
(`vp2o train`) under 4 ranks is not refused for train.global_batch_size (an SFT field), `vp2o sft` is."""

import pytest

from megatron_vp2o.cli.main import parse_args, subcommand_modules, validate_args
from megatron_vp2o.config import ConfigError

TINY = "examples/configs/tiny_cpu.yaml"  # train.global_batch_size 32, micro_batch_size 16


@pytest.fixture
def four_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    return str(tmp_path / "out")


def _preflight(argv):
    args = parse_args(argv)
    validate_args(args, subcommand_modules())
    return args.cfg


def test_rl_under_four_ranks_ignores_the_sft_batch(four_ranks):
    cfg = _preflight(["train", "--config", TINY, "--out", four_ranks])
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * 4)  # what SFT would refuse


def test_sft_under_four_ranks_checks_its_batch(four_ranks):
    with pytest.raises(ConfigError, match="train.global_batch_size=32 must be a multiple"):
        _preflight(["sft", "--config", TINY, "--out", four_ranks])


def test_sft_does_not_read_rl_inputs(tmp_path):
    cfg = _preflight(["sft", "--config", TINY, "--out", str(tmp_path / "o"), "rl.prompts=data/prompts/nope.jsonl",
                      "rl.policy=checkpoints/nope"])
    assert cfg.rl.prompts.endswith("nope.jsonl")
