"""The full model's Hugging Face tensors, streamed from a megatron model in any TP/PP/EP layout.

What: :func:`hf_tensors` yields ``(hf_name, tensor)`` for every HF tensor of the whole model, on every
rank, from this rank's model chunks: each parameter's full tensor is rebuilt over tensor parallelism
(attention/embedding shards, all-gathered), expert tensor parallelism (gate and up shards gathered
separately) and expert parallelism (every EP rank's local experts, named by global index), then turned
into HF tensors by :func:`mapping.hf_from_mcore` -- the one mapping ``vp2o convert`` uses; pipeline
stages take turns, each stage's tensors broadcast over the pipeline group. :func:`buckets` groups the
stream into lists of at most ``bucket_bytes`` (a tensor larger than that travels alone).
Why: a rollout engine's weight refresh (generation/weight_sync.py) and the HF export
(checkpoint/convert_hf.py, TP=PP=EP=1 there) share this code, so the engine always holds exactly the
tensors a converted checkpoint would hold. Memory: one parameter's full tensor (plus the bucket the
caller holds); at TP=PP=EP=1 the tensors are views of the parameters (no copy).

Every rank of a world must iterate the stream to the end together (the gathers are collectives).
Shape legend: El local experts, H hidden, I expert ffn width, T a TP/ETP size.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_vp2o.checkpoint.hf import keys, mapping
from megatron_vp2o.checkpoint.hf.archs import Arch

# TP split dimension of the non-expert parameters (the rest are replicated over TP)
_TP_DIM = {"embed": 0, "lm_head": 0, "qkv": 0, "o": 1}


def _size(group) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _gather_dim(t: torch.Tensor, dim: int, group, glu: bool = False) -> torch.Tensor:
    """The full tensor from TP shards along ``dim``; ``glu``: each shard is [gate shard; up shard]."""
    if _size(group) == 1:
        return t.detach()
    parts = _all_gather(t, group)
    if glu:
        halves = [keys.split_fc1(p) for p in parts]
        return keys.fuse_fc1(torch.cat([g for g, _ in halves], dim), torch.cat([u for _, u in halves], dim))
    return torch.cat(parts, dim)


class Groups:
    """The process groups the gathers run over (megatron's parallel state; all None without a world)."""

    def __init__(self, tp=None, etp=None, ep=None, pp=None):
        self.tp, self.etp, self.ep, self.pp = tp, etp, ep, pp

    @classmethod
    def from_parallel_state(cls) -> "Groups":
        from megatron.core import parallel_state as ps

        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            return cls()
        return cls(ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group(),
                   ps.get_expert_model_parallel_group(), ps.get_pipeline_model_parallel_group())


def _expert_tensors(slot: mapping.Slot, fc1: torch.Tensor | None, fc2: torch.Tensor | None, e_local: int,
                    n_local: int, sh: mapping.Shards, groups: Groups) -> Iterator[tuple[mapping.Slot, torch.Tensor]]:
    """(global slot, full tensor) of one local expert's fc1 or fc2, for every EP rank's copy of it."""
    t, kind = (fc1, "fc1") if fc1 is not None else (fc2, "fc2")
    full = _gather_dim(t, 0 if kind == "fc1" else 1, groups.etp, glu=kind == "fc1")
    ep_rank = dist.get_rank(groups.ep) if _size(groups.ep) > 1 else 0
    base = sh.expert_offset[slot.layer][0] - ep_rank * n_local  # global index of EP rank 0's first expert
    parts = _all_gather(full, groups.ep) if _size(groups.ep) > 1 else [full]
    for r, part in enumerate(parts):
        yield mapping.Slot(kind, sh.layer_offset[slot.layer], base + r * n_local + e_local), part


def _full_slots(name: str, param: torch.Tensor, params: dict, sh: mapping.Shards,
                groups: Groups) -> Iterator[tuple[mapping.Slot, torch.Tensor]]:
    """(slot with global layer/expert numbers, full tensor) for one local parameter."""
    slot = mapping.parse(name)
    layer = sh.layer_offset.get(slot.layer) if slot.layer is not None else None
    if slot.kind in ("fc1", "fc2"):
        n_local = len(sh.expert_offset[slot.layer])
        fc1, fc2 = (param, None) if slot.kind == "fc1" else (None, param)
        yield from _expert_tensors(slot, fc1, fc2, slot.expert, n_local, sh, groups)
    elif slot.kind in ("grouped1", "grouped2"):  # legacy GroupedMLP: unpack into per-expert fc1 / fc2
        other = params[name[:-1] + ("2" if slot.kind == "grouped1" else "1")]
        w1, w2 = (param, other) if slot.kind == "grouped1" else (other, param)
        n_local = len(sh.expert_offset[slot.layer])
        fc1s, fc2s = keys.unpack_grouped(w1.detach(), w2.detach(), n_local)
        for j in range(n_local):
            pair = (fc1s[j], None) if slot.kind == "grouped1" else (None, fc2s[j])
            yield from _expert_tensors(slot, *pair, j, n_local, sh, groups)
    elif slot.kind in _TP_DIM:
        yield mapping.Slot(slot.kind, layer), _gather_dim(param, _TP_DIM[slot.kind], groups.tp)
    else:
        yield mapping.Slot(slot.kind, layer), param.detach()


def _stage_tensors(chunks: list, shards: list[mapping.Shards], arch: Arch, vocab: int,
                   groups: Groups) -> Iterator[tuple[str, torch.Tensor]]:
    """This pipeline stage's HF tensors (all of its chunks)."""
    for chunk, sh in zip(chunks, shards):
        params = dict(chunk.named_parameters())
        for name, param in params.items():
            for slot, full in _full_slots(name, param, params, sh, groups):
                yield from mapping.hf_from_mcore(name, full, arch, sh, vocab, slot=slot)


def hf_tensors(chunks: list, shards: list[mapping.Shards], arch: Arch, vocab: int,
               groups: Groups | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the whole model on every rank (collective; see the module doc).

    ``chunks``: this rank's bare ``GPTModel`` chunks; ``shards``: :class:`mapping.Shards` of each
    (``convert_hf.shards_of``); ``vocab``: the real vocabulary (padding rows are cut)."""
    groups = groups or Groups()
    if _size(groups.pp) == 1:
        yield from _stage_tensors(chunks, shards, arch, vocab, groups)
        return
    stage, ranks = dist.get_rank(groups.pp), dist.get_process_group_ranks(groups.pp)
    local = _stage_tensors(chunks, shards, arch, vocab, groups)
    for src in range(len(ranks)):
        while True:  # stage ``src`` announces each tensor (name, shape, dtype; None at its end), then sends it
            item = next(local, None) if stage == src else None
            meta = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            dist.broadcast_object_list(meta, src=ranks[src], group=groups.pp)
            if meta[0] is None:
                break
            name, shape, dtype = meta[0]
            dev = next(chunks[0].parameters()).device
            buf = item[1].contiguous() if stage == src else torch.empty(shape, dtype=dtype, device=dev)
            dist.broadcast(buf, src=ranks[src], group=groups.pp)
            yield name, buf


def buckets(pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of ``pairs`` holding at most ``bucket_bytes`` each (an oversized tensor alone)."""
    bucket, held = [], 0
    for name, t in pairs:
        n = t.numel() * t.element_size()
        if bucket and held + n > bucket_bytes:
            yield bucket
            bucket, held = [], 0
        bucket.append((name, t))
        held += n
    if bucket:
        yield bucket
