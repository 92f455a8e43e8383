"""``vp2o launch``: run a recipe through nemo-run, on this machine or on slurm.

    vp2o launch tiny_cpu --executor local --ranks 2 --out runs/nemo_tiny parallel.ep=2
    vp2o launch qwen3_30b_a3b --nodes 4 --executor slurm --account ACC --partition batch \\
        --container megatron-vp2o.sqsh --mounts /checkpoints:/checkpoints,/data:/data --out /checkpoints/run1
    vp2o launch qwen3_30b_a3b --executor slurm ... --sweep-seeds 1,2,3 --sweep-algos vp2o,grpo

The recipe (megatron_vp2o/recipes) plus the dotted overrides is validated here -- a bad override or
an impossible layout fails before anything is submitted -- and travels inside the task as YAML
(:mod:`megatron_vp2o.recipes.nemo`). ``--detach`` returns after submission (slurm); otherwise the
command waits for the task. Needs nemo-run: ``pip install -e ".[launch]"``.
"""

from __future__ import annotations

import argparse
import os
import sys

NEEDS_PLATFORM = False


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("launch", help="run a recipe through nemo-run (local torchrun or slurm)")
    p.add_argument("recipe", help="tiny_cpu, qwen3_30b_a3b or paper_33b_a4b")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--out", required=True, help="output directory of vp2o train (on the cluster's filesystem)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (the recipe's layout for that count)")
    p.add_argument("--ranks", type=int, default=None,
                   help="ranks per node (local: processes; default: GPUs per node, or 2 for tiny_cpu)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="slurm: GPUs per node (0: CPU nodes)")
    p.add_argument("--account", default=None, help="slurm account")
    p.add_argument("--partition", default=None, help="slurm partition")
    p.add_argument("--time", default="04:00:00", help="slurm time limit")
    p.add_argument("--container", default=None, help="slurm: container image (pyxis)")
    p.add_argument("--mounts", default="", help="slurm: comma-separated container mounts src:dst")
    p.add_argument("--sweep-algos", default=None, help="comma-separated algorithms: one task per algo x seed")
    p.add_argument("--sweep-seeds", default=None, help="comma-separated seeds for the sweep (default 1,2,3)")
    p.add_argument("--title", default=None, help="nemo-run experiment title")
    p.add_argument("--detach", action="store_true", help="return after submitting (slurm)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.steps=100 parallel.ep=2")
    return p


def _executor(args, nemo, ranks: int):
    from megatron_vp2o.config import ConfigError

    if args.executor == "local":
        return nemo.local_executor(ranks)
    if not args.account:
        raise ConfigError("--executor slurm needs --account (the slurm account to charge)")
    gpus = args.gpus_per_node or None
    return nemo.slurm_executor(account=args.account, partition=args.partition, nodes=args.nodes or 1,
                               gpus_per_node=gpus, ranks_per_node=ranks, time=args.time,
                               container_image=args.container, container_mounts=[m for m in args.mounts.split(",") if m])


def _split(text: str | None, cast=str) -> list:
    from megatron_vp2o.config import ConfigError

    try:
        return [cast(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list, got {text!r}") from None


def run(args) -> int:
    from megatron_vp2o.recipes import nemo

    bindir = os.path.dirname(sys.executable)  # torchrun and vp2o of this environment, for the tasks
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    tiny = args.recipe == "tiny_cpu"
    ranks = args.ranks or (2 if tiny else args.gpus_per_node or 1)
    nodes = None if tiny else args.nodes
    nemo.recipe_config(args.recipe, nodes, args.overrides, ranks)  # validate before importing nemo-run
    run_mod = nemo._nemo_run()
    executor = _executor(args, nemo, ranks)
    title = args.title or f"vp2o-{args.recipe}"
    run_kwargs = {"sequential": True, "detach": args.detach, "tail_logs": not args.detach}
    with run_mod.Experiment(title) as exp:
        if args.sweep_algos or args.sweep_seeds:
            nemo.add_sweep(exp, args.recipe, executor, args.out, algos=_split(args.sweep_algos) or ["vp2o", "grpo"],
                           seeds=_split(args.sweep_seeds, int) or [1, 2, 3], nodes=nodes, overrides=args.overrides,
                           ranks=ranks)
        else:
            exp.add(nemo.train_task(args.recipe, args.out, nodes, args.overrides, ranks), executor=executor,
                    name=args.recipe.replace("_", "-"))
        exp.run(**run_kwargs)
    return 0
