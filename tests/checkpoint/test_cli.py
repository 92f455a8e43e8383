"""Contract: ``vp2o convert`` fails clearly and writes nothing on bad input, and converts bf16/tied models end to end."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint.hf_models import make_mixtral, make_qwen3, read_all
from harness import ROOT
from megatron_vp2o.cli.convert import main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("cli") / "mixtral")


def _broken(src, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = bad / "model.safetensors"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "garbage_header":
        shard.write_bytes(b"\xff" * 64)
    elif how == "config":
        (bad / "config.json").write_text("{not json")
    elif how == "missing_expert":
        tensors = load_file(str(shard))
        del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
        save_file(tensors, str(shard))
    elif how == "missing_shard":
        shard.rename(bad / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "unsupported":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="deepseek_v3")))
    elif how in ("wrong_type", "missing_key"):
        cfg = json.loads((bad / "config.json").read_text())
        cfg = dict(cfg, hidden_size="32") if how == "wrong_type" else {k: v for k, v in cfg.items()
                                                                       if k != "num_hidden_layers"}
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("how,message", [
    ("truncated", "is truncated or corrupted"), ("garbage_header", "not a valid safetensors file"),
    ("config", "config.json' is not valid JSON"), ("missing_expert", "1 missing tensors.*experts.2.w3"),
    ("missing_shard", "shard 'model-00002-of-00002.safetensors' listed in"),
    ("unsupported", r"model_type='deepseek_v3'; supported: \['mixtral', 'qwen3_moe'\]"),
    ("wrong_type", r"key 'hidden_size' must be a positive integer, got '32' \(str\)"),
    ("missing_key", r"missing key 'num_hidden_layers'"),
])
def test_bad_input_gives_clear_error_and_writes_nothing(src, tmp_path, capsys, how, message):
    import re

    bad = _broken(src, tmp_path, how)
    out = tmp_path / "out"
    for ep in ("1", "2"):  # the multi-rank path validates before launching torchrun
        assert main(["hf-to-mcore", "--hf", str(bad), "--out", str(out), "--ep", ep, "--verify"]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert err.count("\n") == 1 and err.startswith("vp2o convert hf-to-mcore: error:")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_refuses_non_empty_output(src, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def _run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_cli_bf16_tied_qwen3_verifies_and_roundtrips_exactly(tmp_path):
    """bf16 weights, tied embeddings, norm_topk_prob=False (softmax before top-k): tools/convert.py + vp2o."""
    src = make_qwen3(tmp_path / "q3", tie_word_embeddings=True, norm_topk_prob=False, dtype=torch.bfloat16)
    assert read_all(src)["model.embed_tokens.weight"].dtype == torch.bfloat16
    out = _run("tools/convert.py", "hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "mc"), "--verify")
    diff = float(out.split("max logit diff ")[1].split()[0])
    assert diff <= 1e-4
    _run("-m", "megatron_vp2o.cli.main", "convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mc"),
         "--out", str(tmp_path / "back"))
    a, b = read_all(src), read_all(tmp_path / "back")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    assert all(a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["norm_topk_prob"] is False and cfg["dtype"] == "bfloat16"
