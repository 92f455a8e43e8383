"""``vp2o compare``: VP2O against GRPO at equal rollout budget -- tasks x arms x seeds, then a report.

    vp2o compare --out docs/study/runs [--tasks digit_sum digit_sum3 digit_product] [--seeds 1 2 3 4 5]
                 [--arms grpo vp2o] [--ablations] [--budget 1536] [--eval-every 256] [--jobs 2]
                 [--report DIR] [--report-only] [section.field=value ...]

Every (task, arm, seed) is one ``vp2o train`` process (1 thread, ``nice``), ``--jobs`` at a time,
each ending when its rollout budget (``rl.budget.samples``: responses generated) is spent and
evaluated every ``--eval-every`` responses, so every curve is read at the same rollout cost. A run
whose metrics.jsonl already ends at its budget is not rerun (a study can be resumed or extended).
``--report`` writes report.md and PNG plots (`megatron_vp2o.monitor.study`).

Arms: ``grpo`` and ``vp2o`` (each as tuned in the config's ``rl.grpo`` / ``rl.vp2o`` section: the arm
is ``rl.algo`` alone); ``--ablations`` adds one VP2O arm per part turned off (``vp2o-no_stein`` (the
whole transport: both forces and the freeze of inactive experts), ``-no_attraction`` and
``-no_repulsion`` (exactly that term), ``-no_specialization``, ``-no_anchor``, ``-no_behaviour``) and
``vp2o-clip`` (PPO clip on). ``--arm NAME=ALGO:k=v,k=v`` adds an arm of your own (the sweep uses it). Tasks:
``digit_sum`` (two digits, checkpoints/tiny_policy), ``digit_sum3`` (three digits,
checkpoints/tiny_policy_sum3) and ``digit_product`` (three digits whose product is N, many answers
per prompt, checkpoints/tiny_policy_product), all run with ``--config`` and the same overrides.
Parallel runs are plain subprocesses (a thread pool waiting on them): nemo-run's LocalExecutor
would add an experiment directory layout and packaging for no gain on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_vp2o.monitor.study import finished, run_dir

NEEDS_PLATFORM = False
ROOT = Path(__file__).resolve().parents[2]

TASKS = {
    "digit_sum": [],
    "digit_sum3": ["rl.prompts=data/prompts/digit_sum3_train.jsonl",
                   "rl.eval_prompts=data/prompts/digit_sum3_eval.jsonl", "rl.policy=checkpoints/tiny_policy_sum3"],
    "digit_product": ["rl.prompts=data/prompts/digit_product_train.jsonl",
                      "rl.eval_prompts=data/prompts/digit_product_eval.jsonl",
                      "rl.policy=checkpoints/tiny_policy_product"],
}
ARMS = {"grpo": ["rl.algo=grpo"], "vp2o": ["rl.algo=vp2o"]}
ABLATIONS = {
    "vp2o-no_stein": ["rl.algo=vp2o", "rl.ablate.stein=false"],  # no transport: both forces (and the freeze) off
    "vp2o-no_attraction": ["rl.algo=vp2o", "rl.ablate.attraction=false"],  # exactly the attraction term
    "vp2o-no_repulsion": ["rl.algo=vp2o", "rl.ablate.repulsion=false"],  # exactly the repulsion term
    "vp2o-no_specialization": ["rl.algo=vp2o", "rl.ablate.specialization=false"],
    "vp2o-no_anchor": ["rl.algo=vp2o", "rl.ablate.anchor_budget=false"],
    "vp2o-no_behaviour": ["rl.algo=vp2o", "rl.ablate.behaviour_budget=false"],
    "vp2o-clip": ["rl.algo=vp2o", "rl.vp2o.clip_eps=0.2"],
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="VP2O vs GRPO at equal rollout budget: runs + report.md + plots")
    p.add_argument("--out", required=True, help="directory of the runs (OUT/task/arm/seed_N)")
    p.add_argument("--config", default="examples/configs/tiny_cpu.yaml")
    p.add_argument("--tasks", nargs="+", default=["digit_sum"], help=f"of {sorted(TASKS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--arms", nargs="+", default=["grpo", "vp2o"], help=f"of {sorted(ARMS | ABLATIONS)}")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=ALGO:k=v,k=v",
                   help="an arm of your own, e.g. grpo_lr3e-4=grpo:rl.lr=3e-4 (repeatable)")
    p.add_argument("--ablations", action="store_true", help="add each VP2O part off in turn, and vp2o-clip")
    p.add_argument("--budget", type=int, default=1536, help="rollout budget per run: responses generated")
    p.add_argument("--eval-every", type=int, default=256, help="evaluate every this many responses")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    p.add_argument("--nice", type=int, default=5)
    p.add_argument("--report", default=None, help="write report.md + PNGs here (default: OUT/report)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from existing runs")
    p.add_argument("--title", default="VP2O vs GRPO at equal rollout budget")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. rl.lr=5e-4")
    return p


def parse_arms(args) -> dict:
    """{arm name: overrides} in the order given."""
    known = ARMS | ABLATIONS
    arms = {}
    for name in args.arms:
        if name not in known:
            raise ValueError(f"--arms: unknown arm {name!r}; choose from {', '.join(sorted(known))} or define one "
                             "with --arm NAME=ALGO:k=v,...")
        arms[name] = known[name]
    if args.ablations:
        arms |= ABLATIONS
    for spec in args.arm:
        name, _, rest = spec.partition("=")
        algo, _, kvs = rest.partition(":")
        if not name or algo not in ("grpo", "vp2o") or any("=" not in kv for kv in filter(None, kvs.split(","))):
            raise ValueError(f"--arm {spec!r}: expected NAME=ALGO:key=value,key=value with ALGO grpo or vp2o")
        arms[name] = [f"rl.algo={algo}", *filter(None, kvs.split(","))]
    return arms


def validate(args) -> None:
    from megatron_vp2o.config import ConfigError

    try:
        _validate(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _validate(args) -> None:
    args.arm_overrides = parse_arms(args)
    for task in args.tasks:
        if task not in TASKS:
            raise ValueError(f"--tasks: unknown task {task!r}; choose from {', '.join(sorted(TASKS))}")
    if args.budget < 1 or args.eval_every < 1 or args.jobs < 1:
        raise ValueError("--budget, --eval-every and --jobs must be >= 1")
    if not (ROOT / args.config).is_file() and not Path(args.config).is_file():
        raise ValueError(f"--config: file '{args.config}' does not exist")


def train_command(args, task: str, arm: str, seed: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "megatron_vp2o.cli.main", "train", "--config", args.config, "--out", str(out),
            f"train.seed={seed}", "rl.steps=1000000", f"rl.budget.samples={args.budget}",
            f"rl.budget.eval_every={args.eval_every}", "logging.progress=false", "checkpoint.save_final=false",
            *TASKS[task], *args.overrides, *args.arm_overrides[arm]]


def _launch(args, job) -> tuple[tuple, int, float]:
    task, arm, seed = job
    out = run_dir(Path(args.out), task, arm, seed)
    if out.exists():
        for f in out.glob("metrics.jsonl"):
            f.unlink()  # an unfinished run starts over (no partial curves)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(train_command(args, task, arm, seed, out), cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(args.nice))
    return job, proc.returncode, time.perf_counter() - t0


def run_all(args) -> int:
    jobs = [(t, a, s) for t in args.tasks for a in args.arm_overrides for s in args.seeds]
    todo = [j for j in jobs if not finished(run_dir(Path(args.out), *j))]
    print(f"vp2o compare: {len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to run "
          f"({args.jobs} at a time)", flush=True)
    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (task, arm, seed), rc, seconds in pool.map(lambda j: _launch(args, j), todo):
            status = "ok" if rc == 0 else f"FAILED rc={rc} (see {run_dir(Path(args.out), task, arm, seed)}/train.log)"
            failed += rc != 0
            print(f"  {task:<11} {arm:<24} seed {seed}: {seconds:5.0f} s {status}", flush=True)
    return failed


def run(args) -> int:
    if not args.report_only and run_all(args):
        print("vp2o compare: some runs failed; the report covers the finished ones", file=sys.stderr)
    from megatron_vp2o.monitor.study import write_report

    report = Path(args.report or Path(args.out) / "report")
    path = write_report(Path(args.out), report, args.tasks, list(args.arm_overrides), args.seeds, args.title,
                        {"budget": args.budget, "eval_every": args.eval_every, "config": args.config,
                         "overrides": args.overrides, "arms": args.arm_overrides})
    print(f"wrote {path}")
    return 0
