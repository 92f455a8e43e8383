"""Contract: the nemo-run path runs the tiny recipe for real -- through LocalExecutor (torchrun, 2 ranks,
EP=2) and through SlurmExecutor with run.LocalTunnel() against the local slurm; a sweep holds one task
per algorithm x seed; a bad override fails before anything is submitted (exit 2, one line)."""

import json
import os

import pytest

from launch.conftest import job_env

run = pytest.importorskip("nemo_run", reason="nemo-run is not installed (pip install -e '.[launch]')")

from megatron_vp2o.cli.main import main  # noqa: E402
from megatron_vp2o.recipes import nemo  # noqa: E402

OVERRIDES = ["parallel.ep=2", "rl.steps=3", "rl.eval_prompts=null", "rl.prompts_per_step=4",
             "rl.policy_loss.group_size=4", "logging.progress=false"]


@pytest.fixture
def nemo_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_home"))
    return tmp_path / "nemo_home"


def _finished(out):
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "checkpoints" / "iter_0000003" / "vp2o.json").read_text())
    return steps, meta["world_size"], meta["config"]["parallel"]["ep"]


def test_local_executor_two_ranks(tmp_path, nemo_home, monkeypatch):
    for key, value in job_env(dict(os.environ)).items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    with run.Experiment("vp2o-tiny-local") as exp:
        exp.add(nemo.train_task("tiny_cpu", str(out), overrides=OVERRIDES, ranks=2),
                executor=nemo.local_executor(2), name="tiny")
        exp.run(sequential=True, detach=False, tail_logs=False)
    assert _finished(out) == ([1, 2, 3], 2, 2)


def test_slurm_executor_against_local_slurm(slurm, tmp_path, nemo_home, monkeypatch):
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # run.LocalTunnel (invoke) reads stdin; pytest forbids it
    out = tmp_path / "run"
    executor = nemo.slurm_executor(account="vp2o", partition="debug", nodes=1, gpus_per_node=None, ranks_per_node=2,
                                   time="00:10:00")
    with run.Experiment("vp2o-tiny-slurm") as exp:
        exp.add(nemo.train_task("tiny_cpu", str(out), overrides=OVERRIDES, ranks=2), executor=executor, name="tiny")
        exp.run(sequential=True, detach=True)
    jobs = slurm.run("squeue", "-h", "-o", "%i").stdout.split()
    assert len(jobs) == 1
    assert slurm.wait_job(jobs[0], 600) == "COMPLETED", slurm.run("scontrol", "show", "job", jobs[0]).stdout
    assert _finished(out) == ([1, 2, 3], 2, 2)


def test_sweep_has_one_task_per_algo_and_seed(tmp_path, nemo_home):
    with run.Experiment("vp2o-sweep") as exp:
        names = nemo.add_sweep(exp, "tiny_cpu", nemo.local_executor(1), str(tmp_path), algos=["vp2o", "grpo"],
                               seeds=[1, 2], ranks=1)
        scripts = {job.id: job.task.inline for job in exp.jobs}
    assert names == ["vp2o-seed1", "vp2o-seed2", "grpo-seed1", "grpo-seed2"]
    assert "algo: grpo" in scripts["grpo-seed2"] and "seed: 2" in scripts["grpo-seed2"]
    assert "algo: grpo" not in scripts["vp2o-seed1"]  # vp2o is the default: not in the diff-from-defaults YAML
    assert f"--out {tmp_path}/grpo_seed2 --resume" in scripts["grpo-seed2"]


def test_bad_override_fails_before_submission(tmp_path, nemo_home, capsys):
    assert main(["launch", "tiny_cpu", "--out", str(tmp_path / "x"), "parallel.ep=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.ep=3" in err[0]
    assert not nemo_home.exists() and not (tmp_path / "x").exists()
