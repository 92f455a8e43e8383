"""Everything one RL run holds, built once by ``build_session``: checked inputs, the megatron stack,
the learner (``rl.learner``), the actors' engine, the reference model, sinks and checkpoints.
:mod:`megatron_vp2o.rl.trainer` drives it; this module owns set-up and IO.

Inputs are checked before any work starts by the `vp2o train` pre-flight (``cli/checks.py``: the
layout, the tokenizer, the prompt sets, the policy checkpoint, the learner's settings), once; the
session only loads them (the process-group start-up re-validates the layout as part of its work).
The ``rl.eval`` benchmarks are checked and run by the caller's evaluation callable (the CLI builds
it from ``eval.runner``): the RL loop does not import evaluation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state as ps

from megatron_vp2o.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from megatron_vp2o.checkpoint.dist import load_rank_state
from megatron_vp2o.checkpoint.meta import require_loop_state
from megatron_vp2o.config import to_dict
from megatron_vp2o.data.tokenizer import load_tokenizer
from megatron_vp2o.distributed.init import init_parallel
from megatron_vp2o.generation.prompts import load_prompt_file
from megatron_vp2o.monitor import MetricsLogger, Progress
from megatron_vp2o.rl.actor import act, reward_metrics
from megatron_vp2o.rl.batches import engine_is_metrics, make_batches
from megatron_vp2o.rl.learner import GRPOLearner, Learner, VP2OLearner, behaviour_stats, policy_forward_step, unwrap
from megatron_vp2o.rl.state import LoopState, loop_extra, loop_rank_state, restore_loop
from megatron_vp2o.training.setup import build_trainable

EVAL_SEED = 1_000_003

#: ``evaluate(model, tokenizer, prefix) -> {prefix/<benchmark>/<metric>: number}`` (eval.runner.rl_evaluator)
Evaluate = Callable[[torch.nn.Module, object, str], dict]


def load_inputs(cfg):
    """The tokenizer and the prompt records (``rl.prompts``, ``rl.eval_prompts``) the run reads. The
    inputs were checked by the `vp2o train` pre-flight (``cli/checks.py``: every check lives there
    once, CONTRIBUTING.md §14); what is left here are the loaders' own errors."""
    rl = cfg.rl
    prompts = load_prompt_file(rl.prompts, "rl.prompts")
    evals = load_prompt_file(rl.eval_prompts, "rl.eval_prompts") if rl.eval_prompts else []
    return load_tokenizer(cfg.data.tokenizer), prompts, evals


def vp2o_knobs(cfg):
    """cfg.vp2o with the rl.ablate switches applied (docs/method.md §2.8), each a config value the
    learner and the Stein hook already take -- no new branch on tensors:

    - ``attraction=false`` -> ``vp2o.stein.attraction=false``: each active expert keeps its own
      gradient (self-only attraction weights); the co-active / inactive sets, hence the repellers,
      stay as they are;
    - ``repulsion=false`` -> ``vp2o.stein.repulsion_coef=0`` (alpha = 0);
    - ``stein=false`` -> ``vp2o.stein.enabled=false``: no transport at all, so both forces off, and
      with them the freeze of inactive experts, which only keeps the transport's zero gradient for
      them from being undone by AdamW (plain gradients, as GRPO's);
    - ``specialization=false`` -> both specialisation coefficients 0.
    """
    ab, v = cfg.rl.ablate, cfg.vp2o
    stein = dataclasses.replace(v.stein, enabled=v.stein.enabled and ab.stein,
                                attraction=v.stein.attraction and ab.attraction,
                                repulsion_coef=v.stein.repulsion_coef if ab.repulsion else 0.0)
    spec = v.specialization if ab.specialization else dataclasses.replace(v.specialization, ortho_coef=0.0,
                                                                           var_coef=0.0)
    return dataclasses.replace(v, stein=stein, specialization=spec)


@dataclass
class Session:
    """One RL run's parts (module docstring); built by :func:`build_session`."""

    cfg: object  # megatron_vp2o.config.Config
    out_dir: Path
    tokenizer: object
    prompts: list  # rl.prompts records
    eval_prompts: list  # rl.eval_prompts records ([] when none)
    layout: object  # megatron_vp2o.config.Layout
    trainable: object  # megatron_vp2o.training.setup.Trainable
    learner: Learner
    engine: object  # the actors' megatron_vp2o.generation.MegatronEngine (shares the learner's weights)
    ref_model: torch.nn.Module | None  # frozen initial policy for the KL penalty, or None
    logger: MetricsLogger
    progress: Progress
    ckpt_root: Path
    resume_from: Path | None  # the checkpoint this run resumes, or None
    resumed_extra: dict  # that checkpoint's loop ``extra`` ({} on a fresh run)
    evaluate_benchmarks: Evaluate | None = None  # the rl.eval benchmarks, from the caller
    batches: list = field(default_factory=list)  # the buffer's learner micro-batches
    stein_changes: list = field(default_factory=list)  # per step of this process: mean Stein relative change

    # ---- derived --------------------------------------------------------------------------
    @property
    def vp2o(self):
        """The VP2O learner's state (layers, groups, counters), or None (GRPO, vp2o.enabled=false)."""
        return self.learner.state if isinstance(self.learner, VP2OLearner) else None

    @property
    def forward_step(self):
        return self.learner.forward_step

    @property
    def pad_to(self) -> int:
        return ps.get_tensor_model_parallel_world_size() if self.layout.sequence_parallel else 1

    # ---- actors (the trainer's refresh phases) ---------------------------------------------
    def rollout(self, refresh_index: int):
        return act(self.engine, self.tokenizer, self.prompts, self.cfg, refresh_index, self.cfg.train.seed)

    def reward_metrics(self, batch) -> dict:
        """reward/* of a training batch, plus ``rollout/new_samples`` / ``rollout/new_tokens`` (all ranks)."""
        engine = getattr(self.engine, "last_metrics", {})  # vLLM: weight sync and engine/learner mismatch
        return (reward_metrics(batch, self.cfg.rl.policy_loss.group_size) | engine
                | engine_is_metrics(batch.rollouts, self.cfg.rl.engine_is_cap))  # rl.engine_is_cap: weight stats

    def set_buffer(self, batch):
        """Make ``batch`` the learner's buffer (reference log-probs, micro-batches); the anchors (vp2o)."""
        batch.logp_ref_BT = self.reference_logprobs(batch.rollouts)
        self.batches = self.make_batches(batch)
        return self.learner.anchors(self.batches)

    # ---- learner inputs ---------------------------------------------------------------------
    def make_batches(self, batch):
        return make_batches(batch.rollouts, batch.adv_B, self.cfg.rl.micro_batch_size, self.pad_to,
                            logp_ref_BT=batch.logp_ref_BT, aggregation=self.cfg.rl.policy_loss.aggregation,
                            engine_is_cap=self.cfg.rl.engine_is_cap)

    def behaviour_stats(self) -> dict:
        """D_beh and ESS of the current learner on the buffer (method §2.11)."""
        return behaviour_stats(self.trainable, self.batches, self.cfg.rl, self.tokenizer.vocab_size,
                               self.cfg.vp2o.trust_region.resolved_ess_temper())

    @torch.no_grad()
    def reference_logprobs(self, rollouts):
        """log pi_ref of the buffer's response tokens (the actors' log-prob definition), or None."""
        if self.ref_model is None:
            return None
        from megatron_vp2o.generation import teacher_forced_logprobs

        return teacher_forced_logprobs(self.ref_model, rollouts).logp_BT.detach()

    # ---- evaluation, checkpoints, summary ----------------------------------------------------
    def evaluate(self, prefix: str) -> dict:
        """The caller's rl.eval benchmarks (``eval/<benchmark>/<metric>``), then rl.eval_prompts."""
        bench = self.evaluate_benchmarks(self.engine.model, self.tokenizer, prefix) if self.evaluate_benchmarks else {}
        if not self.eval_prompts:
            return bench
        dp = ps.get_data_parallel_world_size()
        n = len(self.eval_prompts) - len(self.eval_prompts) % dp
        batch = act(self.engine, self.tokenizer, self.eval_prompts, self.cfg, 0, self.cfg.train.seed + EVAL_SEED,
                    per_step=n, group=self.cfg.rl.eval_samples)
        out = reward_metrics(batch, self.cfg.rl.eval_samples, prefix)
        out = {k: v for k, v in out.items() if not k.startswith("rollout/")}  # eval is not rollout cost
        if self.layout.pp == 1 and self.layout.dp == 1:  # routing diagnostics alike for vp2o and grpo
            from megatron_vp2o.rl.diagnostics import eval_diagnostics

            model = unwrap(self.trainable.model)
            was_training = model.training
            model.eval()
            try:
                out |= eval_diagnostics(model, batch.rollouts, self.cfg.model.num_experts)
            finally:
                model.train(was_training)
        return bench | out

    def save(self, state: LoopState):
        extra = loop_extra(state)
        if self.vp2o is not None:
            extra |= {"vp2o_counters": dict(self.vp2o.counters)}
        meta = {"config": to_dict(self.cfg), "kind": "rl", "world_size": self.layout.world}
        save_checkpoint(self.ckpt_root, state.step, self.trainable, meta, extra=extra,
                        rank_state=loop_rank_state(state))

    def restore_loop_state(self, state: LoopState) -> LoopState:
        if self.resume_from is None:
            return state
        require_loop_state(self.resume_from, self.resumed_extra)  # the pre-flight cannot read 0.19's common state
        restore_loop(state, self.resumed_extra, load_rank_state(self.resume_from) or {})
        if state.buffer is not None:
            self.batches = self.make_batches(state.buffer)
        return state

    def close(self):
        if hasattr(self.engine, "close"):
            self.engine.close()
        self.progress.close()
        self.logger.close()

    def track(self, metrics: dict) -> None:
        """Keep what the summary reports over the run: the step's Stein relative change
        ||transported - raw|| / ||raw||, averaged over the MoE layers (absent on GRPO steps)."""
        changes = [v for k, v in metrics.items() if k.startswith("stein/rel_change/")]
        if changes:
            self.stein_changes.append(sum(changes) / len(changes))

    def summary(self, first: dict, last: dict, state: LoopState, seconds: float) -> dict:
        out = {"algo": self.cfg.rl.algo, "steps": state.step, "refreshes": state.refreshes,
               "rollout samples": state.samples,
               "skipped_steps": state.skipped, "seconds": seconds,
               "layout": f"dp={self.layout.dp} tp={self.layout.tp} pp={self.layout.pp} ep={self.layout.ep}"}
        if self.stein_changes:
            out["stein relative change (mean)"] = sum(self.stein_changes) / len(self.stein_changes)
        for key in ("eval/mean", "eval/pass_at_1", "eval/distinct_correct"):
            if key in first:
                out[f"{key} (start)"] = first[key]
            if key in last:
                out[f"{key} (end)"] = last[key]
        return out


def build_session(cfg, out_dir: Path, resume: bool, evaluate: Evaluate | None = None) -> Session:
    """Load the inputs (checked by the pre-flight), start the process groups, build the model (loading
    the policy, or the newest checkpoint with ``resume``), the learner, the actors' engine and the sinks."""
    out_dir = Path(out_dir)
    tokenizer, prompts, eval_prompts = load_inputs(cfg)
    ckpt_root = Path(cfg.checkpoint.dir or out_dir / "checkpoints")
    resume_from = latest_checkpoint(ckpt_root) if resume and ckpt_root.exists() else None
    layout = init_parallel(cfg, sft_batch=False)
    # vp2o.enabled=false: plain megatron layers and steps with the configured (unclipped) loss
    vp2o_cfg = vp2o_knobs(cfg) if cfg.rl.algo == "vp2o" and cfg.vp2o.enabled else None
    trainable, extra = _build_trainable(cfg, vp2o_cfg, resume_from)
    forward_step = partial(policy_forward_step, cfg=cfg.rl, vocab_size=tokenizer.vocab_size)
    if vp2o_cfg is None:
        learner = GRPOLearner(trainable, cfg.rl, forward_step)
    else:
        from megatron_vp2o.rl.learner.vp2o import init_vp2o

        state = init_vp2o(trainable, vp2o_cfg, layout.sequence_parallel, init_prototypes=resume_from is None)
        state.counters.update(extra.get("vp2o_counters", {}))
        learner = VP2OLearner(trainable, state, forward_step, loop=cfg.rl.loop,
                              group_size=cfg.rl.policy_loss.group_size, anchor_budget=cfg.rl.ablate.anchor_budget,
                              loss_grad_every=cfg.logging.loss_grad_every)
    engine = _build_engine(cfg, unwrap(trainable.model), tokenizer)
    ref_model = _build_reference(cfg)
    start = extra.get("step", 0)
    logger = MetricsLogger(out_dir, cfg.logging, to_dict(cfg), resume_step=start)
    progress = Progress(cfg.rl.steps, f"vp2o train ({cfg.rl.algo})", cfg.logging.progress, start=start)
    return Session(cfg, out_dir, tokenizer, prompts, eval_prompts, layout, trainable, learner, engine, ref_model,
                   logger, progress, ckpt_root, resume_from, extra, evaluate_benchmarks=evaluate)


def _build_engine(cfg, model, tokenizer):
    """The actors' engine (``rl.engine``): megatron's own decoding on the learner's module, or vLLM
    in this process, refreshed from the learner before every rollout batch (streamed weight sync),
    whose behaviour log-probs and routing come from one learner forward over its samples."""
    from megatron_vp2o.generation import MegatronEngine

    if cfg.rl.engine == "megatron":
        return MegatronEngine(model, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    from megatron_vp2o.generation.vllm_engine import SyncedEngine, VLLMEngine
    from megatron_vp2o.generation.weight_sync import WeightSync

    engine = VLLMEngine(cfg.model, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size, config=cfg.rl.vllm,
                        seed=cfg.train.seed)
    return SyncedEngine(engine, WeightSync(engine, [model], cfg), model)


def _build_trainable(cfg, vp2o_cfg, resume_from):
    """The trainable (VP2O MoE layers when ``vp2o_cfg``, else megatron's with the response-masked aux
    losses: both algorithms' router aux losses see the response tokens only; ``rl.<algo>.lr`` or
    ``rl.lr`` as a constant rate), loaded from ``resume_from`` or else from the policy checkpoint;
    (trainable, the checkpoint's extra)."""
    from megatron_vp2o.moe.layer import ResponseMaskedMoELayer, vp2o_moe_layer

    layer_cls = ResponseMaskedMoELayer if vp2o_cfg is None else vp2o_moe_layer(vp2o_cfg.specialization)
    lr = cfg.rl.resolved_lr
    train_cfg = cfg if lr is None else dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, lr=lr, min_lr=lr, warmup_steps=0, steps=cfg.rl.steps))
    trainable = build_trainable(train_cfg, moe_layer_cls=layer_cls)
    if resume_from is not None:
        return trainable, load_checkpoint(resume_from, trainable)["extra"]
    load_model(cfg.rl.policy_path(cfg.checkpoint.load), trainable.models)
    trainable.optimizer.reload_model_params()
    return trainable, {}


def _build_reference(cfg):
    """A frozen copy of the initial policy (plain MoE layers) for the KL penalty, or None."""
    if cfg.rl.policy_loss.kl_coef == 0.0:
        return None
    from megatron_vp2o.model import build_gpt, transformer_config

    ref = build_gpt(cfg.model, transformer_config(cfg.model, cfg.parallel))
    load_model(cfg.rl.policy_path(cfg.checkpoint.load), [ref])
    ref.eval()
    for param in ref.parameters():
        param.requires_grad_(False)
    return ref
