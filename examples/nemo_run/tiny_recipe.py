"""nemo-run recipe: VP2O RL of the tiny MoE with torchrun through nemo-run's LocalExecutor.

    pip install -e ".[launch]"        # nemo-run (pins leptonai==0.27.3; newer leptonai fails to import)
    python examples/nemo_run/tiny_recipe.py --nproc 2 --ep 2 [--algo grpo] [--dryrun]

On a cluster, swap ``LocalExecutor`` for ``run.SlurmExecutor`` (account, partition, nodes,
container image) and keep the task the same.
"""

from __future__ import annotations

import argparse


def build_task(args):
    import nemo_run as run

    overrides = [f"parallel.ep={args.ep}", f"rl.algo={args.algo}", f"rl.steps={args.steps}"]
    return run.Script(path="vp2o", args=["train", "--config", "examples/configs/tiny_cpu.yaml", "--out",
                                         args.out, *overrides], entrypoint="")


def main() -> None:
    ap = argparse.ArgumentParser(description="nemo-run launch of vp2o train")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--algo", default="vp2o", choices=["vp2o", "grpo"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/nemo_run_tiny")
    ap.add_argument("--dryrun", action="store_true")
    args = ap.parse_args()
    import nemo_run as run

    executor = run.LocalExecutor(ntasks_per_node=args.nproc, launcher="torchrun")
    with run.Experiment("vp2o-tiny") as exp:
        exp.add(build_task(args), executor=executor, name=f"vp2o-{args.algo}")
        exp.run(sequential=True, detach=False, direct=True, dryrun=args.dryrun)


if __name__ == "__main__":
    main()
