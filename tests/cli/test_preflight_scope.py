"""Contract: each command's pre-flight (cli/checks.py) checks only the fields that command reads, once: RL
(`vp2o train`) under 4 ranks is not refused for train.global_batch_size (an SFT field), `vp2o sft` is;
scripted bad inputs of each command are refused by it in one line and pass the other; the runners
(rl/session.py, training/sft.py) keep no copy of these checks."""

import ast
from pathlib import Path

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


def test_train_checks_the_chosen_algorithms_mini_batches_per_rank(tmp_path, monkeypatch):
    """rl.<algo>.mini_batches must split each data-parallel rank's prompt groups (8 prompts / 2 ranks = 4);
    the other algorithm's section is not read."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match=r"rl.grpo.mini_batches=8 must divide the 4 prompt groups .* \[1, 2, 4\]"):
        _preflight(["train", "--config", TINY, "--out", out, "rl.algo=grpo", "rl.grpo.mini_batches=8"])
    assert _preflight(["train", "--config", TINY, "--out", out, "rl.algo=vp2o", "rl.grpo.mini_batches=8"])


def test_vp2o_mini_batch_epochs_need_the_anchor_budget_off(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match="rl.vp2o.mini_batches x rl.vp2o.epochs = 4 .* anchor budget off"):
        _preflight(["train", "--config", TINY, "--out", out, "rl.vp2o.mini_batches=2", "rl.vp2o.epochs=2"])
    for off in ("vp2o.trust_region.enabled=false", "rl.ablate.anchor_budget=false"):
        cfg = _preflight(["train", "--config", TINY, "--out", out, "rl.vp2o.mini_batches=2", "rl.vp2o.epochs=2", off])
        assert (cfg.rl.loop.mini_batches, cfg.rl.loop.epochs) == (2, 2)


# (override, words of the one-line error): inputs only `vp2o train` reads
RL_BAD = [
    ("rl.prompts=data/prompts/nope.jsonl", ["rl.prompts", "nope.jsonl"]),
    ("rl.eval_prompts=data/prompts/nope.jsonl", ["rl.eval_prompts", "nope.jsonl"]),
    ("rl.policy=checkpoints/nope", ["rl.policy", "checkpoints/nope"]),
    ("vp2o.trust_region.ess_level=token", ["vp2o.trust_region.ess_level=token", "use sequence"]),
    ("rl.vp2o.mini_batches=2", ["rl.vp2o.mini_batches", "anchor budget off"]),
    ("rl.prompts_per_step=5,rl.algo=grpo", ["rl.grpo.mini_batches=2", "5 prompt groups"]),
]
# inputs only `vp2o sft` reads (under WORLD_SIZE 1; rl.policy is set, so checkpoint.load is SFT's only)
SFT_BAD = [
    ("data.path=data/sft/nope.jsonl", ["data.path", "nope.jsonl"]),
    ("checkpoint.load=checkpoints/nope", ["checkpoint.load", "checkpoints/nope"]),
    ("train.global_batch_size=24", ["train.global_batch_size=24", "multiple"]),
]


def _argv(command, tmp_path, override):
    return [command, "--config", TINY, "--out", str(tmp_path / "o"), *override.split(",")]


@pytest.mark.parametrize("override, words", RL_BAD)
def test_rl_inputs_are_train_checks_only(tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        _preflight(_argv("train", tmp_path, override))
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert _preflight(_argv("sft", tmp_path, override))  # sft reads none of it


@pytest.mark.parametrize("override, words", SFT_BAD)
def test_sft_inputs_are_sft_checks_only(tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        _preflight(_argv("sft", tmp_path, override))
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert _preflight(_argv("train", tmp_path, override))  # train reads none of it


@pytest.mark.parametrize("runner", ["megatron_vp2o/rl/session.py", "megatron_vp2o/training/sft.py"])
def test_runners_keep_no_copy_of_the_preflight(runner):
    """The checks live in cli/checks.py once: the runners raise no ConfigError of their own."""
    tree = ast.parse((Path(__file__).resolve().parents[2] / runner).read_text())
    raised = [n for n in ast.walk(tree) if isinstance(n, ast.Raise) and "ConfigError" in ast.unparse(n)]
    assert not raised, [ast.unparse(n) for n in raised]
