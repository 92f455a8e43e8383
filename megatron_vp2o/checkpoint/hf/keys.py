"""Pure tensor layout functions between Hugging Face and megatron-core MoE weights.

Everything here takes and returns tensors (no files, no process groups), so every layout rule
is unit-tested on its own and the converters stay thin. Shape legend:

    H hidden size, E experts (El local to an EP rank), I expert ffn width, G query groups,
    Q query heads (Q/G per group), d head_dim, V vocabulary (Vp padded), T a TP/ETP size.

Layouts (measured against megatron-core 0.16.1 and transformers 5.x, see shared notes):

* QKV: megatron's fused ``linear_qkv`` [G*(Q/G+2)*d, H] groups rows per query group:
  [q heads of group g; k_g; v_g]. TP shards whole groups, so a contiguous dim-0 chunk is exact.
  (A plain [Q;K;V] concat gives logit errors of ~3.)
* fc1 = gate || up along rows ([2I, H]); with TP each rank holds [gate shard; up shard].
* SequentialMLP: ``local_experts.{j}.linear_fc1/2`` per local expert j = global e - ep_rank*El.
* GroupedMLP (legacy): ``weight1`` [H, El*2I/T] whose memory is El blocks of fc1_e.T [H, 2I/T]
  (megatron reads it as ``weight1.view(El, H, -1)``); ``weight2`` [El*I/T, H] = stacked fc2_e.T.
* Vocabulary rows are padded with zeros up to megatron's padded size and cut on export.
"""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[Q*d, H], [G*d, H], [G*d, H] -> megatron [G*(Q/G+2)*d, H] grouped per query group."""
    h = q.shape[-1]
    d = k.shape[0] // num_groups
    q_G = q.reshape(num_groups, -1, h)
    k_G = k.reshape(num_groups, d, h)
    v_G = v.reshape(num_groups, d, h)
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of :func:`fuse_qkv`: megatron ``linear_qkv`` -> (q, k, v)."""
    h = qkv.shape[-1]
    per = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (per + 2) * head_dim, h)
    q, k, v = torch.split(grouped, [per * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[I, H], [I, H] -> fc1 [2I, H] (gate rows first: megatron's GLU chunks fc1 output in two)."""
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor):
    """fc1 [2I, H] -> (gate [I, H], up [I, H])."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def shard(t: torch.Tensor, dim: int, rank: int, size: int, glu: bool = False) -> torch.Tensor:
    """This TP rank's slice of a full tensor along ``dim``; ``glu`` shards gate and up separately."""
    if size == 1:
        return t
    if glu:
        gate, up = split_fc1(t)
        return torch.cat([shard(gate, dim, rank, size), shard(up, dim, rank, size)], dim=0)
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split over {size} tensor-parallel ranks")
    return torch.chunk(t, size, dim=dim)[rank]


def pack_grouped(fc1_list: list[torch.Tensor], fc2_list: list[torch.Tensor]):
    """Per-expert (TP-local) fc1 [2I', H] and fc2 [H, I'] -> GroupedMLP (weight1 [H, El*2I'], weight2 [El*I', H])."""
    h = fc1_list[0].shape[1]
    w1_EHF = torch.stack([w.t() for w in fc1_list])
    w2_EFH = torch.stack([w.t() for w in fc2_list])
    return w1_EHF.contiguous().reshape(h, -1), w2_EFH.contiguous().reshape(-1, h)


def unpack_grouped(weight1: torch.Tensor, weight2: torch.Tensor, num_local: int):
    """Inverse of :func:`pack_grouped` (read as megatron's forward does: ``weight1.view(El, H, -1)``)."""
    h = weight1.shape[0]
    w1_EHF = weight1.reshape(num_local, h, -1)
    w2_EFH = weight2.reshape(num_local, -1, h)
    return [w.t().contiguous() for w in w1_EHF], [w.t().contiguous() for w in w2_EFH]


def pad_vocab(w_VH: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to megatron's padded vocabulary."""
    extra = padded - w_VH.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary {w_VH.shape[0]} is larger than the padded size {padded}")
    if extra == 0:
        return w_VH
    return torch.cat([w_VH, w_VH.new_zeros(extra, w_VH.shape[1])], dim=0)


def unpad_vocab(w_VpH: torch.Tensor, vocab: int) -> torch.Tensor:
    return w_VpH[:vocab]
