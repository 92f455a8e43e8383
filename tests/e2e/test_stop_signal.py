"""Contract: SIGTERM or SIGINT to every rank of a 2-rank torchrun `vp2o train` (what a preemption or a
Ctrl-C does) finishes the step, writes one checkpoint agreed over the ranks, exits cleanly; `--resume`
then continues exactly: the resumed run's metrics equal an uninterrupted run's (timing keys aside)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.test_sft import ROOT, TINY, vp2o
from harness import free_port

STOP_AT = 5  # the step during which the signal arrives
ARGS = ["train", "--config", TINY, "logging.progress=false", "rl.eval_prompts=null", "rl.prompts_per_step=4",
        "rl.policy_loss.group_size=4", "rl.sampling.max_new_tokens=5", "rl.steps=7", "parallel.ep=2"]


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = vp2o(ARGS + ["--out", str(out)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _rows(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_every_rank_checkpoints_the_step_and_resume_is_exact(tmp_path, uninterrupted, sig):
    cut = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                            f"--master-port={free_port()}", "-m", "megatron_vp2o.cli.main", *ARGS, "--out", str(cut)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _steps_logged(cut) < 1 and run.poll() is None:
            time.sleep(0.05)
        ranks = _children(run.pid)
        assert len(ranks) == 2, ranks
        while time.time() < deadline and _steps_logged(cut) < STOP_AT - 1 and run.poll() is None:
            time.sleep(0.002)
        # step STOP_AT - 1 is logged, and its stop check follows within a millisecond; a step takes >= 0.25 s
        time.sleep(0.03)  # so the signal lands in step STOP_AT
        for pid in ranks:  # every rank, not torchrun
            os.kill(pid, sig)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 0, err[-3000:]
    assert f"stop signal received: checkpoint at step {STOP_AT} written" in err
    ckpts = cut / "checkpoints"
    assert (ckpts / "latest").read_text() == f"iter_{STOP_AT:07d}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000005", "latest"]  # one checkpoint, complete
    meta = json.loads((ckpts / "iter_0000005" / "vp2o.json").read_text())
    assert meta["step"] == STOP_AT and meta["world_size"] == 2 and "version" in meta
    assert sorted(p.name for p in (ckpts / "iter_0000005").glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
    assert [r["step"] for r in _rows(cut)] == list(range(1, STOP_AT + 1))

    resumed = vp2o(ARGS + ["--out", str(cut), "--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(cut)
    assert [r["step"] for r in rows] == list(range(1, 8))
    diffs = [(a["step"], k, a.get(k), b.get(k)) for a, b in zip(rows, uninterrupted) for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    assert not diffs, diffs[:10]
