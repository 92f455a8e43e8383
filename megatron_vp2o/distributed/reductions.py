"""Every cross-rank reduction VP2O needs, with the process groups passed in (CONTRIBUTING.md §4).

What (method §2.4, 2.5, 2.8, 2.10-2.12):
- co-activation counts: summed over the ranks that hold other tokens of the same layer: data x
  context parallel, and tensor parallel when sequence parallel splits the tokens (method §2.5);
- prototypes: power step z = W (W^T u) on the local F shard, all-reduced over expert-TP, normalised,
  then all-gathered over EP so every rank holds all E prototypes of its layers (method §2.4);
- full expert gradients: with the distributed optimizer the expert gradient buckets hold only this
  rank's reduce-scattered shard; `gather_expert_grads` all-gathers them over the expert-DP group
  (the same layout megatron uses for its parameter all-gather), so the Stein hook sees full grads;
- scalars for decisions (D_anc, D_beh, ESS, non-finite flags): summed over the whole world, which
  includes every pipeline stage, so accept/backtrack/reject/refresh is one identical decision.
Why here: `algo` stays pure; this is the only module that knows which group sums what.

Shape legend: E experts, X local experts, D hidden, F expert ffn shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_vp2o.algo.prototypes import normalize, power_step_partial, start_vectors


@dataclass
class VP2OGroups:
    """Process groups of one rank (None = a group of one)."""

    tokens: list  # groups whose ranks hold other tokens of the same layers (dp x cp, tp if SP)
    expert_tp: object  # expert-TP group (fc2 split along F)
    expert_ep: object  # expert-parallel group (experts split across it)
    expert_dp: object  # expert data-parallel group (replicas of the same experts)
    world: object = None  # every rank (all pipeline stages)

    @classmethod
    def from_parallel_state(cls, sequence_parallel: bool) -> "VP2OGroups":
        from megatron.core import parallel_state as ps

        tokens = [ps.get_data_parallel_group(with_context_parallel=True)]
        if sequence_parallel:
            tokens.append(ps.get_tensor_model_parallel_group())
        return cls(tokens, ps.get_expert_tensor_parallel_group(), ps.get_expert_model_parallel_group(),
                   ps.get_expert_data_parallel_group(), None)


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def all_reduce_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over ``group`` (skipped for a group of one)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def reduce_counts_(counts_EE: torch.Tensor, groups: VP2OGroups) -> torch.Tensor:
    """Co-activation counts summed over every token-holding group (method §2.5), in place."""
    for group in groups.tokens:
        all_reduce_(counts_EE, group)
    return counts_EE


def gather_experts(local_XD: torch.Tensor, ep_group) -> torch.Tensor:
    """[X, ...] per EP rank -> [E, ...] in global expert order (a new tensor)."""
    return gather_experts_batched(local_XD.unsqueeze(0), ep_group)[0].clone()


def power_refresh(weight_XDF: torch.Tensor, protos_XD: torch.Tensor, steps: int,
                  groups: VP2OGroups) -> torch.Tensor:
    """``steps`` warm-started power steps with the expert-TP all-reduce of z (method §2.4): [X, D]."""
    u_XD = protos_XD.to(weight_XDF.dtype)
    for _ in range(steps):
        z_XD = all_reduce_(power_step_partial(weight_XDF, u_XD), groups.expert_tp)
        u_XD = normalize(z_XD, fallback_ED=u_XD)
    return u_XD.to(protos_XD.dtype)


def refresh_prototypes(layers, groups: VP2OGroups, steps: int, from_start: bool = False) -> None:
    """Update every layer's ``protos_XD`` in place and all-gather ``protos_ED`` over EP.

    ``from_start``: initialise from the deterministic start vector (30 steps at init, method §2.4).
    Each layer's power iteration runs on an fp32 copy of that layer's fc2 weights only (memory:
    one layer's experts, not the stage's); layers of equal shapes (usually all) share one EP
    all-gather of their prototypes.
    """
    batches: dict = {}
    for layer in layers:
        batches.setdefault((tuple(layer.protos_XD.shape), tuple(layer.protos_ED.shape)), []).append(layer)
    with torch.no_grad():
        for batch in batches.values():
            num_local, hidden = batch[0].protos_XD.shape
            for layer in batch:
                weight_1XDF = layer.accessor.fc2_weight_XDF().float().unsqueeze(0)
                start_1XD = (start_vectors(num_local, hidden, device=weight_1XDF.device) if from_start
                             else layer.protos_XD).unsqueeze(0)
                protos_XD = power_refresh(weight_1XDF, start_1XD, steps, groups)[0]
                del weight_1XDF
                layer.protos_XD.copy_(protos_XD.to(layer.protos_XD.dtype))
            protos_LED = gather_experts_batched(torch.stack([layer.protos_XD for layer in batch]), groups.expert_ep)
            torch._foreach_copy_([layer.protos_ED for layer in batch], list(protos_LED.unbind(0)))


def gather_experts_batched(local_LX: torch.Tensor, ep_group) -> torch.Tensor:
    """[L, X, ...] per EP rank -> [L, E, ...] in global expert order (one all-gather; at EP=1 the
    input itself)."""
    num_ranks = group_size(ep_group)
    if num_ranks == 1:
        return local_LX
    num_layers, num_local, *rest = local_LX.shape
    out = local_LX.new_empty(num_ranks * num_layers, num_local, *rest)
    dist.all_gather_into_tensor(out, local_LX.contiguous(), group=ep_group)
    return out.view(num_ranks, num_layers, num_local, *rest).transpose(0, 1).reshape(
        num_layers, num_ranks * num_local, *rest)


def gather_expert_grads(ddp_model) -> int:
    """Make every expert gradient bucket hold the full reduced gradient; returns bytes gathered.

    With the distributed optimizer megatron reduce-scatters each bucket's ``grad_data`` over the
    bucket group's (expert-)DP group, leaving only this rank's shard reduced. We all-gather the
    shards back into place (the inverse of megatron's ``shard_buffer`` split). With all-reduce
    (no distributed optimizer) the buffers are already full: nothing to do.
    """
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    moved = 0
    for group in ddp_model.expert_parallel_bucket_groups:
        if not group.ddp_config.use_distributed_optimizer:
            continue
        size = group.intra_distributed_optimizer_instance_size
        if size == 1:
            continue
        rank, pg = group.intra_distributed_optimizer_instance_rank, group.intra_distributed_optimizer_instance_group
        for bucket in group.buckets:
            shard = shard_buffer(bucket.grad_data, size)[rank].clone()
            dist.all_gather_into_tensor(bucket.grad_data, shard, group=pg)
            moved += shard.numel() * shard.element_size() * (size - 1)
    return moved


def world_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small statistics vector over every rank (all pipeline stages), out of place."""
    out = values.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out
