"""Contract: per-rank resume state is plain data read with ``weights_only=True``; a file that is not
(a crafted pickle that runs code, an old full pickle) is refused with one line and never executed."""

import os
import pickle

import numpy as np
import pytest
import torch

from cli.conftest import TINY, fake_checkpoint, run_cli
from megatron_vp2o.checkpoint.state import CheckpointStateError, from_plain, load_state, save_state, to_plain
from megatron_vp2o.generation.prompts import PromptRecord
from megatron_vp2o.generation.rollouts import Rollouts
from megatron_vp2o.generation.sampling import SamplingConfig


class RunsCode:
    """Unpickling this calls os.mkdir(marker): the payload a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _rollouts():
    g = torch.Generator().manual_seed(0)
    return Rollouts(prompt_ids_BP=torch.randint(0, 9, (2, 3), generator=g), prompt_lens_B=torch.tensor([3, 2]),
                    response_ids_BT=torch.randint(0, 9, (2, 4), generator=g), response_mask_BT=torch.ones(2, 4),
                    logp_BT=torch.randn(2, 4, generator=g), positions_BS=torch.arange(6).expand(2, 6),
                    topk_idx_LBSK=torch.zeros(1, 2, 6, 2, dtype=torch.long), gates_LBSK=torch.rand(1, 2, 6, 2),
                    finish_reason=["stop", "length"], sampling=SamplingConfig(top_p=0.9, stop_token_ids=(3,)),
                    pad_id=0, vocab_size=9, moe_layers=[0])


def test_round_trip_of_the_rl_buffer_shapes(tmp_path):
    state = {"buffer": {"rollouts": _rollouts(), "records": [PromptRecord("7=", "digit_sum", meta={"target": 7})]},
             "anchors": [(torch.randn(4, 3), torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2))],
             "last_reward_metrics": {"reward/mean": 0.5}, "none": None,
             "numpy": {3: np.float32(0.25), "a": np.arange(3)}}
    save_state(state, tmp_path / "rank0.pt")
    torch.load(tmp_path / "rank0.pt", weights_only=True)  # loads without any allow-listed globals
    back = load_state(tmp_path / "rank0.pt")
    r0, r1 = state["buffer"]["rollouts"], back["buffer"]["rollouts"]
    assert isinstance(r1, Rollouts) and r1.sampling == r0.sampling and r1.finish_reason == r0.finish_reason
    assert all(torch.equal(getattr(r0, f), getattr(r1, f)) for f in ("logp_BT", "topk_idx_LBSK", "gates_LBSK"))
    assert back["buffer"]["records"] == state["buffer"]["records"]
    assert all(torch.equal(a, b) for a, b in zip(state["anchors"][0], back["anchors"][0]))
    assert isinstance(back["anchors"], list) and isinstance(back["anchors"][0], tuple)
    assert back["last_reward_metrics"] == {"reward/mean": 0.5} and back["none"] is None
    assert back["numpy"][3] == 0.25 and torch.equal(back["numpy"]["a"], torch.arange(3))


def test_unsupported_objects_fail_at_save_time():
    with pytest.raises(TypeError, match=r"state.x\[0\]: RunsCode cannot be saved"):
        to_plain({"x": [RunsCode("nowhere")]})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_executing_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "rank0.pt"
    torch.save({"format": "vp2o-plain-v1", "state": RunsCode(marker)}, bad)  # what torch.save of it writes
    with pytest.raises(CheckpointStateError, match="is not plain data and was not loaded"):
        load_state(bad)
    bare = tmp_path / "bare.pt"
    bare.write_bytes(pickle.dumps(RunsCode(marker)))  # a bare pickle, not a torch zip
    with pytest.raises(CheckpointStateError):
        load_state(bare)
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the old loader: the payload is real and runs
    assert marker.is_dir()


def test_old_full_pickle_and_foreign_types_are_refused(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"buffer": _rollouts()}, old)  # the pre-issue-14 format (a pickled dataclass)
    with pytest.raises(CheckpointStateError, match="not plain data"):
        load_state(old)
    for name in ("os:system", "builtins:eval", "megatron_vp2o.checkpoint.state:CheckpointStateError",
                 "megatron_vp2o.not_imported:X"):
        with pytest.raises(CheckpointStateError):
            from_plain({"__dataclass__": name, "fields": {}})


def test_resume_from_a_malicious_checkpoint_is_refused_by_the_cli(tmp_path, capsys, no_platform):
    out = tmp_path / "out"
    found = fake_checkpoint(out / "checkpoints", with_tensors=True)
    marker = tmp_path / "pwned"
    torch.save(RunsCode(marker), found / "rank0.pt")
    rc, lines = run_cli(["train", "--config", TINY, "--out", out, "--resume"], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert "rank0.pt" in lines[0] and "not plain data" in lines[0], lines
    assert not marker.exists()
