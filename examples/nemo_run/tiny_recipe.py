"""nemo-run launch of the recipes from Python (the same as `vp2o launch`, as a script to copy from).

    pip install -e ".[launch]"                                   # nemo-run==0.11.1 (+ leptonai==0.27.3)
    python examples/nemo_run/tiny_recipe.py --ranks 2 parallel.ep=2 rl.steps=20          # torchrun here
    python examples/nemo_run/tiny_recipe.py --sweep rl.steps=20                          # vp2o/grpo x 3 seeds
    python examples/nemo_run/tiny_recipe.py --recipe qwen3_30b_a3b --nodes 4 --slurm ACCOUNT --partition batch \\
        --container megatron-vp2o.sqsh --out /checkpoints/qwen3_run1

The recipe (megatron_vp2o/recipes) with the overrides is validated before anything runs and travels
inside the task as YAML (megatron_vp2o/recipes/nemo.py).
"""

from __future__ import annotations

import argparse

import nemo_run as run

from megatron_vp2o.recipes import nemo


def main() -> None:
    ap = argparse.ArgumentParser(description="nemo-run launch of vp2o train")
    ap.add_argument("--recipe", default="tiny_cpu")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--ranks", type=int, default=2, help="ranks per node (local processes or GPUs)")
    ap.add_argument("--out", default="runs/nemo_run_tiny")
    ap.add_argument("--slurm", metavar="ACCOUNT", default=None, help="run on slurm with this account")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--container", default=None)
    ap.add_argument("--sweep", action="store_true", help="vp2o and grpo x seeds 1, 2, 3")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.slurm:
        executor = nemo.slurm_executor(account=args.slurm, partition=args.partition, nodes=args.nodes or 1,
                                       gpus_per_node=args.ranks, container_image=args.container)
    else:
        executor = nemo.local_executor(args.ranks)
    with run.Experiment(f"vp2o-{args.recipe}") as exp:
        if args.sweep:
            nemo.add_sweep(exp, args.recipe, executor, args.out, nodes=args.nodes, overrides=args.overrides,
                           ranks=args.ranks)
        else:
            exp.add(nemo.train_task(args.recipe, args.out, args.nodes, args.overrides, args.ranks), executor=executor,
                    name=args.recipe.replace("_", "-"))
        exp.run(sequential=True, detach=bool(args.slurm))


if __name__ == "__main__":
    main()
