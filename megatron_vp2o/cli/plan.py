"""``vp2o plan``: per-rank memory of a config or recipe on one or more layouts, and whether it fits.

    vp2o plan --config C [--world N | --nodes 1,2 --gpus-per-node 8] [--gpu h100-80gb] [overrides]
    vp2o plan --recipe qwen3_30b_a3b [--nodes 1,2,4] [--check] [overrides]

Nothing is built or allocated (the numbers come from :mod:`megatron_vp2o.plan`). ``--check``
compares the plan with what exists: a 1-rank layout (the tiny recipe, ``--world 1``) is run here,
for ``rl.algo`` vp2o and grpo, one real learner step each, and every row the run can measure is
compared with the live objects (:mod:`megatron_vp2o.plan.live`: parameters, gradients, optimizer,
snapshot, prototypes, routing records, Stein buffers, activations under each recompute mode);
larger layouts build megatron's model for rank 0 on the ``meta`` device (fake process group) and
compare its parameter count. Without ``--world``/``--nodes`` a config is planned on its smallest
valid world, a recipe on each node count it has a layout for. Exit code 0 also when a layout does
not fit (the table says so); 2 on bad input; 1 when ``--check`` finds a mismatch.
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
    p.add_argument("--check", action="store_true",
                   help="compare with what exists: a 1-rank layout runs a learner step per algorithm here and "
                        "every measured row is compared with the live objects; larger layouts build rank 0 on "
                        "the meta device and compare parameter counts; exit 1 on a mismatch")
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


def rl_hooks():
    """The RL learner for the live check (:mod:`megatron_vp2o.plan.live` sits below ``rl``): synthetic
    RL micro-batches of ``rl.micro_batch_size`` x ``model.seq_length`` columns (prompt half, response
    half), the policy-loss forward step, and the learner of ``rl.algo``."""
    from functools import partial

    from megatron_vp2o.plan.live import RLHooks
    from megatron_vp2o.rl.learner import policy_forward_step

    def forward_step(cfg):
        return partial(policy_forward_step, cfg=cfg.rl, vocab_size=cfg.model.vocab_size)

    return RLHooks(batches=rl_batches, forward_step=forward_step,
                   learner=lambda cfg, trainable: CheckLearner(cfg, trainable, forward_step(cfg)))


class CheckLearner:
    """One real learner step per ``step(batches, probe)``: VP2O -- prototypes initialised once, the
    refresh's anchors captured when the anchor budget judges, ``vp2o_train_step`` with its probes;
    GRPO -- the learner's mini-batch epochs. Returns the anchors (what the RL loop keeps)."""

    def __init__(self, cfg, trainable, forward_step):
        from megatron_vp2o.rl.learner import GRPOLearner, VP2OLearner, init_vp2o
        from megatron_vp2o.rl.session import vp2o_knobs

        self.trainable, self.forward_step = trainable, forward_step
        self.vp2o = cfg.rl.algo == "vp2o" and cfg.vp2o.enabled
        if not self.vp2o:
            self.learner = GRPOLearner(trainable, cfg.rl, forward_step)
            return
        state = init_vp2o(trainable, vp2o_knobs(cfg), sequence_parallel=False)
        self.learner = VP2OLearner(trainable, state, forward_step, loop=cfg.rl.loop,
                                   group_size=cfg.rl.policy_loss.group_size, anchor_budget=cfg.rl.ablate.anchor_budget)

    def step(self, batches, probe=None) -> list:
        from megatron_vp2o.rl.learner import grads_finite, vp2o_train_step

        if not self.vp2o:
            self.learner.step(batches)
            return []
        anchors = self.learner.anchors(batches)
        vp2o_train_step(self.trainable, batches, self.learner.state, forward_step=self.forward_step, anchors=anchors,
                        probe=probe, guard=grads_finite)
        return anchors or []


def rl_batches(cfg) -> list:
    """One step's learner micro-batches of a 1-rank world (``rl_hooks``)."""
    import torch

    from megatron_vp2o.device import device
    from megatron_vp2o.generation.rollouts import attention_mask
    from megatron_vp2o.rl.batches import RLBatch

    rl, cols = cfg.rl, cfg.model.seq_length
    seqs = rl.prompts_per_step * rl.policy_loss.group_size
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    ids_BS1 = torch.randint(3, cfg.model.vocab_size, (seqs, cols + 1), generator=gen, device="cpu")
    loss_mask_BS = torch.zeros(seqs, cols, device="cpu")
    loss_mask_BS[:, cols // 2:] = 1.0
    logp_old_BS = torch.full((seqs, cols), -math.log(cfg.model.vocab_size), device="cpu") * loss_mask_BS
    adv_B = torch.randn(seqs, generator=gen, device="cpu")
    pos_BS = torch.arange(cols, device="cpu").expand(seqs, cols)
    mask = attention_mask(torch.zeros(seqs, dtype=torch.long, device="cpu"), cols, cols)
    batches = [RLBatch(ids_BS1[i, :-1], ids_BS1[i, 1:], pos_BS[i], mask[i], loss_mask_BS[i], logp_old_BS[i],
                       adv_B[i] - adv_B.mean()) for i in torch.arange(seqs, device="cpu").split(rl.micro_batch_size)]
    return [b.to(device()) for b in batches]


def check_live(label: str, cfg) -> bool:
    """Run the live check (:func:`megatron_vp2o.plan.live.check`) of a 1-rank layout in this process
    and print one line per measured row; True when every row matches."""
    from megatron_vp2o import platform

    platform.activate()  # before megatron-core is imported by the live measurement
    import torch.distributed as dist

    from megatron_vp2o.distributed.init import shutdown
    from megatron_vp2o.plan.live import UNMEASURED, check

    owner = not dist.is_initialized()  # tear down only the world this call starts
    try:
        rows = check(cfg, rl_hooks())
    finally:
        if owner:
            shutdown()
    print(f"live check {label} world=1: one learner step per algorithm on this machine "
          "(activations: the plan + what the CPU path saves on top, within 5%; stein within 2%; the rest exact)")
    print(f"  {'row':<24}{'algo':<6}{'plan bytes':>14}{'CPU extra':>12}{'live bytes':>14}  verdict")
    for r in rows:
        print(f"  {r.row:<24}{r.algo:<6}{r.plan:>14,}{r.extra:>12,}{r.live:>14,}  {'ok' if r.ok else 'MISMATCH'}")
    print("  not measured: " + "; ".join(f"{k} ({v})" for k, v in UNMEASURED.items()))
    return all(r.ok for r in rows)


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
    if not args.check:
        return 0
    live = [(label, cfg) for label, cfg, world in items if world == 1]
    ok = check_meta([item for item in items if item[2] != 1])
    for label, cfg in live:
        ok &= check_live(label, cfg)
    if not ok:
        print("vp2o plan: error: the plan differs from what megatron builds or the live objects hold "
              "(MISMATCH rows above)", file=sys.stderr)
        return 1
    return 0
