"""``vp2o plan``: per-rank memory of a config or recipe on one or more layouts, and whether it fits.

    vp2o plan --config C [--world N | --nodes 1,2 --gpus-per-node 8] [--gpu h100-80gb] [overrides]
    vp2o plan --recipe qwen3_30b_a3b [--nodes 1,2,4] [--check] [overrides]

Nothing is built or allocated (the numbers come from :mod:`megatron_vp2o.plan`); ``--check``
also builds megatron's model for rank 0 of each layout on the ``meta`` device (fake process
group) and fails unless its parameter count equals the plan's. Without ``--world``/``--nodes`` a
config is planned on its smallest valid world, a recipe on each node count it has a layout for.
Exit code 0 also when a layout does not fit (the table says so); 2 on bad input; 1 when
``--check`` finds a mismatch.
"""

from __future__ import annotations

import argparse
import math
import sys

NEEDS_PLATFORM = False


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="per-rank memory plan of a config/recipe on a layout (fits or not)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML config (see examples/configs/)")
    src.add_argument("--recipe", help="recipe name (megatron_vp2o/recipes: tiny_cpu, qwen3_30b_a3b, paper_33b_a4b)")
    p.add_argument("--nodes", default=None, help="comma-separated node counts, e.g. 1,2,4")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--world", type=int, default=None, help="total ranks (instead of --nodes)")
    p.add_argument("--gpu", default="h100-80gb", help="GPU model for the fits column (h100-80gb, h200, a100-80gb, ...)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--check", action="store_true", help="also build rank 0 on the meta device and compare params")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.algo=grpo rl.micro_batch_size=2")
    return p


def _node_counts(text: str) -> list[int]:
    from megatron_vp2o.config import ConfigError

    try:
        nodes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        nodes = []
    if not nodes or min(nodes) < 1:
        raise ConfigError(f"--nodes must be a comma-separated list of positive integers, e.g. 1,2,4 (got {text!r})")
    return nodes


def _smallest_world(cfg) -> int:
    par = cfg.parallel
    return math.lcm(par.tp * par.pp * par.cp, par.expert_tp * par.ep * par.pp)


def layouts(args) -> list[tuple[str, object, int]]:
    """(label, config, world) for every layout the arguments ask for."""
    from megatron_vp2o.config import Config, ConfigError, apply_overrides, build, to_dict
    from megatron_vp2o.cli.checks import load_run_config

    if not 0.0 <= args.headroom < 1.0:
        raise ConfigError(f"--headroom must be in [0, 1) (got {args.headroom})")
    if args.config:
        cfg = load_run_config(args.config, args.overrides)
        if args.world:
            return [(args.config, cfg, args.world)]
        if args.nodes:
            return [(args.config, cfg, n * args.gpus_per_node) for n in _node_counts(args.nodes)]
        return [(args.config, cfg, _smallest_world(cfg))]
    from megatron_vp2o.recipes import NODES, get_recipe

    recipe = get_recipe(args.recipe)
    if args.recipe == "tiny_cpu":
        cfg = build(Config, apply_overrides(to_dict(recipe()), list(args.overrides)))
        return [("tiny_cpu", cfg, args.world or _smallest_world(cfg))]
    out = []
    for n in _node_counts(args.nodes) if args.nodes else NODES[args.recipe]:
        cfg = build(Config, apply_overrides(to_dict(recipe(n)), list(args.overrides)))
        out.append((f"{args.recipe}(nodes={n})", cfg, n * args.gpus_per_node))
    return out


def check_meta(items) -> bool:
    """Build rank 0 of each layout on meta; print and compare with the plan's count."""
    from megatron_vp2o.plan import stage_params
    from megatron_vp2o.plan.meta import meta_rank_params

    ok = True
    for label, cfg, world in items:
        got = meta_rank_params(cfg, world, rank=0)
        want = stage_params(cfg.model, cfg.parallel, got["stage"])
        same = (got["dense"], got["expert"]) == (want.dense, want.expert)
        ok &= same
        print(f"meta check {label} world={world} rank 0: megatron {got['total']:,} params "
              f"(dense {got['dense']:,}, expert {got['expert']:,}), plan {want.total:,}: {'ok' if same else 'MISMATCH'}")
    return ok


def run(args) -> int:
    from megatron_vp2o.plan import model_params, plan_rank, render

    items = layouts(args)
    plans = [plan_rank(cfg, world, gpu=args.gpu, headroom=args.headroom) for _, cfg, world in items]
    name = args.recipe or args.config
    cfg0 = items[0][1]
    title = (f"vp2o plan: {name}  ({model_params(cfg0.model) / 1e9:.2f} B params, rl.algo={cfg0.rl.algo}, "
             f"{cfg0.model.params_dtype}, seq {cfg0.model.seq_length}, learner micro-batch {cfg0.rl.micro_batch_size}, "
             f"{cfg0.rl.prompts_per_step}x{cfg0.rl.policy_loss.group_size} rollouts/step) on {args.gpu}, "
             f"headroom {args.headroom:.0%}")
    print(render(title, plans))
    if args.check and not check_meta(items):
        print("vp2o plan: error: megatron's parameter count differs from the plan", file=sys.stderr)
        return 1
    return 0
