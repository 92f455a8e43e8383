"""Contract: examples/slurm/tiny_cpu.sbatch runs on a real (local, single-node) slurm: 2 srun tasks, each a
torchrun agent joined by c10d rendezvous, EP=2; the job succeeds and the reward rises. The stop signal
slurm sends before the time limit (USR1 to the batch script) ends in a checkpoint; resubmitting the same
script continues from it and the metrics equal the uninterrupted run's exactly."""

import json
import subprocess
import time

import pytest

from harness import free_port
from launch.conftest import ROOT

SCRIPT = str(ROOT / "examples" / "slurm" / "tiny_cpu.sbatch")
ARGS = ["rl.steps=16", "rl.lr=1e-3", "rl.prompts_per_step=16", "checkpoint.every=4", "logging.progress=false"]


def submit(slurm, out, log, *flags, env=None):
    cmd = ["sbatch", "--parsable", "-o", str(log), *flags, SCRIPT, *ARGS]
    env = dict(slurm.env, OUT=str(out), MASTER_PORT=str(free_port()), **(env or {}))  # another session may run
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stderr}\n{log.read_text() if log.exists() else ''}\n{slurm.logs()}"
    return proc.stdout.strip().split(";")[0]


def rows(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("timing/")} for line in lines]


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_ref")
    job = submit(slurm, tmp / "run", tmp / "job.out")
    state = slurm.wait_job(job, 900)  # polled every 0.5 s (sbatch --wait polls with growing sleeps)
    return {"job": job, "out": tmp / "run", "log": (tmp / "job.out").read_text(), "state": state}


def test_tiny_job_succeeds_with_two_tasks_and_reward_rises(reference):
    assert reference["state"] == "COMPLETED", reference["log"][-3000:]
    assert "2 agents x 1 ranks" in reference["log"]
    meta = json.loads((reference["out"] / "checkpoints" / "iter_0000016" / "vp2o.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["parallel"]["ep"] == 2
    metrics = rows(reference["out"])
    assert [r["step"] for r in metrics] == list(range(17))
    evals = [r["eval/mean"] for r in metrics if "eval/mean" in r]
    assert len(evals) == 2 and evals[1] > evals[0], evals
    assert all(r["skipped_steps"] == 0 for r in metrics[1:])


def test_stop_signal_checkpoints_and_resubmission_continues_exactly(slurm, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, out, log, env={"REQUEUE": "0"})
    latest, deadline = out / "checkpoints" / "latest", time.time() + 600
    while time.time() < deadline and not latest.exists():
        time.sleep(0.2)
    assert latest.read_text() == "iter_0000004", log.read_text()[-3000:]
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@60 does before the time limit
    assert slurm.wait_job(job, 600) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    stopped_at = int(latest.read_text().removeprefix("iter_"))
    assert f"stop signal received: checkpoint at step {stopped_at} written" in text, text[-3000:]
    assert 4 < stopped_at < 16  # a checkpoint of its own, before the end
    assert [r["step"] for r in rows(out)] == list(range(stopped_at + 1))
    resumed = submit(slurm, out, tmp_path / "job2.out")
    assert slurm.wait_job(resumed, 900) == "COMPLETED", (tmp_path / "job2.out").read_text()[-3000:]
    assert rows(out) == rows(reference["out"])
