"""Everything one RL run holds: checked inputs, the megatron stack, the actors' engine, VP2O state,
sinks, checkpoints. :mod:`megatron_vp2o.rl.trainer` drives it; this module owns set-up and IO.

Checks before any work starts (each error names the field and the fix): the layout, the tokenizer,
the prompt set (exists, parses, non-empty), the policy checkpoint (``checkpoint.load``), group size.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_vp2o.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from megatron_vp2o.checkpoint.dist import load_rank_state
from megatron_vp2o.config import ConfigError, check_layout, to_dict
from megatron_vp2o.data.tokenizer import load_tokenizer
from megatron_vp2o.distributed.init import init_parallel, world_size_from_env
from megatron_vp2o.eval.runner import evaluate_rl, rl_benchmarks
from megatron_vp2o.monitor import MetricsLogger, Progress
from megatron_vp2o.rl.actor import act, reward_metrics
from megatron_vp2o.rl.batches import make_batches, mini_batches
from megatron_vp2o.rl.learner import behaviour_stats, grads_finite, policy_forward_step, unwrap
from megatron_vp2o.generation.prompts import load_prompt_file
from megatron_vp2o.training.setup import build_trainable
from megatron_vp2o.training.step import train_step

EVAL_SEED = 1_000_003


def check_inputs(cfg):
    check_layout(cfg, world_size_from_env())
    rl = cfg.rl
    if rl.algo == "vp2o" and cfg.vp2o.trust_region.ess_level != "sequence":
        raise ConfigError("vp2o.trust_region.ess_level=token is not supported by `vp2o train`; use sequence")
    tok = load_tokenizer(cfg.data.tokenizer)
    prompts = load_prompt_file(rl.prompts, "rl.prompts")
    evals = load_prompt_file(rl.eval_prompts, "rl.eval_prompts") if rl.eval_prompts else []
    rl_benchmarks(rl.eval)  # rl.eval files exist and parse (eval/runner.py)
    policy = rl.policy_path(cfg.checkpoint.load)
    if policy is None:
        raise ConfigError("rl.policy must point at the initial policy checkpoint (e.g. the shipped "
                          "checkpoints/tiny_policy, or a converted HF model: `vp2o convert hf-to-mcore`)")
    if latest_checkpoint(policy) is None:
        raise ConfigError(f"rl.policy: no complete checkpoint at '{policy}' (a megatron dist checkpoint "
                          "directory written by `vp2o sft` or `vp2o convert`)")
    return tok, prompts, evals


def vp2o_knobs(cfg):
    """cfg.vp2o with the rl.ablate switches applied."""
    ab, v = cfg.rl.ablate, cfg.vp2o
    stein = dataclasses.replace(v.stein, coact_topm=v.stein.coact_topm if ab.stein else 0,
                                repulsion_coef=v.stein.repulsion_coef if ab.repulsion else 0.0)
    spec = v.specialization if ab.specialization else dataclasses.replace(v.specialization, ortho_coef=0.0,
                                                                           var_coef=0.0)
    return dataclasses.replace(v, stein=stein, specialization=spec)


def _namespaced(out: dict, prefix: str) -> dict:
    keep = ("loss", "skipped", "skip_reason")
    return {(k if "/" in k or k in keep else f"{prefix}/{k}"): v for k, v in out.items()}


class Session:
    @classmethod
    def start(cls, cfg, out_dir: Path, resume: bool):
        self = cls()
        self.cfg, self.out_dir = cfg, out_dir
        self.tokenizer, self.prompts, self.eval_prompts = check_inputs(cfg)
        self.ckpt_root = Path(cfg.checkpoint.dir or out_dir / "checkpoints")
        self.resume_from = latest_checkpoint(self.ckpt_root) if resume and self.ckpt_root.exists() else None
        self.layout = init_parallel(cfg)
        self._build()
        return self

    def _build(self):
        cfg = self.cfg
        # vp2o.enabled=false: plain megatron layers and steps with the configured (unclipped) loss
        self.vp2o_cfg = vp2o_knobs(cfg) if cfg.rl.algo == "vp2o" and cfg.vp2o.enabled else None
        layer_cls = MoELayer
        if self.vp2o_cfg is not None:
            from megatron_vp2o.moe.layer import vp2o_moe_layer

            layer_cls = vp2o_moe_layer(self.vp2o_cfg.specialization)
        train_cfg = cfg if cfg.rl.lr is None else dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, lr=cfg.rl.lr, min_lr=cfg.rl.lr, warmup_steps=0, steps=cfg.rl.steps))
        self.trainable = build_trainable(train_cfg, moe_layer_cls=layer_cls)
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_to = ps.get_tensor_model_parallel_world_size() if self.layout.sequence_parallel else 1
        self.ess_temper = cfg.vp2o.trust_region.resolved_ess_temper()
        self.loop_extra, self.vp2o = {}, None
        if self.resume_from is not None:
            meta = load_checkpoint(self.resume_from, self.trainable)
            self.loop_extra = meta["extra"]
        else:
            load_model(cfg.rl.policy_path(cfg.checkpoint.load), self.trainable.models)
            self.trainable.optimizer.reload_model_params()
        if self.vp2o_cfg is not None:
            from megatron_vp2o.training.vp2o_step import init_vp2o

            self.vp2o = init_vp2o(self.trainable, self.vp2o_cfg, self.layout.sequence_parallel,
                                  init_prototypes=self.resume_from is None)
            self.vp2o.counters.update(self.loop_extra.get("vp2o_counters", {}))
        from megatron_vp2o.generation import MegatronEngine

        self.engine = MegatronEngine(unwrap(self.trainable.model), pad_id=self.tokenizer.pad_id,
                                     vocab_size=self.vocab_size)
        self.ref_model = self._build_reference()
        self.forward_step = partial(policy_forward_step, cfg=cfg.rl, vocab_size=self.vocab_size)
        self.batches = []
        start = self.loop_extra.get("step", 0)
        self.logger = MetricsLogger(self.out_dir, cfg.logging, to_dict(cfg), resume_step=start)
        self.progress = Progress(cfg.rl.steps, f"vp2o train ({cfg.rl.algo})", cfg.logging.progress, start=start)

    # ---- actors (the trainer's refresh phases) ---------------------------------------------
    def rollout(self, refresh_index: int):
        return act(self.engine, self.tokenizer, self.prompts, self.cfg, refresh_index, self.cfg.train.seed)

    def reward_metrics(self, batch) -> dict:
        """reward/* of a training batch, plus ``rollout/new_samples`` / ``rollout/new_tokens`` (all ranks)."""
        return reward_metrics(batch, self.cfg.rl.policy_loss.group_size)

    def set_buffer(self, batch):
        """Make ``batch`` the learner's buffer (reference log-probs, micro-batches); the anchors (vp2o)."""
        batch.logp_ref_BT = self.reference_logprobs(batch.rollouts)
        self.batches = self.make_batches(batch)
        return self.capture_anchors() if self.vp2o is not None else None

    # ---- learner -------------------------------------------------------------------------
    def make_batches(self, batch):
        return make_batches(batch.rollouts, batch.adv_B, self.cfg.rl.micro_batch_size, self.pad_to,
                            logp_ref_BT=batch.logp_ref_BT, aggregation=self.cfg.rl.policy_loss.aggregation)

    def behaviour_stats(self) -> dict:
        """D_beh and ESS of the current learner on the buffer (spec 2.11)."""
        return behaviour_stats(self.trainable, self.batches, self.cfg.rl, self.vocab_size, self.ess_temper)

    def learner_step(self, anchors) -> dict:
        return self.vp2o_step(anchors) if self.vp2o is not None else self.grpo_step()

    def _build_reference(self):
        """A frozen copy of the initial policy (plain MoE layers) for the KL penalty, or None."""
        if self.cfg.rl.policy_loss.kl_coef == 0.0:
            return None
        from megatron_vp2o.model import build_gpt, transformer_config

        ref = build_gpt(self.cfg.model, transformer_config(self.cfg.model, self.cfg.parallel))
        load_model(self.cfg.rl.policy_path(self.cfg.checkpoint.load), [ref])
        ref.eval()
        for param in ref.parameters():
            param.requires_grad_(False)
        return ref

    @torch.no_grad()
    def reference_logprobs(self, rollouts):
        """log pi_ref of the buffer's response tokens (the actors' log-prob definition), or None."""
        if self.ref_model is None:
            return None
        from megatron_vp2o.generation import teacher_forced_logprobs

        return teacher_forced_logprobs(self.ref_model, rollouts).logp_BT.detach()

    def capture_anchors(self):
        from megatron_vp2o.training.vp2o_step import capture_anchors

        return capture_anchors(self.trainable, self.batches, self.vp2o, forward_step=self.forward_step)

    def vp2o_step(self, anchors):
        from megatron_vp2o.training.vp2o_step import vp2o_train_step

        out = vp2o_train_step(self.trainable, self.batches, self.vp2o, forward_step=self.forward_step,
                              anchors=anchors, guard=grads_finite)
        out.pop("d_anc_trace", None)
        return _namespaced(out, "vp2o")

    def grpo_step(self) -> dict:
        """``rl.epochs`` passes of ``rl.mini_batches`` optimizer steps over the buffer (whole prompt
        groups per mini-batch, buffer order; the loss normalised per mini-batch), as verl/TRL/NeMo-RL
        run GRPO. Logs the averages over those steps of the clip fraction and the ratio pi/mu, and
        the skipped count (a non-finite loss or gradient skips that optimizer step only)."""
        rl = self.cfg.rl
        minis = mini_batches(self.batches, rl.mini_batches, rl.policy_loss.group_size)
        keys = ("clip_frac", "ratio_mean", "kl_ref")
        outs = [train_step(self.trainable, mb, self.forward_step, guard=grads_finite, report_keys=keys)
                for _ in range(rl.epochs) for mb in minis]
        done = [o for o in outs if not o.get("skipped")] or outs
        out = {k: sum(o[k] for o in done) / len(done) for k in ("loss", *keys) if all(k in o for o in done)}
        out |= {k: v for k, v in done[-1].items() if k.startswith("timing/") or k in ("lr", "grad_norm")}
        out |= {"grpo/clip_fraction": out.pop("clip_frac", float("nan")),
                "grpo/ratio_mean": out.pop("ratio_mean", float("nan")), "grpo/optimizer_steps": len(outs)}
        skipped = sum(1 for o in outs if o.get("skipped"))
        if skipped == len(outs):
            out |= {"skipped": True, "skip_reason": outs[0].get("skip_reason")}
        out["grpo/skipped_minibatches"] = skipped
        return _namespaced(out, "learner")

    # ---- evaluation, checkpoints, summary ----------------------------------------------------
    def evaluate(self, prefix: str) -> dict:
        bench = evaluate_rl(self, prefix)  # rl.eval benchmarks: eval/<benchmark>/<metric>
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

    def save(self, state):
        extra = {"step": state.step, "refreshes": state.refreshes, "steps_since_refresh": state.steps_since_refresh,
                 "next_refresh": state.next_refresh, "forced": state.forced, "anchor_failed": state.anchor_failed,
                 "skipped": state.skipped, "samples": state.samples, "tokens": state.tokens,
                 "elapsed_s": state.elapsed_s}
        if self.vp2o is not None:
            extra |= {"vp2o_counters": dict(self.vp2o.counters)}
        rank_state = {"buffer": state.buffer, "anchors": state.anchors}
        meta = {"config": to_dict(self.cfg), "kind": "rl", "world_size": self.layout.world}
        save_checkpoint(self.ckpt_root, state.step, self.trainable, meta, extra=extra, rank_state=rank_state)

    def restore_loop_state(self, state):
        if self.resume_from is None:
            return state
        ex = self.loop_extra
        state.step, state.refreshes, state.skipped = ex["step"], ex["refreshes"], ex["skipped"]
        state.steps_since_refresh, state.next_refresh = ex["steps_since_refresh"], ex["next_refresh"]
        state.forced, state.anchor_failed = ex["forced"], ex["anchor_failed"]
        state.samples, state.tokens, state.elapsed_s = ex["samples"], ex["tokens"], ex["elapsed_s"]
        saved = load_rank_state(self.resume_from) or {}
        state.buffer, state.anchors = saved.get("buffer"), saved.get("anchors")
        if state.buffer is not None:
            self.batches = self.make_batches(state.buffer)
        return state

    def close(self):
        self.progress.close()
        self.logger.close()

    def summary(self, first: dict, last: dict, state, seconds: float) -> dict:
        out = {"algo": self.cfg.rl.algo, "steps": state.step, "refreshes": state.refreshes,
               "rollout samples": state.samples,
               "skipped_steps": state.skipped, "seconds": seconds,
               "layout": f"dp={self.layout.dp} tp={self.layout.tp} pp={self.layout.pp} ep={self.layout.ep}"}
        for key in ("eval/mean", "eval/pass_at_1", "eval/distinct_correct"):
            if key in first:
                out[f"{key} (start)"] = first[key]
            if key in last:
                out[f"{key} (end)"] = last[key]
        return out
