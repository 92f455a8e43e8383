"""Contract: `vp2o eval` of the shipped tiny policy on the shipped samples of every task gives the same
texts and scores on 1 rank and under torchrun EP=2 (same seed); `--responses` with those texts gives
the same numbers; `--compare` of the two runs shows zero deltas; results.json has the documented keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vp2o.cli.main import main
from megatron_vp2o.eval.runner import RL_EVAL_SEED

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/tiny_cpu.yaml"
# (task, file, template): the digit-sum file in the math layout with the bare prompt the tiny policy was
# trained on (non-zero scores); the others with their task's own template ('')
BENCHES = [("math", "data/eval/math_digit_sum.jsonl", "{problem}"), ("math", "data/eval/math_aime_sample.jsonl", ""),
           ("multiple_choice", "data/eval/gpqa_sample.csv", ""),
           ("multiple_choice", "data/eval/mmlu_pro_sample.jsonl", ""),
           ("ifeval", "data/eval/ifeval_sample.jsonl", ""), ("code", "data/eval/code_sample.jsonl", "")]
LABEL = "tiny_policy-iter_0001000"
TRAIN_SEED = 7  # the eval runs sample with train.seed + RL_EVAL_SEED: what `vp2o train` uses for rl.eval


def bench_args(with_templates: bool = True) -> list[str]:
    out = []
    for task, path, template in BENCHES:
        out += ["--task", task, "--data", path] + (["--template", template] if with_templates else [])
    return out


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    from megatron_vp2o.rewards.sandbox import UNCONFINED_ENV, bwrap_problem

    if bwrap_problem() is not None:  # no usable bubblewrap here: the documented opt-in
        env[UNCONFINED_ENV] = "1"
    return env


def _start_eval(out: Path, nproc: int) -> subprocess.Popen:
    args = ["eval", "--ckpt", "checkpoints/tiny_policy", "--config", CONFIG, *bench_args(), "--samples", "4",
            "--seed", str(TRAIN_SEED + RL_EVAL_SEED), "--out", str(out)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_vp2o.cli.main", *args]
    else:
        from harness import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "--master-addr=127.0.0.1", "-m", "megatron_vp2o.cli.main", *args,
               "parallel.ep=2"]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> None:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-2000:] + err[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    outs = tmp / "one", tmp / "ep2"
    procs = [_start_eval(outs[0], 1), _start_eval(outs[1], 2)]  # concurrently: they share nothing
    for proc in procs:
        _wait(proc)
    return outs


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_results_have_the_documented_keys(runs):
    res = _results(runs[0])
    assert set(res["benchmarks"]) == {Path(p).stem for _, p, _ in BENCHES}
    [ck] = res["checkpoints"]
    assert ck["label"] == LABEL and ck["step"] == 1000
    for name, r in ck["results"].items():
        s = r["summary"]
        assert {"pass@1", "pass@2", "pass@4", "avg@4", "tokens/median", "tokens/mean"} <= set(s), name
        assert s["pass@1"] <= s["pass@2"] <= s["pass@4"] and len(r["problems"]) == s["problems"]
        assert all(p["n"] == 4 for p in r["problems"])
    results = ck["results"]
    assert {"maj@1", "maj@4"} <= set(results["gpqa_sample"]["summary"])
    assert {"prompt_strict", "prompt_loose", "inst_strict", "inst_loose"} <= set(results["ifeval_sample"]["summary"])
    assert "rating" in results["code_sample"]["summary"]
    assert results["math_digit_sum"]["summary"]["pass@1"] > 0  # the policy's own task, in the math layout
    assert (runs[0] / "results.md").read_text().count("| " + LABEL) == len(BENCHES)


def test_one_rank_and_ep2_give_the_same_texts_and_scores(runs):
    one, ep2 = runs
    for _, path, _ in BENCHES:
        name = Path(path).stem
        a = (one / "responses" / LABEL / f"{name}.jsonl").read_text()
        assert a == (ep2 / "responses" / LABEL / f"{name}.jsonl").read_text(), name
    a, b = _results(one)["checkpoints"][0]["results"], _results(ep2)["checkpoints"][0]["results"]
    assert a == b


@pytest.mark.parametrize("hide_bwrap", [False, True], ids=["as-generated", "bwrap-hidden"])
def test_responses_give_the_same_scores_as_generation(runs, tmp_path, capsys, monkeypatch, hide_bwrap):
    """Scored here under the generation's sandbox settings, and again with bwrap hidden (the unconfined
    mode a machine without bubblewrap opts into): the code benchmark scores the same either way."""
    from megatron_vp2o.rewards.sandbox import NO_BWRAP_ENV, UNCONFINED_ENV

    for key in (UNCONFINED_ENV, NO_BWRAP_ENV):
        monkeypatch.delenv(key, raising=False)
    if UNCONFINED_ENV in _env():
        monkeypatch.setenv(UNCONFINED_ENV, "1")
    if hide_bwrap:
        monkeypatch.setenv(NO_BWRAP_ENV, "1")
        refused = main(["eval", "--responses", "x.jsonl", "--task", "code", "--data", BENCHES[-1][1], "--out",
                        str(tmp_path / "refused")])
        assert refused == 2 and "bubblewrap" in capsys.readouterr().err  # without the opt-in: one line
        monkeypatch.setenv(UNCONFINED_ENV, "1")
    gen = runs[0]
    out = tmp_path / "scored"
    responses = []
    for _, path, _ in BENCHES:
        responses += ["--responses", str(gen / "responses" / LABEL / f"{Path(path).stem}.jsonl")]
    assert main(["eval", *responses, *bench_args(), "--config", CONFIG, "--out", str(out)]) == 0
    scored = _results(out)["checkpoints"][0]["results"]
    generated = _results(gen)["checkpoints"][0]["results"]
    assert scored == generated


def test_compare_of_equal_runs_has_zero_deltas(runs, tmp_path, capsys):
    assert main(["eval", "--compare", str(runs[0]), str(runs[1] / "results.json"), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ") and "benchmark" not in line]
    assert len(lines) >= len(BENCHES) and all("+0 [+0, +0]" in line for line in lines)
    assert (tmp_path / "compare.md").read_text() == table


def test_rl_eval_during_training_is_the_same_evaluation(runs, tmp_path):
    """rl.eval at step 0 (the initial policy) gives vp2o eval's numbers; they land in metrics.jsonl."""
    entries = ", ".join(f'{{task: {t}, data: {p}' + (f', template: "{tp}"}}' if tp else "}")
                        for t, p, tp in BENCHES[:3])
    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "megatron_vp2o.cli.main", "train", "--config", CONFIG, "--out", str(out),
           "logging.progress=false", "rl.eval_prompts=null", "rl.algo=grpo", "rl.prompts_per_step=4",
           "rl.policy_loss.group_size=4", "rl.steps=1", f"train.seed={TRAIN_SEED}", "rl.eval_samples=4",
           f"rl.eval=[{entries}]"]
    bad_cmd = [str(tmp_path / "bad") if c == str(out) else c for c in cmd[:-1]]
    bad = subprocess.Popen(bad_cmd + ["rl.eval=[{task: math, data: /no/such.jsonl}]"], cwd=ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 1
    results = _results(runs[0])["checkpoints"][0]["results"]
    for _, path, _ in BENCHES[:3]:
        name = Path(path).stem
        for key in ("pass@1", "pass@4", "avg@4", "maj@4", "tokens/median"):
            assert first[f"eval/{name}/{key}"] == pytest.approx(results[name]["summary"][key]), (name, key)
            assert f"eval/{name}/{key}" in last
    err = bad.communicate(timeout=120)[1]  # a missing rl.eval file: one line, exit 2, before any work
    assert bad.returncode == 2 and "rl.eval[0]" in err and "/no/such.jsonl" in err
    assert not (tmp_path / "bad").exists()
