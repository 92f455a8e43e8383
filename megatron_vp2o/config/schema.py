"""Config sections of megatron-vp2o, one dataclass per concern.

YAML layout (``examples/configs/tiny_cpu.yaml``)::

    model:      architecture of the MoE GPT (megatron-core TransformerConfig is derived from it)
    parallel:   tp, pp, ep, etp, cp (DP is derived from the world size), optimizer sharding
    train:      steps, batch sizes, optimizer and schedule, seed
    data:       SFT data and tokenizer
    checkpoint: where and how often to save, what to load
    logging:    metrics.jsonl, progress bar, wandb, tensorboard

Each field has a one-line comment; ranges are checked in ``__post_init__`` and errors name the
dotted field. Cross-section rules (world size, expert divisibility) live in
:func:`megatron_vp2o.config.validate.check_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_vp2o.config.loader import check


@dataclass
class RouterConfig:
    score_function: Literal["softmax", "sigmoid"] = "softmax"  # router score function
    topk_normalize: bool = True  # renormalise the top-k gates to sum 1 (Mixtral/Qwen3 norm_topk_prob)
    aux_loss_type: Literal["none", "aux_loss", "seq_aux_loss", "global_aux_loss"] = "aux_loss"  # load-balancing loss
    aux_loss_coeff: float = 1e-2  # load-balancing loss weight
    dtype: Optional[Literal["fp32", "fp64"]] = "fp32"  # router compute dtype (None: model dtype)

    def __post_init__(self):
        check(self.aux_loss_coeff >= 0, "router.aux_loss_coeff", "be >= 0", self.aux_loss_coeff)


@dataclass
class ModelConfig:
    num_layers: int = 2  # transformer layers (all MoE unless moe_layer_freq says otherwise)
    hidden_size: int = 64  # model width D
    num_attention_heads: int = 4  # query heads
    num_query_groups: int = 2  # key/value heads (GQA groups)
    head_dim: Optional[int] = None  # per-head width (None: hidden_size / heads)
    num_experts: int = 8  # routed experts E per MoE layer
    moe_router_topk: int = 2  # experts per token K
    moe_ffn_hidden_size: int = 64  # expert ffn width F
    ffn_hidden_size: int = 128  # dense-layer ffn width (layers that are not MoE)
    moe_layer_freq: int = 1  # every n-th layer is MoE (1: all)
    shared_expert_ffn_hidden_size: int = 0  # shared expert width (0: none)
    vocab_size: int = 128  # vocabulary (padded to a multiple of 8 x tp)
    seq_length: int = 64  # maximum sequence length
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rotary_base: int = 10000  # RoPE theta
    qk_layernorm: bool = False  # RMSNorm on queries and keys (Qwen3)
    untie_embeddings: bool = True  # separate output layer
    swiglu: bool = True  # gated SiLU experts
    router: RouterConfig = field(default_factory=RouterConfig)
    expert_impl: Literal["sequential", "grouped", "te_grouped"] = "sequential"  # expert weight layout
    dispatcher: Literal["allgather", "alltoall"] = "alltoall"  # token dispatcher
    attention: Literal["local", "sdpa"] = "sdpa"  # local backend core attention: megatron's or torch SDPA
    params_dtype: Literal["fp32", "bf16"] = "fp32"  # parameter / compute dtype
    init_method_std: float = 0.02  # weight init std
    recompute: Literal["none", "selective", "full"] = "none"  # activation recompute (megatron recompute_granularity)
    recompute_method: Literal["uniform", "block"] = "uniform"  # full: megatron recompute_method
    recompute_num_layers: int = 1  # full: layers per recompute unit (uniform) / recomputed layers per stage (block)
    recompute_modules: Optional[list[str]] = None  # selective: megatron recompute_modules (None: core_attn, moe)

    def __post_init__(self):
        check(self.recompute_num_layers >= 1, "model.recompute_num_layers", "be >= 1", self.recompute_num_layers)
        if self.recompute_modules is not None:
            unknown = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
            check(not unknown, "model.recompute_modules", f"name megatron recompute modules ({', '.join(RECOMPUTE_MODULES)})",
                  self.recompute_modules)
            check(not ("moe_act" in self.recompute_modules and self.expert_impl == "sequential"),
                  "model.recompute_modules", "not hold moe_act with model.expert_impl=sequential (megatron recomputes "
                  "the activation of grouped experts only; use expert_impl=te_grouped, or 'moe' for the whole layer)",
                  self.recompute_modules)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "num_experts",
                     "moe_router_topk", "moe_ffn_hidden_size", "vocab_size", "seq_length", "moe_layer_freq"):
            check(getattr(self, name) >= 1, f"model.{name}", "be >= 1", getattr(self, name))
        check(self.ffn_hidden_size >= 1, "model.ffn_hidden_size", "be >= 1", self.ffn_hidden_size)
        check(self.shared_expert_ffn_hidden_size >= 0, "model.shared_expert_ffn_hidden_size", "be >= 0 (0: none)",
              self.shared_expert_ffn_hidden_size)
        check(self.head_dim is None or self.head_dim >= 1, "model.head_dim", "be >= 1 or null", self.head_dim)
        check(self.norm_eps > 0, "model.norm_eps", "be > 0", self.norm_eps)
        check(self.rotary_base > 0, "model.rotary_base", "be > 0", self.rotary_base)
        check(self.init_method_std > 0, "model.init_method_std", "be > 0", self.init_method_std)
        check(self.moe_router_topk <= self.num_experts, "model.moe_router_topk",
              f"be <= model.num_experts ({self.num_experts})", self.moe_router_topk)
        check(self.num_attention_heads % self.num_query_groups == 0, "model.num_query_groups",
              f"divide model.num_attention_heads ({self.num_attention_heads})", self.num_query_groups)
        if self.head_dim is None:
            check(self.hidden_size % self.num_attention_heads == 0, "model.head_dim",
                  "be set when hidden_size is not divisible by num_attention_heads", self.head_dim)

    @property
    def resolved_head_dim(self) -> int:
        """The per-head width: ``head_dim``, else ``hidden_size / num_attention_heads``."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


#: megatron-core's selective-recompute modules (TransformerConfig.recompute_modules), every release we support.
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")
#: Of those, the ones megatron checkpoints with ``CheckpointWithoutOutput`` (needs Transformer Engine).
TE_RECOMPUTE_MODULES = ("layernorm", "moe_act")
#: ``model.recompute: selective`` without ``model.recompute_modules``: what megatron recomputes.
SELECTIVE_MODULES = ("core_attn", "moe")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size (MoE with tp > 1 turns on sequence parallel)
    pp: int = 1  # pipeline parallel size
    ep: int = 1  # expert parallel size
    etp: Optional[int] = None  # expert tensor parallel size (None: same as tp)
    cp: int = 1  # context parallel size
    sequence_parallel: Optional[bool] = None  # None: on when tp > 1
    distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    overlap_grad_reduce: bool = False  # overlap the gradient reduce with the backward

    def __post_init__(self):
        for name in ("tp", "pp", "ep", "cp"):
            check(getattr(self, name) >= 1, f"parallel.{name}", "be >= 1", getattr(self, name))
        check(self.etp is None or self.etp >= 1, "parallel.etp", "be >= 1 or null", self.etp)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel


@dataclass
class TrainConfig:
    steps: int = 40  # optimizer steps
    micro_batch_size: int = 4  # sequences per micro-batch per data-parallel rank
    global_batch_size: int = 16  # sequences per optimizer step (all ranks, all micro-batches)
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # final learning rate of the cosine schedule
    warmup_steps: int = 4  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0: off)
    seed: int = 1234  # seed for init, data order and sampling
    # megatron-core memory levers (OptimizerConfig; counted by `vp2o plan`)
    optimizer_cpu_offload: bool = False  # Adam on the host (megatron HybridDeviceOptimizer)
    optimizer_offload_fraction: float = 1.0  # with optimizer_cpu_offload: share of the state on the host
    overlap_cpu_optimizer_d2h_h2d: bool = True  # with optimizer_cpu_offload: overlap the host copies
    use_precision_aware_optimizer: bool = False  # low-precision main params / moments (TE FusedAdam or CPU offload)
    main_params_dtype: Literal["fp32", "bf16"] = "fp32"  # with the precision-aware optimizer
    exp_avg_dtype: Literal["fp32", "bf16"] = "fp32"  # Adam first moment dtype (precision-aware optimizer)
    exp_avg_sq_dtype: Literal["fp32", "bf16"] = "fp32"  # Adam second moment dtype (precision-aware optimizer)

    def __post_init__(self):
        check(0.0 <= self.optimizer_offload_fraction <= 1.0, "train.optimizer_offload_fraction", "be in [0, 1]",
              self.optimizer_offload_fraction)
        if not self.use_precision_aware_optimizer:
            for name in ("main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
                check(getattr(self, name) == "fp32", f"train.{name}",
                      "be fp32 unless train.use_precision_aware_optimizer=true", getattr(self, name))
        for name in ("steps", "micro_batch_size", "global_batch_size"):
            check(getattr(self, name) >= 1, f"train.{name}", "be >= 1", getattr(self, name))
        check(self.lr > 0, "train.lr", "be > 0", self.lr)
        check(0 <= self.min_lr <= self.lr, "train.min_lr", f"be in [0, train.lr={self.lr}]", self.min_lr)
        check(self.warmup_steps >= 0, "train.warmup_steps", "be >= 0", self.warmup_steps)
        check(self.weight_decay >= 0, "train.weight_decay", "be >= 0", self.weight_decay)
        for name in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, name) < 1, f"train.{name}", "be in [0, 1)", getattr(self, name))
        check(self.adam_eps > 0, "train.adam_eps", "be > 0", self.adam_eps)
        check(self.seed >= 0, "train.seed", "be >= 0", self.seed)
        check(self.clip_grad >= 0, "train.clip_grad", "be >= 0", self.clip_grad)


@dataclass
class DataConfig:
    path: str = "data/sft/digit_sum_sft.jsonl"  # SFT JSONL: {"prompt", "response"} or {"text"}
    tokenizer: str = "builtin:char"  # "builtin:char" or a local Hugging Face tokenizer directory
    loss_on_prompt: bool = False  # also train on prompt tokens


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # where to save (None: <out>/checkpoints)
    every: int = 0  # save every n steps (0: only at the end)
    load: Optional[str] = None  # initial weights: a checkpoint directory (weights only)
    save_final: bool = True  # save after the last step
    save_optimizer: bool = True  # include optimizer state (needed for exact resume; false: weights only)

    def __post_init__(self):
        check(self.every >= 0, "checkpoint.every", "be >= 0", self.every)


@dataclass
class LoggingConfig:
    progress: bool = True  # rich progress bar
    wandb: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "megatron-vp2o"
    tensorboard: bool = False  # write tensorboard event files under <out>/tb
    log_every: int = 1  # write metrics every n steps
    loss_grad_every: int = 10  # VP2O: spec/grad_norm_* (ortho / var / policy loss) every n optimizer steps; 0: off

    def __post_init__(self):
        check(self.log_every >= 1, "logging.log_every", "be >= 1", self.log_every)
        check(self.loss_grad_every >= 0, "logging.loss_grad_every", "be >= 0 (0: off)", self.loss_grad_every)
