"""Parameter counts of one rank's pipeline stage, from the config alone (no model is built).

What: for a rank at pipeline stage ``stage`` of a layout (tp, pp, ep, etp), the number of
parameter elements and tensors it holds, split into *dense* parameters (replicated over the dense
data-parallel group: embeddings, attention, norms, routers, shared experts, dense MLPs) and
*expert* parameters (the E/ep local routed experts, replicated over the expert data-parallel
group). The split matters because the distributed optimizer shards the two over different groups.

Counted the way megatron-core's ``GPTModel`` with our layer spec allocates them (a test builds
the model on the ``meta`` device as rank 0 of each recipe layout and compares):

* embedding ``V_pad/tp x D`` on the first stage; output layer ``V_pad/tp x D`` (untied) and the
  final norm ``D`` on the last stage; ``V_pad`` is the vocabulary padded to a multiple of 8 tp.
* per layer: input norm ``D``; QKV ``D x (Hq + 2 Hkv) hd / tp``; output projection ``Hq hd / tp x D``;
  q/k norms ``hd`` each (qk_layernorm); pre-MLP norm ``D``;
  MoE layer: router ``E x D``; per local expert ``D x 2F/etp`` (SwiGLU) + ``F/etp x D``;
  shared expert ``D x 2S/tp + S/tp x D``; a dense layer ``D x 2 F_dense/tp + F_dense/tp x D``.

Shape legend: D hidden, E experts, F expert ffn, S shared-expert ffn, V vocabulary, Hq / Hkv query /
key-value heads, hd head width, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageParams:
    dense: int  # dense parameter elements on this rank
    expert: int  # routed-expert parameter elements on this rank
    dense_tensors: int  # number of dense parameter tensors
    expert_tensors: int  # number of expert parameter tensors
    layers: int  # transformer layers on this stage
    moe_layers: int  # of which MoE layers

    @property
    def total(self) -> int:
        return self.dense + self.expert

    @property
    def tensors(self) -> int:
        return self.dense_tensors + self.expert_tensors


def padded_vocab(vocab: int, tp: int) -> int:
    step = 8 * tp
    return (vocab + step - 1) // step * step


def _is_moe(model, layer: int) -> bool:
    return layer % model.moe_layer_freq == 0


def layer_params(model, parallel, moe: bool) -> tuple[int, int, int, int]:
    """(dense elements, expert elements, dense tensors, expert tensors) of one layer on one rank."""
    d, tp, etp = model.hidden_size, parallel.tp, parallel.expert_tp
    hd = model.resolved_head_dim
    hq, hkv = model.num_attention_heads, model.num_query_groups
    dense = d + d * (hq + 2 * hkv) * hd // tp + hq * hd // tp * d + d  # norms, qkv, proj
    tensors = 4
    if model.qk_layernorm:
        dense, tensors = dense + 2 * hd, tensors + 2
    gate = 2 if model.swiglu else 1
    if not moe:
        f = model.ffn_hidden_size
        return dense + d * gate * f // tp + f // tp * d, 0, tensors + 2, 0
    dense, tensors = dense + model.num_experts * d, tensors + 1  # router
    s = model.shared_expert_ffn_hidden_size
    if s:
        dense, tensors = dense + d * gate * s // tp + s // tp * d, tensors + 2
    local = model.num_experts // parallel.ep
    f = model.moe_ffn_hidden_size
    expert = local * (d * gate * f // etp + f // etp * d)
    expert_tensors = 2 if model.expert_impl == "grouped" else 2 * local
    return dense, expert, tensors, expert_tensors


def stage_params(model, parallel, stage: int = 0) -> StageParams:
    """Parameters of a rank at pipeline stage ``stage`` (0 .. pp-1)."""
    pp = parallel.pp
    per_stage = model.num_layers // pp
    first, last = stage == 0, stage == pp - 1
    d, tp = model.hidden_size, parallel.tp
    vocab = padded_vocab(model.vocab_size, tp)
    dense = expert = dense_t = expert_t = moe_layers = 0
    for layer in range(stage * per_stage, (stage + 1) * per_stage):
        moe = _is_moe(model, layer)
        a, b, c, e = layer_params(model, parallel, moe)
        dense, expert, dense_t, expert_t, moe_layers = dense + a, expert + b, dense_t + c, expert_t + e, moe_layers + moe
    if first:
        dense, dense_t = dense + vocab // tp * d, dense_t + 1
    if last:
        dense, dense_t = dense + d, dense_t + 1  # final norm
        if model.untie_embeddings or not first:  # untied, or the tied copy megatron keeps on the last stage
            dense, dense_t = dense + vocab // tp * d, dense_t + 1
    return StageParams(dense, expert, dense_t, expert_t, per_stage, moe_layers)


def model_params(model) -> int:
    """Total parameters of the model (no parallelism)."""
    from megatron_vp2o.config import ParallelConfig

    return stage_params(model, ParallelConfig(tp=1, pp=1, ep=1, etp=1)).total
