"""nemo-run launch of the recipes: a ``run.Script`` for ``vp2o train``, executors, sweeps.

* :func:`train_task` -- recipe + dotted overrides -> ``run.Script``. The overrides are applied and
  validated here (a bad override fails before anything is submitted), and the final config travels
  *inside* the script as YAML (an inline script that writes it to a temp file on the node and execs
  ``vp2o train --config <it> --out OUT --resume``), so the cluster needs no copy of the recipe.
  ``--resume`` makes a retried or requeued task continue from its newest checkpoint.
* :func:`local_executor` -- ``run.LocalExecutor`` with torchrun (``ranks`` processes on this machine).
* :func:`slurm_executor` -- ``run.SlurmExecutor`` (account, partition, nodes, GPUs per node, container
  image and mounts) through ``run.LocalTunnel()`` (launching from a login node of the cluster) or any
  tunnel passed in (``run.SSHTunnel`` from a laptop). One torchrun agent per node; torchrun's c10d
  rendezvous on the first node.
* :func:`sweep` / :func:`add_sweep` -- ``run.Experiment`` of one task per (algorithm, seed): the
  comparison study.

nemo-run is an optional dependency (``pip install -e ".[launch]"``); it is imported inside these
functions only.
"""

from __future__ import annotations

from typing import Iterable

from megatron_vp2o.config import Config, ConfigError, apply_overrides, build, check_layout, to_dict
from megatron_vp2o.recipes.models import NODES, get_recipe, recipe_yaml


def _nemo_run():
    try:
        import nemo_run as run
    except ImportError:
        raise ConfigError("nemo-run is not installed; install it with: pip install -e \".[launch]\"") from None
    return run


def recipe_config(recipe: str, nodes: int | None = None, overrides: Iterable[str] = (), ranks: int = 1) -> Config:
    """The recipe's config for ``nodes`` x ``ranks`` ranks (tiny_cpu: one node) with ``overrides``
    applied, checked against that world size (``check_layout``)."""
    fn = get_recipe(recipe)
    nodes = 1 if recipe == "tiny_cpu" else nodes or NODES[recipe][0]
    cfg = fn(ranks=ranks) if recipe == "tiny_cpu" else fn(nodes)
    cfg = build(Config, apply_overrides(to_dict(cfg), list(overrides)))
    check_layout(cfg, nodes * ranks)
    return cfg


def train_inline(cfg: Config, out: str, vp2o: str = "vp2o") -> str:
    """The bash body of the task: write ``cfg`` as YAML to a temp file, exec ``vp2o train --resume``."""
    body = recipe_yaml(cfg, "config written by megatron_vp2o.recipes.nemo.train_task")
    if "VP2O_RECIPE_EOF" in body:
        raise ConfigError("a config value contains the heredoc marker VP2O_RECIPE_EOF; rename it")
    return (f"set -euo pipefail\nCFG=$(mktemp --suffix=.yaml)\ncat > \"$CFG\" <<'VP2O_RECIPE_EOF'\n{body}"
            f"VP2O_RECIPE_EOF\nexec {vp2o} train --config \"$CFG\" --out {out} --resume\n")


def train_task(recipe: str, out: str, nodes: int | None = None, overrides: Iterable[str] = (), ranks: int = 1,
               vp2o: str = "vp2o", env: dict | None = None):
    """``run.Script`` that runs ``vp2o train`` on ``recipe`` (validated now, not on the cluster)."""
    run = _nemo_run()
    cfg = recipe_config(recipe, nodes, overrides, ranks)
    return run.Script(inline=train_inline(cfg, out, vp2o), entrypoint="bash", env=dict(env or {}))


def local_executor(ranks: int = 2, env: dict | None = None):
    """torchrun with ``ranks`` processes on this machine."""
    run = _nemo_run()
    return run.LocalExecutor(ntasks_per_node=ranks, launcher="torchrun",
                             env_vars={"OMP_NUM_THREADS": "1", **(env or {})})


def slurm_executor(account: str, partition: str | None = None, nodes: int = 1, gpus_per_node: int | None = 8,
                   ranks_per_node: int | None = None, time: str = "04:00:00", container_image: str | None = None,
                   container_mounts: Iterable[str] = (), job_dir: str = "", tunnel=None, env: dict | None = None,
                   packager=None, **extra):
    """``run.SlurmExecutor``: one torchrun agent per node with ``ranks_per_node`` (default: the GPUs) ranks.

    ``tunnel``: default ``run.LocalTunnel(job_dir=job_dir)``. ``packager``: default ``run.Packager()``
    (nothing is copied: megatron-vp2o is installed on the cluster or in the container; nemo-run's own
    default archives the git checkout). ``extra`` goes to ``run.SlurmExecutor`` (``qos``,
    ``exclusive``, ``signal``, ``additional_parameters``, ...).
    """
    run = _nemo_run()
    if tunnel is None:
        tunnel = run.LocalTunnel(job_dir=job_dir)
    return run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=1, gpus_per_node=gpus_per_node,
        torchrun_nproc_per_node=ranks_per_node or gpus_per_node or 1, time=time, container_image=container_image,
        container_mounts=list(container_mounts), tunnel=tunnel, launcher="torchrun",
        packager=packager if packager is not None else run.Packager(),
        env_vars={"OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600", **(env or {})}, **extra)


def add_sweep(exp, recipe: str, executor, out: str, algos: Iterable[str] = ("vp2o", "grpo"),
              seeds: Iterable[int] = (1, 2, 3), nodes: int | None = None, overrides: Iterable[str] = (),
              ranks: int = 1) -> list[str]:
    """Add one ``vp2o train`` task per (algorithm, seed) to the entered ``run.Experiment`` ``exp``;
    outputs go to ``out/<algo>_seed<seed>``. Returns the task names."""
    names = []
    for algo in algos:
        for seed in seeds:
            task = train_task(recipe, f"{out}/{algo}_seed{seed}", nodes,
                              [*overrides, f"rl.algo={algo}", f"train.seed={seed}"], ranks)
            names.append(exp.add(task, executor=executor, name=f"{algo}-seed{seed}"))
    return names


def sweep(recipe: str, executor, out: str, title: str = "vp2o-sweep", run_kwargs: dict | None = None, **kwargs) -> str:
    """Run the (algorithm x seed) study of :func:`add_sweep` as one ``run.Experiment``; returns its id."""
    run = _nemo_run()
    with run.Experiment(title) as exp:
        add_sweep(exp, recipe, executor, out, **kwargs)
        exp.run(**(run_kwargs or {"sequential": True}))
    return exp._id
