"""Per-rank memory plan of ``vp2o train`` for a config on a world of N GPUs.

Every row is bytes on the busiest rank (the pipeline stage with the most parameters). What each
row counts, and where it comes from in the code:

* ``params``: this rank's parameters (:mod:`.counts`) x the parameter dtype.
* ``grads``: megatron's DDP grad buffers, fp32 (``grad_reduce_in_fp32=True`` in
  ``training/setup.py``), one element per parameter (bucket padding excluded).
* ``optimizer``: Adam's two fp32 moments, the fp32 master copy when parameters are bf16 (fp32
  parameters are their own masters), and Adam's per-tensor ``step``; with the distributed
  optimizer dense parameters are sharded over the dense DP group and expert parameters over the
  expert DP group (``ceil(P / dp)``; megatron's per-bucket ranges differ by at most the padding).
* ``tr_snapshot``: VP2O's trust-region ``ParamSnapshot`` (``distributed/trust_region.py``): a
  persistent copy of the parameters, the bf16 masters and every optimizer state tensor -- i.e.
  ``params + optimizer`` again. With the trust region off but the freeze of inactive experts on,
  only the expert part. GRPO: none.
* ``backtrack``: transient copy of the post-step parameters (and masters) while backtracking.
* ``prototypes``: per MoE layer ``protos_XD``, ``protos_ED``, ``counts_EE`` and the trust
  region's old prototypes and anchor copy (fp32).
* ``stein``: the Stein hook's fp32 gather copy and output of the local expert gradients of all
  MoE layers on the stage, plus (EP > 1) one layer's static-shape neighbour exchange, send and
  receive ``[ep, X, P_fc1]``.
* ``activations``: stored for backward by one learner micro-batch (``rl.micro_batch_size``
  sequences of ``model.seq_length`` tokens), times the micro-batches in flight under 1F1B
  (``min(pp, micro-batches)``; an RL step has ``prompts_per_step x group_size / (dp x
  rl.micro_batch_size)`` micro-batches), plus the fp32 logits of the last stage. Per layer and token
  (``a`` activation bytes; fused attention, so no ``s^2`` term; divided by tp x cp with sequence
  parallel): attention ``a (3D + (2Hq + 2Hkv) hd)`` (norm input and output, QKV input; q, k, v
  and the attention output); MoE ``a (3D + K (D + 4F/etp)) + 8E`` (norm, router input; per routed
  copy the permuted input, fc1 output 2F, SiLU output F and GLU product F; router logits and
  probabilities in fp32); shared expert ``a (D + 4S)``. Checked on the CPU path
  (tests/launch/test_plan.py): the bytes a forward saves for backward equal this plus what that
  path saves on top (two more F-wide copies per routed token in megatron's unfused sequential
  experts, K and V expanded to all query heads by math SDPA), within 5%.
  ``activations_recompute``: full recompute (megatron ``recompute_granularity=full``): the layer
  inputs ``aD`` per layer plus one layer's full set.
* ``kv_cache``: the actors' KV cache while generating: ``2 x layers x Hkv/tp x hd x
  model.seq_length`` per sequence for the ``prompts_per_step x group_size / dp`` sequences a
  rank generates at once.

``peak = params + grads + optimizer + tr_snapshot + prototypes + max(activations + stein,
backtrack, kv_cache)``: rollouts and the learner step do not overlap, the Stein buffers live
after the backward, backtracking after the optimizer step. Not counted: the CUDA context and
NCCL buffers, allocator fragmentation, the KL reference model (``rl.policy_loss.kl_coef > 0``:
add ``params`` again); the ``headroom`` fraction of the GPU is kept free for them.

Shape legend: D hidden, E experts, X local experts, K top-k, F expert ffn, S shared ffn, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_vp2o.config.validate import check_layout
from megatron_vp2o.plan.counts import StageParams, padded_vocab, stage_params

GIB = 1 << 30
# usable device memory (what torch.cuda.mem_get_info reports as total), in bytes
GPUS = {"h100-80gb": 81559 * (1 << 20), "h200": 143771 * (1 << 20), "a100-80gb": 81251 * (1 << 20),
        "a100-40gb": 40537 * (1 << 20)}
_BYTES = {"fp32": 4, "bf16": 2}
ROWS = ("params", "grads", "optimizer", "tr_snapshot", "backtrack", "prototypes", "stein", "activations",
        "activations_recompute", "kv_cache")


@dataclass
class RankPlan:
    world: int
    layout: str
    params: StageParams
    bytes: dict = field(default_factory=dict)  # row -> bytes
    recompute: bool = False  # whether peak uses the recompute activations
    gpu: str = "h100-80gb"
    headroom: float = 0.1

    @property
    def peak(self) -> int:
        return self.peak_bytes(self.recompute)

    def peak_bytes(self, recompute: bool) -> int:
        b = self.bytes
        act = b["activations_recompute"] if recompute else b["activations"]
        static = sum(b[k] for k in ("params", "grads", "optimizer", "tr_snapshot", "prototypes"))
        return static + max(act + b["stein"], b["backtrack"], b["kv_cache"])

    @property
    def capacity(self) -> int:
        return GPUS[self.gpu]

    @property
    def usable(self) -> int:
        return int(self.capacity * (1.0 - self.headroom))

    def fits(self, recompute: bool | None = None) -> bool:
        return self.peak_bytes(self.recompute if recompute is None else recompute) <= self.usable


def _shard(n: int, dp: int, distributed: bool) -> int:
    return math.ceil(n / dp) if distributed else n


def optimizer_bytes(cfg, sp: StageParams, dp: int, edp: int, part: str = "all") -> tuple[int, int]:
    """(optimizer state bytes, bf16 master bytes) of this rank: Adam moments + masters + steps."""
    dist_opt = cfg.parallel.distributed_optimizer
    dense, expert = _shard(sp.dense, dp, dist_opt), _shard(sp.expert, edp, dist_opt)
    elems = (dense if part != "expert" else 0) + expert
    tensors = (sp.dense_tensors if part != "expert" else 0) + sp.expert_tensors
    master = 4 * elems if cfg.model.params_dtype == "bf16" else 0
    return 8 * elems + master + 4 * tensors, master


def snapshot_kind(cfg) -> str:
    """'full' (trust region), 'expert' (freeze of inactive experts only) or 'none' (GRPO / both off)."""
    if cfg.rl.algo != "vp2o":
        return "none"
    if cfg.vp2o.trust_region.enabled and cfg.rl.ablate.anchor_budget:
        return "full"
    stein = cfg.vp2o.stein
    return "expert" if stein.enabled and stein.freeze_inactive else "none"


def layer_activation_bytes(model, parallel, tokens: int, moe: bool, a: int) -> int:
    """Bytes one transformer layer saves for backward for ``tokens`` tokens (module docstring)."""
    d, k, e = model.hidden_size, model.moe_router_topk, model.num_experts
    hd = model.head_dim or d // model.num_attention_heads
    hq, hkv = model.num_attention_heads, model.num_query_groups
    per_token = a * (3 * d + (2 * hq + 2 * hkv) * hd)
    if moe:
        per_token += a * (3 * d + k * (d + 4 * model.moe_ffn_hidden_size // parallel.expert_tp)) + 8 * e
        if model.shared_expert_ffn_hidden_size:
            per_token += a * (d + 4 * model.shared_expert_ffn_hidden_size // parallel.tp)
    else:
        per_token += a * (3 * d + 4 * model.ffn_hidden_size // parallel.tp)
    return tokens * per_token // (parallel.tp * parallel.cp)


def activation_bytes(cfg, sp: StageParams, num_micro: int, last_stage: bool) -> tuple[int, int]:
    """(without recompute, with full recompute) bytes of activations held for backward."""
    model, par = cfg.model, cfg.parallel
    a = _BYTES[model.params_dtype]
    tokens = cfg.rl.micro_batch_size * model.seq_length
    moe_l = layer_activation_bytes(model, par, tokens, True, a)
    dense_l = layer_activation_bytes(model, par, tokens, False, a)
    per_micro = sp.moe_layers * moe_l + (sp.layers - sp.moe_layers) * dense_l
    in_flight = min(par.pp, num_micro)
    logits = tokens * padded_vocab(model.vocab_size, par.tp) // par.tp * (a + 4) if last_stage else 0
    inputs = sp.layers * tokens * model.hidden_size * a // (par.tp * par.cp)
    full = in_flight * per_micro + logits
    recompute = in_flight * inputs + max(moe_l, dense_l) + logits
    return full, recompute


def kv_cache_bytes(cfg, sp: StageParams, dp: int) -> int:
    model, par = cfg.model, cfg.parallel
    hd = model.head_dim or model.hidden_size // model.num_attention_heads
    seqs = math.ceil(cfg.rl.prompts_per_step * cfg.rl.policy_loss.group_size / dp)
    per_token = 2 * sp.layers * max(model.num_query_groups // par.tp, 1) * hd * _BYTES[model.params_dtype]
    return seqs * model.seq_length * per_token


def stein_bytes(cfg, sp: StageParams) -> int:
    if cfg.rl.algo != "vp2o" or not cfg.vp2o.stein.enabled or not sp.moe_layers:
        return 0
    model, par = cfg.model, cfg.parallel
    local_grads = 4 * sp.expert
    exchange = 0
    if par.ep > 1:
        gate = 2 if model.swiglu else 1
        fc1 = gate * model.moe_ffn_hidden_size // par.expert_tp * model.hidden_size
        exchange = 2 * par.ep * (model.num_experts // par.ep) * fc1 * 4
    return 2 * local_grads + exchange


def prototype_bytes(cfg, sp: StageParams) -> int:
    if cfg.rl.algo != "vp2o":
        return 0
    model = cfg.model
    e, d, x = model.num_experts, model.hidden_size, model.num_experts // cfg.parallel.ep
    return 4 * sp.moe_layers * (2 * x * d + 2 * e * d + e * e)


def plan_rank(cfg, world: int, stage: int | None = None, gpu: str = "h100-80gb", headroom: float = 0.1,
              recompute: bool = False) -> RankPlan:
    """The memory plan of one rank (``stage``; default: the stage with the most parameters)."""
    if gpu not in GPUS:
        from megatron_vp2o.config import ConfigError

        raise ConfigError(f"unknown --gpu {gpu!r}; choose one of {sorted(GPUS)}")
    lay = check_layout(cfg, world)
    par = cfg.parallel
    stages = range(par.pp) if stage is None else [stage]
    stage = max(stages, key=lambda s: stage_params(cfg.model, par, s).total)
    sp = stage_params(cfg.model, par, stage)
    pb = _BYTES[cfg.model.params_dtype]
    opt, master = optimizer_bytes(cfg, sp, lay.dp, lay.edp)
    kind = snapshot_kind(cfg)
    if kind == "full":
        snap = sp.total * pb + opt
    elif kind == "expert":
        snap = sp.expert * pb + optimizer_bytes(cfg, sp, lay.dp, lay.edp, "expert")[0]
    else:
        snap = 0
    backtrack = sp.total * pb + master if kind == "full" and cfg.vp2o.trust_region.on_violation == "backtrack" else 0
    micro = math.ceil(cfg.rl.prompts_per_step * cfg.rl.policy_loss.group_size / (lay.dp * cfg.rl.micro_batch_size))
    act, act_rc = activation_bytes(cfg, sp, micro, stage == par.pp - 1)
    rows = {"params": sp.total * pb, "grads": sp.total * 4, "optimizer": opt, "tr_snapshot": snap,
            "backtrack": backtrack, "prototypes": prototype_bytes(cfg, sp), "stein": stein_bytes(cfg, sp),
            "activations": act, "activations_recompute": act_rc, "kv_cache": kv_cache_bytes(cfg, sp, lay.dp)}
    layout = (f"world={world} tp={lay.tp} pp={lay.pp} ep={lay.ep} etp={lay.etp} cp={lay.cp} dp={lay.dp} "
              f"edp={lay.edp} stage={stage}")
    return RankPlan(world, layout, sp, rows, recompute, gpu, headroom)
