"""Contract: a dist checkpoint whose pickles could run code (its .metadata, a bytes entry such as the
RNG state, common.pt) is refused before megatron reads it, with one line, without running the code;
the checkpoints vp2o writes pass."""

import io
import pickle

import pytest
import torch

from cli.conftest import POLICY, TINY, fake_checkpoint, run_cli
from cli.test_resume_state import RunsCode
from megatron_vp2o.checkpoint.safety import UnsafeCheckpointError, verify_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def _bytes_entry_runs_code(found, marker):
    """Point the RNG-state bytes entry at a code-running pickle appended to a .distcp file."""
    meta = pickle.loads((found / ".metadata").read_bytes())  # the real, trusted metadata
    index = next(i for i in meta.storage_data if i.fqn.startswith("vp2o_rng_state"))
    info = meta.storage_data[index]
    payload = io.BytesIO()
    torch.save(RunsCode(marker), payload)
    shard = found / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(payload.getvalue())
    with shard.open("ab") as f:
        f.write(payload.getvalue())
    (found / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize("where", [".metadata", "bytes entry", "common.pt"])
def test_code_running_pickles_are_refused_unrun(tmp_path, where):
    found = fake_checkpoint(tmp_path / "ckpt", with_tensors=True)
    verify_checkpoint(found, "rl.policy")  # the untouched copy of the shipped policy passes
    marker = tmp_path / "pwned"
    if where == ".metadata":
        (found / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    elif where == "common.pt":
        torch.save(RunsCode(marker), found / "common.pt")
    else:
        _bytes_entry_runs_code(found, marker)
    with pytest.raises(UnsafeCheckpointError, match="could run code on load") as info:
        verify_checkpoint(found, "rl.policy")
    assert "rl.policy" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_cli_refuses_a_malicious_policy_before_the_platform(tmp_path, capsys, no_platform):
    found = fake_checkpoint(tmp_path / "ckpt", with_tensors=True)
    marker = tmp_path / "pwned"
    _bytes_entry_runs_code(found, marker)
    out = tmp_path / "out"
    rc, lines = run_cli(["train", "--config", TINY, "--out", out, f"rl.policy={found.parent}"], capsys)
    assert rc == 2 and len(lines) == 1 and "rl.policy" in lines[0] and "vp2o_rng_state" in lines[0], lines
    assert not marker.exists() and not out.exists()


def test_the_shipped_policy_passes():
    verify_checkpoint(POLICY / (POLICY / "latest").read_text().strip())
