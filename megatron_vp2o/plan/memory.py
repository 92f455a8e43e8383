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
* ``tr_snapshot``: VP2O's trust-region ``ParamSnapshot`` (``distributed/trust_region.py``): the
  main parameters (fp32 masters, or the fp32 parameter shards themselves) and every optimizer state
  tensor, never the model parameters (rebuilt from the mains as megatron does after a step). With
  the trust region off but the freeze of inactive experts on, only the expert part. GRPO: none.
  ``vp2o.trust_region.snapshot: host`` (or the optimizer offloaded to the host) moves it to
  ``host_snapshot``.
* ``backtrack``: 0 -- the post-step mains wait in the consumed gradient buffer.
* ``host_optimizer`` / ``host_snapshot``: bytes per rank in host memory (``train.optimizer_cpu_offload``:
  ``optimizer_offload_fraction`` of the optimizer; the snapshot follows it), checked per node
  (x GPUs per node) against the node's host memory (``HOST_BYTES``, DGX H100: 2 TB).
* ``prototypes``, ``stein``, ``routing``, ``routing_stats``: VP2O's own state, 0 for GRPO
  (:mod:`.vp2o_rows`: prototype buffers and their copies, the Stein hook's peak, routing records
  held between steps, per-token statistics pending during the forward/backward).
* ``activations``: stored for backward by one learner micro-batch (``rl.micro_batch_size``
  sequences of ``model.seq_length`` tokens), times the micro-batches in flight under 1F1B
  (``min(pp, micro-batches)``; an RL step has ``prompts_per_step x group_size / (dp x
  rl.micro_batch_size)`` micro-batches), plus the last stage's final norm (input, normalised
  input) and output-layer input ``3aD`` per token and the policy loss's two fp32 vocabulary-wide
  tensors (tempered logits and the log-sum-exp input: ``generation.sampling.token_logprobs``), 8
  bytes per logit. Per layer and token (``a`` activation bytes, ``r`` router dtype bytes; fused
  attention, so no ``s^2`` term; divided by tp x cp with sequence parallel): attention
  ``a (3D + 3 (Hq + Hkv) hd) + 4Hq`` (norm input and normalised input, QKV input; q and k after
  RoPE, the QKV output that v views, the attention output; the fp32 log-sum-exp); MoE
  ``a (2D + K (D + 4F/etp)) + r (D + 2E)`` (norm input and normalised input; per routed copy the
  permuted input, fc1 output 2F, SiLU output F and GLU product F; the router's input in its dtype,
  its logits and probabilities); shared expert ``a (D + 4S)``; VP2O adds the variance loss's softmax and
  log-softmax of the router logits ``2rE`` and, with the orthogonality loss, the per-slot expert
  outputs ``aKD``. Checked on the CPU path (``vp2o plan --check``, :mod:`.live`): the bytes a
  forward and loss save for backward equal this plus what that path saves on top
  (:func:`.live.cpu_extra_bytes`: the unfused SwiGLU copies of megatron's sequential experts),
  within 5%.
  ``activations_recompute``: full recompute (megatron ``recompute_granularity=full``): the layer
  inputs ``aD`` per layer plus one layer's set but its input (rebuilt in the backward).
  ``activations_selective``: ``model.recompute: selective`` (core_attn, moe): the MoE block keeps the
  pre-MLP norm's two tensors and its own input ``3aD`` per token instead of its internals (plus one
  MoE block's internals while recomputing); attention saves nothing more to recompute (its
  checkpoint keeps q, k and the QKV output, the output is the next projection's input). The peak
  uses ``model.recompute``.
* ``kv_cache``: the megatron engine's KV cache while generating (``rl.engine: megatron``): ``2 x
  layers x Hkv/tp x hd x model.seq_length`` per sequence for the ``prompts_per_step x group_size /
  dp`` sequences a rank generates at once.
* ``vllm_weights`` / ``vllm_kv`` (``rl.engine: vllm``): one engine spans ``rl.vllm.tp`` ranks and
  holds ``1/rl.vllm.tp`` of the whole model per rank in the parameter dtype; awake it takes
  ``rl.vllm.gpu_memory_utilization`` of the GPU, the rest of that after its weights being its KV
  cache (vLLM's own activations are left in it). ``vllm_sequences`` (not a byte row): how many
  sequences of ``rl.vllm.max_model_len`` (default ``model.seq_length``) that KV cache holds at once,
  ``2 x layers x max(Hkv/tp, 1) x hd`` elements per token; the plan does not fit below one.
  Asleep (``rl.vllm.sleep``, level 1) it frees both and keeps its weights in host memory
  (``host_vllm``); without sleep they stay on the GPU through the learner step.

``peak = params + grads + optimizer + tr_snapshot + prototypes + routing + max(activations +
routing_stats, stein, backtrack, kv_cache, vllm_weights + vllm_kv)`` (device rows only; without
vLLM's sleep its two rows move into the static sum): rollouts and the learner step do not overlap;
the Stein hook runs after the backward has freed the activations and the statistics were
folded in; backtracking comes after the optimizer step. Not counted: the CUDA context and
NCCL buffers, allocator fragmentation, the KL reference model (``rl.policy_loss.kl_coef > 0``:
add ``params`` again); the ``headroom`` fraction of the GPU is kept free for them.

Shape legend: D hidden, E experts, X local experts, K top-k, F expert ffn, S shared ffn, V vocab,
Hq / Hkv query / key-value heads, hd head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_vp2o.config.validate import check_layout
from megatron_vp2o.plan.counts import StageParams, model_params, padded_vocab, stage_params
from megatron_vp2o.plan.vp2o_rows import prototype_bytes, router_bytes, routing_bytes, routing_stats_bytes
from megatron_vp2o.plan.vp2o_rows import anchor_budget, knobs, stein_bytes, vp2o_on

GIB = 1 << 30
# usable device memory (what torch.cuda.mem_get_info reports as total), in bytes
GPUS = {"h100-80gb": 81559 * (1 << 20), "h200": 143771 * (1 << 20), "a100-80gb": 81251 * (1 << 20),
        "a100-40gb": 40537 * (1 << 20)}
_BYTES = {"fp32": 4, "bf16": 2}
ROWS = ("params", "grads", "optimizer", "tr_snapshot", "backtrack", "prototypes", "routing", "stein",
        "activations", "activations_recompute", "activations_selective", "routing_stats", "kv_cache",
        "vllm_weights", "vllm_kv", "host_optimizer", "host_snapshot", "host_vllm")
HOST_ROWS = ("host_optimizer", "host_snapshot", "host_vllm")
HOST_BYTES = 2 * 10**12  # host memory of one node (DGX H100: 2 TB)
GPUS_PER_NODE = 8


@dataclass
class RankPlan:
    world: int
    layout: str
    params: StageParams
    bytes: dict = field(default_factory=dict)  # row -> bytes
    recompute: "bool | str" = False  # activations in peak: none/False, full/True or selective
    gpu: str = "h100-80gb"
    headroom: float = 0.1
    cfg: object = None  # the config planned

    @property
    def peak(self) -> int:
        return self.peak_bytes(self.recompute)

    def peak_bytes(self, recompute: "bool | str") -> int:
        b = self.bytes
        mode = {True: "full", False: "none"}.get(recompute, recompute)
        act = {"full": b["activations_recompute"], "selective": b["activations_selective"]}.get(mode, b["activations"])
        static = sum(b[k] for k in ("params", "grads", "optimizer", "tr_snapshot", "prototypes", "routing"))
        engine = b["vllm_weights"] + b["vllm_kv"]
        if engine and not self.cfg.rl.vllm.sleep:  # awake through the learner step
            static, engine = static + engine, 0
        return static + max(act + b["routing_stats"], b["stein"], b["backtrack"], b["kv_cache"], engine)

    @property
    def vllm_sequences(self) -> int | None:
        """Sequences of full length the vLLM KV cache holds at once (None: the megatron engine)."""
        if self.cfg is None or self.cfg.rl.engine != "vllm":
            return None
        return self.bytes["vllm_kv"] // max(vllm_token_bytes(self.cfg) * vllm_max_len(self.cfg), 1)

    @property
    def host_per_node(self) -> int:
        """Host bytes of one node (every rank of the node holds its host rows)."""
        return GPUS_PER_NODE * sum(self.bytes[row] for row in HOST_ROWS)

    def host_fits(self) -> bool:
        return self.host_per_node <= HOST_BYTES

    @property
    def capacity(self) -> int:
        return GPUS[self.gpu]

    @property
    def usable(self) -> int:
        return int(self.capacity * (1.0 - self.headroom))

    def fits(self, recompute: bool | None = None) -> bool:
        engine_ok = self.vllm_sequences is None or self.vllm_sequences >= 1
        return engine_ok and self.peak_bytes(self.recompute if recompute is None else recompute) <= self.usable


def _shard(n: int, dp: int, distributed: bool) -> int:
    return math.ceil(n / dp) if distributed else n


def optimizer_bytes(cfg, sp: StageParams, dp: int, edp: int, part: str = "all") -> tuple[int, int]:
    """(optimizer state bytes, bf16 master bytes) of this rank: Adam moments + masters + steps."""
    dist_opt, train = cfg.parallel.distributed_optimizer, cfg.train
    dense, expert = _shard(sp.dense, dp, dist_opt), _shard(sp.expert, edp, dist_opt)
    elems = (dense if part != "expert" else 0) + expert
    tensors = (sp.dense_tensors if part != "expert" else 0) + sp.expert_tensors
    moments = _BYTES[train.exp_avg_dtype] + _BYTES[train.exp_avg_sq_dtype]
    master = _BYTES[train.main_params_dtype] * elems if cfg.model.params_dtype == "bf16" else 0
    return moments * elems + master + 4 * tensors, master


def main_param_bytes(cfg, sp: StageParams, dp: int, edp: int, part: str = "all") -> int:
    """Bytes of the optimizer's main parameters of this rank (masters, or fp32 parameter shards)."""
    dist_opt = cfg.parallel.distributed_optimizer
    elems = (_shard(sp.dense, dp, dist_opt) if part != "expert" else 0) + _shard(sp.expert, edp, dist_opt)
    return (_BYTES[cfg.train.main_params_dtype] if cfg.model.params_dtype == "bf16" else 4) * elems


def snapshot_kind(cfg) -> str:
    """'full' (trust region), 'expert' (freeze of inactive experts only) or 'none' (GRPO / both off)."""
    if not vp2o_on(cfg):
        return "none"
    if anchor_budget(cfg):
        return "full"
    stein = knobs(cfg).stein
    return "expert" if stein.enabled and stein.freeze_inactive else "none"


def layer_activation_bytes(model, parallel, tokens: int, moe: bool, a: int, vp2o=None) -> int:
    """Bytes one transformer layer saves for backward for ``tokens`` tokens (module docstring);
    ``vp2o``: the VP2O config section of a VP2O run (its MoE layers add their specialisation losses)."""
    per_token = _attention_token_bytes(model, parallel, a)
    if moe:
        per_token += moe_block_token_bytes(model, parallel, a, vp2o)
    else:
        per_token += a * (3 * model.hidden_size + 4 * model.ffn_hidden_size // parallel.tp)
    return tokens * per_token // (parallel.tp * parallel.cp)


def _attention_token_bytes(model, parallel, a: int) -> int:
    """Per token (before the tp x cp split): norm input and normalised input, QKV input; q and k
    after RoPE, the QKV projection's output (v is a view of it), the attention output; the fused
    kernel's fp32 log-sum-exp per query head."""
    hd = model.resolved_head_dim
    hq, hkv = model.num_attention_heads, model.num_query_groups
    return a * (3 * model.hidden_size + 3 * (hq + hkv) * hd) + 4 * hq


def moe_block_token_bytes(model, parallel, a: int, vp2o=None) -> int:
    """Bytes per token the MoE block (pre-MLP norm to output) saves (module docstring)."""
    d, k, e, r = model.hidden_size, model.moe_router_topk, model.num_experts, router_bytes(model)
    out = a * (2 * d + k * (d + 4 * model.moe_ffn_hidden_size // parallel.expert_tp)) + r * (d + 2 * e)
    if model.shared_expert_ffn_hidden_size:
        out += a * (d + 4 * model.shared_expert_ffn_hidden_size // parallel.tp)
    if vp2o is not None:
        spec = vp2o.specialization
        out += (2 * r * e if spec.var_coef > 0 else 0) + (a * k * d if spec.ortho_coef > 0 else 0)
    return out


def activation_bytes(cfg, sp: StageParams, num_micro: int, last_stage: bool) -> tuple[int, int, int]:
    """(no recompute, full recompute, selective recompute) bytes of activations held for backward."""
    model, par = cfg.model, cfg.parallel
    a, split = _BYTES[model.params_dtype], par.tp * par.cp
    vp2o = knobs(cfg) if vp2o_on(cfg) else None
    tokens = cfg.rl.micro_batch_size * model.seq_length
    moe_l = layer_activation_bytes(model, par, tokens, True, a, vp2o)
    dense_l = layer_activation_bytes(model, par, tokens, False, a)
    per_micro = sp.moe_layers * moe_l + (sp.layers - sp.moe_layers) * dense_l
    in_flight = min(par.pp, num_micro)
    d = model.hidden_size
    head = tokens * 3 * a * d // split + tokens * padded_vocab(model.vocab_size, par.tp) // par.tp * 8 \
        if last_stage else 0
    inputs = sp.layers * tokens * d * a // split
    full = in_flight * per_micro + head
    # full: the layer inputs, and in the backward one layer's set but its input (already kept)
    recompute = in_flight * inputs + max(moe_l, dense_l) - tokens * d * a // split + head
    # selective (core_attn, moe): a MoE block keeps the norm's two tensors and its own input (3aD)
    # instead of its internals, which one block at a time rebuilds in the backward
    moe_block = tokens * moe_block_token_bytes(model, par, a, vp2o) // split
    kept = tokens * a * 3 * d // split
    selective = full - (in_flight * sp.moe_layers - (1 if sp.moe_layers else 0)) * (moe_block - kept)
    return full, recompute, selective


def kv_cache_bytes(cfg, sp: StageParams, dp: int) -> int:
    model, par = cfg.model, cfg.parallel
    hd = model.resolved_head_dim
    seqs = math.ceil(cfg.rl.prompts_per_step * cfg.rl.policy_loss.group_size / dp)
    per_token = 2 * sp.layers * max(model.num_query_groups // par.tp, 1) * hd * _BYTES[model.params_dtype]
    return seqs * model.seq_length * per_token


def vllm_max_len(cfg) -> int:
    return cfg.rl.vllm.max_model_len or cfg.model.seq_length


def vllm_token_bytes(cfg) -> int:
    """KV bytes per token on one rank of a vLLM engine (``rl.vllm.tp`` shards the KV heads, each rank
    keeping at least one)."""
    model = cfg.model
    hd = model.resolved_head_dim
    return 2 * model.num_layers * max(model.num_query_groups // cfg.rl.vllm.tp, 1) * hd * _BYTES[model.params_dtype]


def vllm_bytes(cfg, capacity: int) -> tuple[int, int, int]:
    """(weights, KV cache, host) bytes per rank of the vLLM engine; zeros for the megatron engine."""
    if cfg.rl.engine != "vllm":
        return 0, 0, 0
    c = cfg.rl.vllm
    weights = math.ceil(model_params(cfg.model) / c.tp) * _BYTES[cfg.model.params_dtype]
    kv = max(int(c.gpu_memory_utilization * capacity) - weights, 0)
    return weights, kv, weights if c.sleep else 0


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
    fp32_mains = 0 if cfg.model.params_dtype == "bf16" else 1  # fp32: the mains are the parameter shards
    if kind == "full":
        snap = opt + fp32_mains * main_param_bytes(cfg, sp, lay.dp, lay.edp)
    elif kind == "expert":
        snap = optimizer_bytes(cfg, sp, lay.dp, lay.edp, "expert")[0] + \
            fp32_mains * main_param_bytes(cfg, sp, lay.dp, lay.edp, "expert")
    else:
        snap = 0
    train = cfg.train
    offload = train.optimizer_offload_fraction if train.optimizer_cpu_offload else 0.0
    host_opt = int(opt * offload)
    host_snap = snap if (offload > 0 or cfg.vp2o.trust_region.snapshot == "host") else 0
    micro = math.ceil(cfg.rl.prompts_per_step * cfg.rl.policy_loss.group_size / (lay.dp * cfg.rl.micro_batch_size))
    act, act_rc, act_sel = activation_bytes(cfg, sp, micro, stage == par.pp - 1)
    vllm_w, vllm_kv, vllm_host = vllm_bytes(cfg, GPUS[gpu])
    rows = {"params": sp.total * pb, "grads": sp.total * 4, "optimizer": opt - host_opt,
            "tr_snapshot": snap - host_snap, "backtrack": 0, "prototypes": prototype_bytes(cfg, sp.moe_layers),
            "routing": routing_bytes(cfg, sp.moe_layers, lay.dp), "stein": stein_bytes(cfg, sp.moe_layers),
            "activations": act, "activations_recompute": act_rc, "activations_selective": act_sel,
            "routing_stats": routing_stats_bytes(cfg, sp.moe_layers, lay.dp),
            "kv_cache": kv_cache_bytes(cfg, sp, lay.dp) if cfg.rl.engine == "megatron" else 0,
            "vllm_weights": vllm_w, "vllm_kv": vllm_kv,
            "host_optimizer": host_opt, "host_snapshot": host_snap, "host_vllm": vllm_host}
    if recompute is False:
        recompute = cfg.model.recompute
    layout = (f"world={world} tp={lay.tp} pp={lay.pp} ep={lay.ep} etp={lay.etp} cp={lay.cp} dp={lay.dp} "
              f"edp={lay.edp} stage={stage}")
    return RankPlan(world, layout, sp, rows, recompute, gpu, headroom, cfg)
