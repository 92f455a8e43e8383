"""Equal tuning of GRPO and VP2O with a real tuner: Optuna TPE, the same trials per arm.

    python tools/tune.py --out runs/tune --task digit_sum --trials 16 --seeds 101 102 \\
        --budget 768 --eval-every 256 [--jobs 1] [--nice 19] [--deadline-min 60] [--report-only]

Each arm (``grpo``: GRPO's clipped mini-batch loop; ``vp2o``: VP2O's event-driven loop, unclipped,
with its own knobs) gets one Optuna study (TPESampler, fixed sampler seed, stored as a journal file
OUT/<arm>.journal so an interrupted tuning resumes). A trial is one setting run on every tuning
seed (``vp2o train`` at ``rl.budget.samples=--budget``, runs under OUT/<task>/<arm>-tNN/seed_S);
its value is the mean over the seeds of the final eval reward. Trials are interleaved (trial i of
every arm before trial i + 1 of any), so a deadline leaves every arm with the same number of
finished trials. The tuning seeds must not be the seeds of the final comparison.

Writes OUT/tuning.md (every trial, the best setting per arm as a ``vp2o compare --arm`` string)
and OUT/tuning_curves.png (best value so far against trials, one line per arm).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vp2o.cli.compare import TASKS  # noqa: E402
from megatron_vp2o.monitor.study import final, finished, load_run, run_dir  # noqa: E402


def grpo_space(trial) -> dict:
    """GRPO's knobs: the learning rate and its own section, rl.grpo (clip, mini-batches, epochs)."""
    mini = trial.suggest_categorical("rl.grpo.mini_batches", [1, 2, 4])
    return {
        "rl.lr": trial.suggest_float("rl.lr", 1e-4, 3e-3, log=True),
        "rl.grpo.mini_batches": mini,
        "rl.grpo.epochs": trial.suggest_int("rl.grpo.epochs", 1, 3),
        "rl.grpo.clip_eps": trial.suggest_float("rl.grpo.clip_eps", 0.05, 0.3),
    }


def vp2o_space(trial) -> dict:
    return {
        "rl.lr": trial.suggest_float("rl.lr", 1e-4, 3e-3, log=True),
        "vp2o.stein.kernel_bandwidth": trial.suggest_categorical("vp2o.stein.kernel_bandwidth",
                                                                 ["fixed", "median"]),
        "vp2o.stein.kernel_tau0": trial.suggest_float("vp2o.stein.kernel_tau0", 0.25, 4.0, log=True),
        "vp2o.stein.kernel_sharpness": trial.suggest_float("vp2o.stein.kernel_sharpness", 0.5, 8.0, log=True),
        "vp2o.stein.repulsion_coef": trial.suggest_float("vp2o.stein.repulsion_coef", 1e-3, 0.1, log=True),
        "vp2o.stein.coact_topm": trial.suggest_int("vp2o.stein.coact_topm", 1, 3),
        "vp2o.trust_region.anchor_delta": trial.suggest_float("vp2o.trust_region.anchor_delta", 0.05, 0.5,
                                                              log=True),
        "vp2o.trust_region.drift_delta": trial.suggest_float("vp2o.trust_region.drift_delta", 0.005, 0.1,
                                                             log=True),
        "vp2o.trust_region.max_steps_per_refresh": trial.suggest_int(
            "vp2o.trust_region.max_steps_per_refresh", 2, 8),
        "vp2o.specialization.var_coef": trial.suggest_float("vp2o.specialization.var_coef", 1e-4, 1e-1,
                                                            log=True),
    }


ARMS = {"grpo": (["rl.algo=grpo"], grpo_space), "vp2o": (["rl.algo=vp2o"], vp2o_space)}


def _command(args, out: Path, seed: int, fixed: list[str], params: dict) -> list[str]:
    return [sys.executable, "-m", "megatron_vp2o.cli.main", "train", "--config", args.config, "--out", str(out),
            f"train.seed={seed}", "rl.steps=1000000", f"rl.budget.samples={args.budget}",
            f"rl.budget.eval_every={args.eval_every}", "logging.progress=false", "checkpoint.save_final=false",
            *TASKS[args.task], *fixed, *(f"{k}={v}" for k, v in params.items())]


def _run(args, out: Path, cmd: list[str]) -> int:
    if finished(out):
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("metrics.jsonl"):
        f.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(out / "train.log", "w") as log:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: os.nice(args.nice)).returncode


def trial_value(args, arm: str, number: int, params: dict, pool) -> float:
    fixed, _ = ARMS[arm]
    dirs = [run_dir(Path(args.out), args.task, f"{arm}-t{number:02d}", s) for s in args.seeds]
    for d, s in zip(dirs, args.seeds):
        d.mkdir(parents=True, exist_ok=True)
        (d / "params.json").write_text(json.dumps(params, indent=1))
    rcs = list(pool.map(lambda ds: _run(args, ds[0], _command(args, ds[0], ds[1], fixed, params)),
                        zip(dirs, args.seeds)))
    values = []
    for d, rc in zip(dirs, rcs):
        points = load_run(d) if rc == 0 else None
        if points is None:
            return float("nan")
        values.append(final(points, "eval/mean"))
    return sum(values) / len(values)


def tune(args) -> dict:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    studies = {}
    for i, arm in enumerate(args.arms):
        storage = JournalStorage(JournalFileBackend(str(Path(args.out) / f"{arm}.journal")))
        sampler = optuna.samplers.TPESampler(seed=args.sampler_seed + i, n_startup_trials=args.startup)
        studies[arm] = optuna.create_study(study_name=f"{args.task}-{arm}", storage=storage, sampler=sampler,
                                           direction="maximize", load_if_exists=True)
    deadline = time.time() + 60 * args.deadline_min if args.deadline_min else float("inf")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while min(_done(s) for s in studies.values()) < args.trials and time.time() < deadline:
            for arm, study in studies.items():
                if _done(study) > min(_done(s) for s in studies.values()):
                    continue  # interleave: this arm is one trial ahead
                trial = study.ask()
                params = ARMS[arm][1](trial)
                t0 = time.time()
                value = trial_value(args, arm, trial.number, params, pool)
                if value != value:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
                print(f"  {arm:<5} trial {trial.number:2d}: {value:.4f} ({time.time() - t0:.0f} s) {params}",
                      flush=True)
    return studies


def _done(study) -> int:
    import optuna

    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def report(args, studies: dict) -> Path:
    import optuna

    out = Path(args.out)
    lines = [f"# Equal tuning on {args.task} (Optuna TPE)", "",
             f"`python tools/tune.py --out {args.out} --task {args.task} --trials {args.trials} --seeds "
             f"{' '.join(map(str, args.seeds))} --budget {args.budget} --eval-every {args.eval_every}`; "
             f"value = mean final eval reward over the tuning seeds; sampler seeds {args.sampler_seed}+arm, "
             f"{args.startup} random start-up trials.", ""]
    curves = {}
    for arm, study in studies.items():
        trials = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)
        best, curve = float("-inf"), []
        for t in trials:
            best = max(best, t.value)
            curve.append(best)
        curves[arm] = curve
        lines += [f"## {arm}: {len(trials)} trials", "", "| trial | value | setting |", "|---|---|---|"]
        lines += [f"| {t.number} | {t.value:.3f} | {', '.join(f'{k}={_fmt(v)}' for k, v in t.params.items())} |"
                  for t in trials]
        if trials:
            b = max(trials, key=lambda t: t.value)
            arm_string = ",".join(f"{k}={_fmt(v)}" for k, v in b.params.items())
            lines += ["", f"Best: trial {b.number}, {b.value:.3f}. As a compare arm: "
                      f"`--arm \"{arm}-tuned={arm}:{arm_string}\"`", ""]
    _plot(curves, out / "tuning_curves.png", args.task)
    lines += ["![tuning curves](tuning_curves.png)", ""]
    path = out / "tuning.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _plot(curves: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for arm, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=arm)
    ax.set_xlabel("trial")
    ax.set_ylabel("best mean final eval reward so far")
    ax.set_title(f"Optuna TPE tuning, {task}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="examples/configs/tiny_cpu.yaml")
    p.add_argument("--task", default="digit_sum", choices=sorted(TASKS))
    p.add_argument("--arms", nargs="+", default=["grpo", "vp2o"], choices=sorted(ARMS))
    p.add_argument("--trials", type=int, default=16, help="trials per arm")
    p.add_argument("--seeds", type=int, nargs="+", default=[101, 102], help="tuning seeds (not the final ones)")
    p.add_argument("--budget", type=int, default=768, help="responses per run")
    p.add_argument("--eval-every", type=int, default=256)
    p.add_argument("--startup", type=int, default=6, help="random trials before TPE models the space")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--nice", type=int, default=19)
    p.add_argument("--deadline-min", type=float, default=0, help="start no trial after this many minutes")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        args.trials = 0
    studies = tune(args)
    print(f"wrote {report(args, studies)}")


if __name__ == "__main__":
    main()
