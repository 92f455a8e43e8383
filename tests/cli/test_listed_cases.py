"""Contract: each bad input listed in issue 14 ends in exit code 2 and one stderr line that names the
field or path and the fix, before the platform layer, any process group or any output exists."""

import pytest
import torch.distributed as dist

from cli.conftest import TINY, fake_checkpoint, run_cli
from megatron_vp2o.config import ConfigError, load_config


def _fails_cleanly(argv, capsys, out, words):
    rc, lines = run_cli(argv, capsys)
    assert rc == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists() and not dist.is_initialized()
    return lines[0]


def test_malformed_yaml_override(tmp_path, capsys, no_platform):
    out = tmp_path / "out"
    line = _fails_cleanly(["train", "--config", TINY, "--out", out, "rl.lr=[1"], capsys, out,
                          ["rl.lr=[1", "not valid YAML", "quote"])
    assert "ParserError" not in line


def test_empty_yaml_section_plus_override(tmp_path):
    empty = tmp_path / "empty_rl.yaml"
    empty.write_text("model:\n  hidden_size: 64\ntrain:\n  lr: 1.0e-3\nrl:\n")
    cfg = load_config(empty, ["rl.lr=1e-3", "rl.steps=3"])
    assert (cfg.rl.lr, cfg.rl.steps, cfg.model.hidden_size) == (1e-3, 3, 64)
    with pytest.raises(ConfigError, match=r"'train.lr' is a value, not a section"):
        load_config(empty, ["train.lr.x=1"])


@pytest.mark.parametrize("override", ["train.lr=.inf", "rl.lr=.inf", "train.lr=.nan", "rl.lr=-.inf",
                                      "rl.sampling.temperature=.inf", "train.clip_grad=1e999"])
def test_non_finite_numbers(tmp_path, capsys, no_platform, override):
    out = tmp_path / "out"
    _fails_cleanly(["train", "--config", TINY, "--out", out, override], capsys, out,
                   [override.split("=")[0], "finite"])


def test_prompts_per_step_not_divisible_by_data_parallel(tmp_path, capsys, no_platform, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    _fails_cleanly(["train", "--config", TINY, "--out", out, "rl.prompts_per_step=3"], capsys, out,
                   ["rl.prompts_per_step=3", "data-parallel size 2", "[2, 4, 6, 8]"])
    monkeypatch.setenv("WORLD_SIZE", "4")  # tp=2 on 4 ranks: dp 2 again
    _fails_cleanly(["train", "--config", TINY, "--out", out, "rl.prompts_per_step=5", "parallel.tp=2"], capsys,
                   out, ["rl.prompts_per_step=5", "data-parallel size 2"])


@pytest.mark.parametrize("change", [{"hidden_size": 64}, {"num_experts": 4}, {"vocab_size": 256},
                                    {"num_layers": 2}, {"moe_ffn_hidden_size": 64}])
def test_policy_checkpoint_of_another_model(tmp_path, capsys, no_platform, change):
    """The shipped policy with a config of another width / expert count / vocabulary / depth."""
    (field, value), = change.items()
    out = tmp_path / "out"
    _fails_cleanly(["train", "--config", TINY, "--out", out, f"model.{field}={value}"], capsys, out,
                   ["rl.policy", "checkpoints/tiny_policy", f"model.{field}", "different model"])


def test_sft_checkpoint_load_of_another_model(tmp_path, capsys, no_platform):
    other = tmp_path / "other"
    fake_checkpoint(other, {"num_experts": 16})
    out = tmp_path / "out"
    _fails_cleanly(["sft", "--config", TINY, "--out", out, f"checkpoint.load={other}"], capsys, out,
                   ["checkpoint.load", str(other), "model.num_experts is 16 there, 8 here"])


def test_resume_checkpoint_of_another_model(tmp_path, capsys, no_platform):
    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoints", {"hidden_size": 256})
    before = sorted(p.name for p in out.rglob("*"))
    rc, lines = run_cli(["train", "--config", TINY, "--out", out, "--resume"], capsys)
    assert rc == 2 and len(lines) == 1 and "--resume" in lines[0] and "model.hidden_size" in lines[0], lines
    assert sorted(p.name for p in out.rglob("*")) == before


def test_old_checkpoint_without_saved_config_is_not_refused():
    """A checkpoint whose vp2o.json has no config is not compared (it loads as before)."""
    from megatron_vp2o.checkpoint.meta import check_same_model

    cfg = load_config(TINY)
    found = check_same_model("checkpoints/tiny_policy", cfg.model, "rl.policy")  # the shipped one matches
    assert found.name == "iter_0001000"


def test_argument_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    for argv in (["train", "--config", TINY, "--out", out, "--bogus"], ["train", "--out", out],
                 ["convert", "hf-to-mcore", "--hf", tmp_path, "--out", out, "--tp", "two"], ["nosuch"]):
        rc, lines = run_cli(argv, capsys)
        assert rc == 2 and len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], (argv, lines)
    assert not out.exists()
