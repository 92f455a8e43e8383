"""Learner micro-batches built from a rollout buffer.

A :class:`RLBatch` carries one micro-batch of teacher-forced sequences in megatron's GPTModel
conventions (tokens, labels, the rollout's positions and attention mask) plus what the policy loss
needs aligned to the same S columns: the behaviour log-probs ``logp_old_BS`` (0 off the response),
the sequence advantages ``adv_B`` and, with a KL penalty, the reference log-probs.
With sequence parallelism the columns are padded to a multiple of TP (padding is masked out).

Engine-mismatch correction (``rl.engine_is_cap``, docs/vllm.md): with a cap, the advantages become per
token, ``adv_BS = adv_B * w_BS`` with the truncated importance weight
``w = min(exp(logp_behaviour - logp_engine), cap)`` on the response columns (1 elsewhere) -- verl / slime's
TIS. The engine's log-probs travel in the buffer's rollouts (``Rollouts.engine_logp_BT``); the megatron
engine's are the behaviour log-probs themselves, so its weights are exactly 1 and the loss is bit-identical
to ``rl.engine_is_cap=null``.

Shape legend: B sequences, S columns (prompt + response - 1), T response tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_vp2o.device import device
from megatron_vp2o.generation.rollouts import Rollouts, attention_mask
from megatron_vp2o.generation.vllm_engine import truncated_is_weight


@dataclass
class RLBatch:
    tokens: torch.Tensor  # [B, S] input ids
    labels: torch.Tensor  # [B, S] next tokens
    positions: torch.Tensor  # [B, S] the rollout's positions
    attention_mask: torch.Tensor  # [B, 1, S, S] bool, True = masked
    loss_mask: torch.Tensor  # [B, S] 1.0 where the label is a generated response token
    logp_old: torch.Tensor  # [B, S] behaviour log-probs at the loss columns
    adv: torch.Tensor  # [B] advantages, or [B, S] per token (rl.engine_is_cap: times the truncated IS weight)
    logp_ref: torch.Tensor | None = None  # [B, S] reference log-probs (KL penalty)
    aggregation: str = "seq_mean_token_mean"  # how the policy loss averages (sets loss_count)

    @property
    def loss_count(self) -> torch.Tensor:
        """What megatron divides this micro-batch's loss sum by (sequences or tokens)."""
        from megatron_vp2o.algo.grpo import aggregation_count

        return aggregation_count(self.loss_mask, self.aggregation)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "RLBatch":
        moved = {f.name: (v.to(device) if torch.is_tensor(v) else v)
                 for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        return RLBatch(**moved)


def _to_columns(values_BT: torch.Tensor, rollouts: Rollouts, num_cols: int) -> torch.Tensor:
    out_BS = torch.zeros(values_BT.shape[0], num_cols, dtype=torch.float32, device=values_BT.device)
    out_BS[:, rollouts.response_cols] = values_BT.float()
    return out_BS


def engine_is_weights(rollouts: Rollouts, cap: float) -> torch.Tensor:
    """``w_BT = min(exp(logp_BT - engine_logp), cap)`` on the response tokens, 1 off them (module doc)."""
    w_BT = truncated_is_weight(rollouts.engine_logp, rollouts.logp_BT, cap)
    return torch.where(rollouts.response_mask_BT > 0, w_BT, torch.ones_like(w_BT))


def engine_is_metrics(rollouts: Rollouts, cap: float | None) -> dict:
    """``rollout/is_weight_mean`` (mean truncated weight over response tokens) and ``rollout/is_capped_frac``
    (share of response tokens whose weight hit the cap), over all ranks; {} without a cap. Ranks that hold
    the same rollouts (TP / PP) count them alike in numerator and denominator, so the ratios are exact."""
    if cap is None:
        return {}
    mask_BT = rollouts.response_mask_BT > 0
    raw_BT = torch.exp(rollouts.logp_BT.detach() - rollouts.engine_logp.detach())
    w_BT = raw_BT.clamp(max=cap)
    sums = torch.stack([w_BT[mask_BT].double().sum(), (raw_BT > cap)[mask_BT].double().sum(),
                        mask_BT.double().sum()]).to(device())  # all-reduced (NCCL: on the device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    total, capped, tokens = sums.tolist()  # deliberate host read: one transfer per rollout batch
    return {"rollout/is_weight_mean": total / max(tokens, 1.0), "rollout/is_capped_frac": capped / max(tokens, 1.0)}


def make_batches(rollouts: Rollouts, adv_B: torch.Tensor, micro_batch_size: int, pad_to: int = 1,
                 logp_ref_BT: torch.Tensor | None = None, aggregation: str = "seq_mean_token_mean",
                 engine_is_cap: float | None = None) -> list[RLBatch]:
    """Split the buffer into micro-batches (columns padded to a multiple of ``pad_to``). ``engine_is_cap``:
    per-token advantages ``adv_B * min(exp(logp_BT - engine_logp), cap)`` ``[B, S]`` (module doc); None:
    ``adv_B`` as is."""
    tf = rollouts.training_input()
    s = tf.tokens_BS.shape[1]
    extra = (-s) % pad_to
    tokens, labels, pos = tf.tokens_BS, tf.labels_BS, tf.positions_BS
    mask, loss_mask = tf.attention_mask_B1SS, tf.loss_mask_BS
    if extra:
        pad = lambda t, v: torch.cat([t, t.new_full((t.shape[0], extra), v)], dim=1)  # noqa: E731
        tokens, labels, loss_mask = pad(tokens, rollouts.pad_id), pad(labels, rollouts.pad_id), pad(loss_mask, 0)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, extra + 1, device=pos.device)], dim=1)
        mask = attention_mask(rollouts.pads_B, s + extra, s + extra)
    logp_old = _to_columns(rollouts.logp_BT, rollouts, s + extra)
    logp_ref = _to_columns(logp_ref_BT, rollouts, s + extra) if logp_ref_BT is not None else None
    adv = adv_B.float()
    if engine_is_cap is not None:
        w_BS = torch.ones(adv.shape[0], s + extra, dtype=torch.float32, device=adv.device)
        w_BS[:, rollouts.response_cols] = engine_is_weights(rollouts, engine_is_cap).float().to(adv.device)
        adv = adv.unsqueeze(-1) * w_BS  # [B, S]
    out = []
    for idx in torch.arange(tokens.shape[0], device=tokens.device).split(micro_batch_size):
        out.append(RLBatch(tokens[idx], labels[idx], pos[idx], mask[idx], loss_mask[idx], logp_old[idx],
                           adv[idx], None if logp_ref is None else logp_ref[idx], aggregation))
    return out


def _cat(batches: list[RLBatch]) -> RLBatch:
    fields = {}
    for f in dataclasses.fields(RLBatch):
        values = [getattr(b, f.name) for b in batches]
        fields[f.name] = torch.cat(values) if torch.is_tensor(values[0]) else values[0]
    return RLBatch(**fields)


def _rows(batch: RLBatch, idx: torch.Tensor) -> RLBatch:
    return RLBatch(**{f.name: (v[idx] if torch.is_tensor(v) else v)
                      for f in dataclasses.fields(batch) for v in [getattr(batch, f.name)]})


def mini_batches(micro_batches: list[RLBatch], num: int, group: int) -> list[list[RLBatch]]:
    """The buffer's sequences (this rank's micro-batches, in order) as ``num`` mini-batches of whole
    prompt groups (``group`` sequences each), each split into micro-batches of the original size:
    one optimizer step per mini-batch (``rl.grpo.mini_batches`` / ``rl.vp2o.mini_batches``)."""
    full = _cat(micro_batches)
    n = len(full)
    if n % group or (n // group) % num:
        raise ValueError(f"rl.<algo>.mini_batches={num} must divide the {n // group} prompt groups of this rank's "
                         "rollout batch (set rl.prompts_per_step to a multiple of mini_batches x "
                         "data-parallel size)")
    micro = len(micro_batches[0])
    rows = torch.arange(n, device=full.tokens.device).split(n // num)
    return [[_rows(full, idx) for idx in mini.split(micro)] for mini in rows]
