"""Megatron parameter name <-> Hugging Face tensor names, for one rank's shard or the full model.

:func:`parse` turns a megatron-core ``GPTModel`` parameter name into a :class:`Slot` (what it is,
its pipeline-local layer and local expert index). Import (:func:`mcore_from_hf`) builds the
parameter's *local* tensor (this rank's PP stage, EP experts, TP/ETP shard) from HF tensors read
on demand; export (:func:`hf_from_mcore`) turns a full (TP=PP=EP=1) parameter into its HF
tensors. Only parameters are mapped: buffers (VP2O ``protos_XD`` prototypes, token counters) are never
exported and never required on import; an unknown *parameter* raises, so nothing is dropped
silently. Names covered (local and TE specs; SequentialMLP, GroupedMLP and TEGroupedMLP experts):

    embedding.word_embeddings.weight                  model.embed_tokens.weight (vocab padded)
    decoder.layers.i.input_layernorm.weight           model.layers.L.input_layernorm.weight
      (TE: self_attention.linear_qkv.layer_norm_weight)
    decoder.layers.i.self_attention.linear_qkv.weight q/k/v_proj fused per query group
    decoder.layers.i.self_attention.linear_proj.weight o_proj
    decoder.layers.i.self_attention.{q,k}_layernorm.weight  q_norm / k_norm (Qwen3)
    decoder.layers.i.pre_mlp_layernorm.weight         post_attention_layernorm
    decoder.layers.i.mlp.router.weight                <moe>.gate.weight
    decoder.layers.i.mlp.experts.local_experts.j.linear_fc{1,2}.weight   gate||up, down of expert e
    decoder.layers.i.mlp.experts.weight{1,2}          all local experts (GroupedMLP)
    decoder.layers.i.mlp.experts.linear_fc{1,2}.weight{j}                 (TEGroupedMLP)
    decoder.final_layernorm.weight                    model.norm.weight
    output_layer.weight                               lm_head.weight (embed_tokens when tied)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_vp2o.checkpoint.hf import keys
from megatron_vp2o.checkpoint.hf.archs import Arch, ConversionError

_PATTERNS = [
    (r"embedding\.word_embeddings\.weight", "embed"),
    (r"output_layer\.weight", "lm_head"),
    (r"decoder\.final_layernorm\.weight", "final_norm"),
    (r"decoder\.layers\.(\d+)\.input_layernorm\.weight", "input_norm"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.layer_norm_weight", "input_norm"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.weight", "qkv"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_proj\.weight", "o"),
    (r"decoder\.layers\.(\d+)\.self_attention\.q_layernorm\.weight", "q_norm"),
    (r"decoder\.layers\.(\d+)\.self_attention\.k_layernorm\.weight", "k_norm"),
    (r"decoder\.layers\.(\d+)\.pre_mlp_layernorm\.weight", "post_norm"),
    (r"decoder\.layers\.(\d+)\.mlp\.router\.weight", "router"),
    (r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc1\.weight", "fc1"),
    (r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight", "fc2"),
    (r"decoder\.layers\.(\d+)\.mlp\.experts\.linear_fc1\.weight(\d+)", "fc1"),
    (r"decoder\.layers\.(\d+)\.mlp\.experts\.linear_fc2\.weight(\d+)", "fc2"),
    (r"decoder\.layers\.(\d+)\.mlp\.experts\.weight1", "grouped1"),
    (r"decoder\.layers\.(\d+)\.mlp\.experts\.weight2", "grouped2"),
]
_COMPILED = [(re.compile(p + r"$"), kind) for p, kind in _PATTERNS]


@dataclass(frozen=True)
class Slot:
    kind: str
    layer: int | None = None  # pipeline-local layer index i
    expert: int | None = None  # local expert index j


def parse(name: str) -> Slot:
    for pattern, kind in _COMPILED:
        m = pattern.match(name)
        if m:
            nums = [int(g) for g in m.groups()]
            return Slot(kind, *nums)
    raise ConversionError(f"megatron parameter '{name}' has no Hugging Face mapping (supported: dense attention, "
                          "RMSNorm, q/k norms, routed experts without shared experts or dense MLP layers)")


@dataclass
class Shards:
    """Where this rank's tensors sit in the full model."""

    layer_offset: dict[int, int]  # local layer i -> global layer L
    expert_offset: dict[int, list[int]]  # local layer i -> global index of each local expert
    tp: tuple[int, int] = (0, 1)  # (rank, size) of tensor parallelism
    etp: tuple[int, int] = (0, 1)  # (rank, size) of expert tensor parallelism
    padded_vocab: int = 0
    num_heads: int = 0
    num_groups: int = 0
    head_dim: int = 0
    tied: bool = False


def _expert_fc(arch: Arch, get: Callable, L: int, e: int, sh: Shards) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e`` of layer ``L``: (fc1 [2I/T, H], fc2 [H, I/T]) sharded for this ETP rank."""
    fc1 = keys.fuse_fc1(get(arch.hf("gate", L, e)), get(arch.hf("up", L, e)))
    fc2 = get(arch.hf("down", L, e))
    r, t = sh.etp
    return keys.shard(fc1, 0, r, t, glu=True), keys.shard(fc2, 1, r, t)


def mcore_from_hf(name: str, arch: Arch, get: Callable[[str], torch.Tensor], sh: Shards) -> torch.Tensor:
    """The local tensor of megatron parameter ``name`` built from HF tensors (``get(hf_name)``)."""
    s = parse(name)
    L = sh.layer_offset.get(s.layer) if s.layer is not None else None
    r, t = sh.tp
    if s.kind in ("embed", "lm_head"):
        hf_name = arch.hf("embed") if s.kind == "embed" or sh.tied else arch.hf("lm_head")
        return keys.shard(keys.pad_vocab(get(hf_name), sh.padded_vocab), 0, r, t)
    if s.kind == "qkv":
        qkv = keys.fuse_qkv(get(arch.hf("q", L)), get(arch.hf("k", L)), get(arch.hf("v", L)), sh.num_groups)
        return keys.shard(qkv, 0, r, t)
    if s.kind == "o":
        return keys.shard(get(arch.hf("o", L)), 1, r, t)
    if s.kind in ("fc1", "fc2"):
        fc1, fc2 = _expert_fc(arch, get, L, sh.expert_offset[s.layer][s.expert], sh)
        return fc1 if s.kind == "fc1" else fc2
    if s.kind in ("grouped1", "grouped2"):
        pairs = [_expert_fc(arch, get, L, e, sh) for e in sh.expert_offset[s.layer]]
        w1, w2 = keys.pack_grouped([p[0] for p in pairs], [p[1] for p in pairs])
        return w1 if s.kind == "grouped1" else w2
    if s.kind in ("q_norm", "k_norm") and not arch.qk_norm:
        raise ConversionError(f"{arch.hf_class} has no q/k norms but the megatron model has '{name}'")
    return get(arch.hf(s.kind, L))  # norms, router: replicated


def hf_from_mcore(name: str, tensor: torch.Tensor, arch: Arch, sh: Shards, vocab: int,
                  slot: Slot | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one full megatron parameter (TP=PP=EP=1: local names are global;
    otherwise ``slot`` gives the global layer / expert, see stream.py)."""
    s = slot or parse(name)
    L = s.layer
    if s.kind == "embed":
        yield arch.hf("embed"), keys.unpad_vocab(tensor, vocab)
    elif s.kind == "lm_head":
        if not sh.tied:
            yield arch.hf("lm_head"), keys.unpad_vocab(tensor, vocab)
    elif s.kind == "qkv":
        q, k, v = keys.split_qkv(tensor, sh.num_heads, sh.num_groups, sh.head_dim)
        yield from ((arch.hf("q", L), q), (arch.hf("k", L), k), (arch.hf("v", L), v))
    elif s.kind in ("fc1", "fc2"):
        yield from _expert_out(arch, L, s.expert, tensor if s.kind == "fc1" else None,
                               tensor if s.kind == "fc2" else None)
    elif s.kind in ("grouped1", "grouped2"):
        raise ConversionError("export reads the checkpoint into SequentialMLP experts; GroupedMLP weights are "
                              "converted on import only")
    else:
        yield arch.hf(s.kind, L), tensor


def _expert_out(arch: Arch, L: int, e: int, fc1, fc2):
    if fc1 is not None:
        gate, up = keys.split_fc1(fc1)
        yield arch.hf("gate", L, e), gate
        yield arch.hf("up", L, e), up
    if fc2 is not None:
        yield arch.hf("down", L, e), fc2


def expected_hf_shapes(arch: Arch, m) -> dict[str, tuple]:
    """Every HF tensor a model with ModelConfig ``m`` has, with its shape (the completeness contract)."""
    d = m.resolved_head_dim
    h, f, q, g = m.hidden_size, m.moe_ffn_hidden_size, m.num_attention_heads, m.num_query_groups
    out = {arch.hf("embed"): (m.vocab_size, h), arch.hf("final_norm"): (h,)}
    if m.untie_embeddings:
        out[arch.hf("lm_head")] = (m.vocab_size, h)
    for L in range(m.num_layers):
        out.update({arch.hf("input_norm", L): (h,), arch.hf("post_norm", L): (h,), arch.hf("q", L): (q * d, h),
                    arch.hf("k", L): (g * d, h), arch.hf("v", L): (g * d, h), arch.hf("o", L): (h, q * d),
                    arch.hf("router", L): (m.num_experts, h)})
        if arch.qk_norm:
            out.update({arch.hf("q_norm", L): (d,), arch.hf("k_norm", L): (d,)})
        for e in range(m.num_experts):
            out.update({arch.hf("gate", L, e): (f, h), arch.hf("up", L, e): (f, h), arch.hf("down", L, e): (h, f)})
    return out


def check_hf_tensors(shapes: dict[str, tuple], expected: dict[str, tuple], where: str) -> None:
    """Raise unless ``shapes`` has exactly the expected tensors with the expected shapes."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(k for k in set(shapes) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} tensors this converter does not handle (unsupported feature?), e.g. {extra[:3]}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} tensors with unexpected shapes, e.g. {k} {list(shapes[k])} != {list(expected[k])}")
    if problems:
        raise ConversionError(f"{where}: " + "; ".join(problems))
