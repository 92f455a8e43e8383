"""What both learners share on megatron-core: the policy-gradient forward step, the behaviour
statistics of the refresh rule, the non-finite guard (the learners themselves: ``grpo``, ``vp2o``).

``policy_forward_step`` is a megatron ``forward_step_func``: it runs the model over an
:class:`~megatron_vp2o.rl.batches.RLBatch` at the rollout's positions and returns the logits with a
``loss_func`` that evaluates the registered policy loss (``algo.grpo.POLICY_LOSSES``) on the learner
log-probs. Log-probs use the actors' definition (``generation.sampling.sampling_logprobs``: tempered,
top-k/top-p filtered), so rho = pi/mu compares like with like; a label outside the learner's own
top-k/top-p set is scored with that set extended by the label (``sampling.token_logprobs``), so
its log-prob, the ratio and the drift stay finite.

Normalisation (CONTRIBUTING.md §9): the loss function returns the *sum* of the aggregation's terms and its
count (sequences for ``seq_mean_token_mean``, tokens for ``token_mean``); megatron sums both over
micro-batches and data-parallel ranks and divides the gradient once by the global count, so the
objective is the aggregation over the whole global batch.

Shape legend: B sequences, S columns, V vocabulary.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_vp2o.device import device
from megatron_vp2o.algo import diagnostics, grpo
from megatron_vp2o.algo import trust_region as tr
from megatron_vp2o.moe.layer import pg_probe_layers, probe_policy_gradient, response_tokens
from megatron_vp2o.generation.routing import rope_positions
from megatron_vp2o.generation.sampling import token_logprobs


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def learner_logprobs(logits_BSV: torch.Tensor, batch, sampling, vocab_size: int | None) -> torch.Tensor:
    """log pi of the labels under the actors' sampling definition; 0 off the loss columns."""
    full_BSV = gather_from_tensor_model_parallel_region(logits_BSV)
    logp_BS = token_logprobs(full_BSV.float(), batch.labels, sampling, vocab_size)
    return torch.where(batch.loss_mask > 0, logp_BS, torch.zeros_like(logp_BS))


def policy_loss_func(batch, cfg, vocab_size, logits_BSV, ratios=None, probes=()):
    """(sum of per-sequence/per-token loss terms, their count, report) for megatron's schedule.
    ``ratios``: a `recording_ratios` list the micro-batch's log-ratios are appended to; ``probes``:
    VP2O layers waiting for the policy-gradient term of the loss-gradient diagnostic."""
    logp_BS = learner_logprobs(logits_BSV, batch, cfg.sampling, vocab_size)
    if ratios is not None:
        record_ratios(ratios, logp_BS, batch.logp_old, batch.loss_mask)
    loss_fn = grpo.POLICY_LOSSES.get(cfg.loss_name)
    pl = cfg.policy_loss
    loss_sum, metrics = loss_fn(logp_BS, batch.logp_old, batch.adv, batch.loss_mask, clip_eps=cfg.clip_eps,
                                kl_coef=pl.kl_coef, logp_ref=batch.logp_ref, aggregation=pl.aggregation,
                                normalizer=1.0)
    if probes:  # before megatron's backward of this micro-batch (rl.learner.vp2o: loss-gradient diagnostic)
        probe_policy_gradient(probes, loss_sum)
    count = batch.loss_count
    tokens = batch.loss_mask.sum()
    report = {"lm loss": torch.stack([loss_sum.detach(), count.float()]),
              "clip_frac": torch.stack([metrics["clip_frac"] * tokens, tokens]),
              "ratio_mean": torch.stack([metrics["ratio_mean"] * tokens, tokens]),
              "kl_ref": torch.stack([metrics["kl_ref"] * tokens, tokens])}
    return loss_sum, count.to(torch.int), report


def policy_forward_step(data_iterator, model, cfg=None, vocab_size=None):
    """megatron forward step of the policy loss; VP2O layers count only the response tokens
    (``loss_mask``: method §2.5, 2.9, 2.10) in their statistics, losses and captures.

    Only a forward that trains (autograd on) records its log-ratios (`recording_ratios`): megatron
    calls ``loss_func`` in forward-only passes too, and VP2O's trust region runs this step forward-only
    after ``optimizer.step()`` (`rl.learner.vp2o.route_after_step`, once per attempt) to judge the new
    weights -- those are not loss micro-batches, and their ratios (new weights vs mu) are not the
    update's (issue 21: p99 1.067 / max 1.14 at the first update of the tiny recipe, where every
    loss micro-batch has pi == mu to 1e-6)."""
    batch = next(data_iterator).to(next(model.parameters()).device)
    with rope_positions(unwrap(model), batch.positions), response_tokens(unwrap(model), batch.loss_mask):
        out = model(batch.tokens, batch.positions, batch.attention_mask)
    module = unwrap(model)
    ratios = module.__dict__.get("_ratio_log") if torch.is_grad_enabled() else None
    return out, partial(policy_loss_func, batch, cfg, vocab_size, ratios=ratios, probes=pg_probe_layers(module))


# --- per-token likelihood ratios of an update (issue 21 item 1; docs/method.md §2.13) ----------------
def record_ratios(log: list, logp_BS, logp_old_BS, mask_BS) -> None:
    """Append one micro-batch's (log pi - log mu [N], counted [N]) (detached, fp32, flat: static shapes)."""
    logratio_N = (logp_BS.detach().float() - logp_old_BS.detach().float()).reshape(-1)
    log.append((logratio_N, (mask_BS > 0).reshape(-1)))


@contextmanager
def recording_ratios(models):
    """Within the block, every policy-loss micro-batch of ``models`` records its log-ratios into the
    yielded list (`ratio_stats` reads it)."""
    log: list = []
    modules = [unwrap(m) for m in models]
    for module in modules:
        module.__dict__["_ratio_log"] = log
    try:
        yield log
    finally:
        for module in modules:
            module.__dict__.pop("_ratio_log", None)


def ratio_stats(log: list, dev=None) -> dict:
    """``policy/ratio_{p50,p99,max}`` of pi/mu = exp(log pi - log mu) over the counted tokens of every
    recorded micro-batch (the training forwards of all optimizer steps of the update; not the
    forward-only passes: `policy_forward_step`): nearest-rank quantiles on this rank
    (`algo.diagnostics.ratio_quantiles`), then p50 and p99 averaged over the ranks that recorded
    tokens and the max taken over all ranks (two small all-reduces, no gather). Device tensors."""
    dev = dev if dev is not None else device()
    if log:
        lr_N, counted_N = torch.cat([x for x, _ in log]), torch.cat([c for _, c in log])
        q = diagnostics.ratio_quantiles(lr_N.unsqueeze(0), torch.zeros_like(lr_N).unsqueeze(0),
                                        counted_N.unsqueeze(0))
        has = counted_N.any().float()
        local = torch.stack([q["p50"] * has, q["p99"] * has, has]).to(dev)
        top = (q["max"] * has).reshape(1).to(dev)
    else:
        local, top = torch.zeros(3, device=dev), torch.zeros(1, device=dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(local)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    n = local[2].clamp_min(1.0)
    nan = torch.full((), float("nan"), device=dev)
    some = local[2] > 0
    return {"policy/ratio_p50": torch.where(some, local[0] / n, nan),
            "policy/ratio_p99": torch.where(some, local[1] / n, nan),
            "policy/ratio_max": torch.where(some, top[0], nan)}


@torch.no_grad()
def behaviour_stats(trainable, batches, cfg, vocab_size, ess_temper: float) -> dict:
    """D_beh (k3 drift) and sequence-level tempered ESS of the current learner against the buffer's
    behaviour log-probs (method §2.11), over all data-parallel ranks: one forward-only pass."""
    model = unwrap(trainable.model)
    model.eval()
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    device = next(model.parameters()).device
    drift_sum, drift_n, seq_lr = torch.zeros((), device=device), torch.zeros((), device=device), []
    for batch in (b.to(device) for b in batches):
        with rope_positions(model, batch.positions):
            out = _forward_only(trainable, batch)
        if last:
            logp = learner_logprobs(out, batch, cfg.sampling, vocab_size)
            mask = batch.loss_mask
            s, n = tr.behaviour_drift_sum(logp, batch.logp_old, mask)
            drift_sum, drift_n = drift_sum + s, drift_n + n
            seq_lr.append(tr.sequence_logratio(logp, batch.logp_old, mask))
    model.train()
    return _reduce_behaviour(drift_sum, drift_n, seq_lr, batches, ess_temper, last)


def _forward_only(trainable, batch):
    """Logits of one micro-batch through the pipeline (megatron's forward-only schedule)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = []

    def step(data_iterator, model):
        b = next(data_iterator)
        out = model(b.tokens, b.positions, b.attention_mask)
        return out, lambda o: (captured.append(o) or o.sum() * 0, {})

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=trainable.models,
                                num_microbatches=1, seq_length=batch.tokens.shape[1],
                                micro_batch_size=batch.tokens.shape[0], forward_only=True)
    return captured[0] if captured else None


def _reduce_behaviour(drift_sum, drift_n, seq_lr, batches, kappa, last) -> dict:
    """Sum the drift over ranks; gather every rank's sequence log-ratios for one global ESS.
    Ranks that are not (last stage, tp 0) contribute zeros, so each sequence counts once."""
    n_local = sum(len(b) for b in batches)
    lr_N = torch.cat(seq_lr)[:n_local].float() if seq_lr else torch.zeros(n_local, device=drift_sum.device)
    owner = last and ps.get_tensor_model_parallel_rank() == 0
    stats = torch.stack([drift_sum, drift_n]) * float(owner)
    dist.all_reduce(stats)
    world = dist.get_world_size()
    gathered = [torch.zeros_like(lr_N) for _ in range(world)]
    dist.all_gather(gathered, lr_N * float(owner))
    owners = torch.tensor([float(owner)], device=lr_N.device)
    owner_flags = [torch.zeros(1, device=lr_N.device) for _ in range(world)]
    dist.all_gather(owner_flags, owners)
    all_lr = torch.cat([g for g, f in zip(gathered, owner_flags) if f.item() > 0])
    drift = stats[0] / stats[1].clamp_min(1.0)
    return {"drift": drift, "ess": tr.tempered_ess(all_lr, kappa)}


def _grad_tensors(trainable) -> list:
    """Every local gradient as few tensors as possible: megatron DDP's contiguous grad buffers
    (dense and expert-parallel; the params' ``main_grad`` are views into them), else per param."""
    out = []
    for chunk in getattr(trainable, "models", [trainable.model]):
        # megatron DDP's buffer lists (on a plain module ``buffers`` is nn.Module's method: not a list)
        lists = [getattr(chunk, name, None) for name in ("buffers", "expert_parallel_buffers")]
        buffers = [b for found in lists if isinstance(found, list) for b in found]
        grads = [getattr(b, "grad_data", None) for b in buffers]
        if buffers and all(g is not None for g in grads):
            out += grads
            continue
        for param in unwrap(chunk).parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                out.append(grad)
    return out


def grads_finite(trainable) -> bool:
    """One device-side flag over every local gradient, MAX-reduced over all ranks: the single
    place where a non-finite loss or gradient is acted on (the step is then skipped). One sum per
    DDP grad buffer (not per parameter, no temporaries): a sum is non-finite iff some element is,
    or if it overflows fp32 -- only for gradients far past what Adam's g^2 (overflow at 1.8e19)
    could take anyway."""
    sums = [g.sum(dtype=torch.float32) for g in _grad_tensors(trainable)]
    bad = (~torch.isfinite(torch.stack(sums))).any().float().reshape(1) if sums else torch.zeros(1, device=device())
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
