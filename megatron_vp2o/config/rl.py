"""The ``rl`` config section (a declared field of :class:`~megatron_vp2o.config.Config`): what the RL trainer (``vp2o train``) does each step.

``algo``: ``vp2o`` (Stein transport, specialisation losses, geometric trust regions, event-driven
actor refresh; method §2) or ``grpo`` (the baseline: PPO clipping, actors refreshed every step, each
rollout batch split into ``mini_batches`` optimizer steps for ``epochs`` passes; method §2.3). The
``ablate`` switches turn single VP2O parts off; ``budget`` ends a run at a rollout cost.

One switch per algorithm: ``rl.algo`` picks the section of the same name, ``rl.grpo`` or ``rl.vp2o``,
which holds what that algorithm's learner is tuned with -- its PPO clip, its optimizer steps per
update (``mini_batches`` x ``epochs``) and, optionally, its own constant learning rate -- so a
config can carry both tuned algorithms and ``rl.algo=grpo`` / ``rl.algo=vp2o`` alone runs either as
tuned (the other section is not read). What both share stays at ``rl`` level (``policy_loss``:
advantages, KL, group size, aggregation; ``lr``, sampling, batch sizes); the VP2O method's own knobs
are the top-level ``vp2o`` section (stein, trust_region, specialization). Keys that moved here in
0.3.0 (``rl.mini_batches``, ``rl.epochs``, ``rl.policy_loss.clip_eps``) are read from old YAMLs and
saved configs through the migration table (:mod:`megatron_vp2o.config.migrate`).

GRPO mini-batches, ours beside verl's defaults (``actor_rollout_ref.actor``): verl splits each
``data.train_batch_size`` (1024 prompts) into ``ppo_mini_batch_size`` (256 prompts) -> 4 optimizer
steps per rollout batch, ``ppo_epochs`` 1, ``clip_ratio`` 0.2, no shuffling between epochs.
Ours (``rl.grpo``): ``mini_batches`` (default 4, whole groups per mini-batch), ``epochs`` 1,
``clip_eps`` 0.2 (grpo_clip), mini-batches taken in buffer order. VP2O takes the same rollout
batches; by default (``rl.vp2o``: 1 x 1, no clip) one VP2O step per learner update, the updates per
batch event-driven (the refresh rule, method §2.12). ``rl.vp2o.mini_batches`` / ``epochs`` above 1
run GRPO's mini-batch loop with VP2O steps; the anchor budget judges one step on the whole buffer,
so they need it off (the ``vp2o train`` pre-flight, ``cli/checks.py``, says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_vp2o.algo.config import PolicyLossConfig
from megatron_vp2o.config.loader import check


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # softmax temperature T (0: greedy argmax)
    top_p: float = 1.0  # nucleus mass in (0, 1] (1: off)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    max_new_tokens: int = 64  # response length limit per sequence
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # ids that end a sequence (kept in the response)
    seed: int = 0  # base seed of the sampling generator (offset by the data-parallel rank)

    def __post_init__(self):
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not self.temperature >= 0.0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed < 0:
            raise ValueError(f"sampling.seed must be >= 0, got {self.seed}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"sampling.stop_token_ids must be non-negative token ids, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class VLLMConfig:
    """Engine settings that are not sampling settings."""
    tp: int = 1  # ranks per vLLM engine: tensor parallel over tp consecutive ranks (external_launcher)
    ep: int = 1  # expert parallel: 1 (off) or tp (vLLM spreads experts over its TP ranks)
    gpu_memory_utilization: float = 0.4  # share of GPU memory for weights + KV cache (the learner has the rest)
    sleep: bool = True  # GPU: free weights and KV cache during learner steps (sleep level 1)
    kv_cache_bytes: int = 512 << 20  # CPU: KV cache size (vLLM would otherwise take most of the host memory)
    max_model_len: Optional[int] = None  # default: the model's seq_length
    max_num_seqs: int = 256  # requests decoded together
    bucket_bytes: int = 256 << 20  # weight refresh bucket (weight_sync.py)
    routed_experts: bool = False  # GPU (model runner V2): ask vLLM for routed experts (R3)
    enforce_eager: Optional[bool] = None  # default: True on CPU, False on GPU (CUDA graphs)

    def __post_init__(self):
        check(self.tp >= 1, "rl.vllm.tp", "be >= 1", self.tp)
        check(self.ep in (1, self.tp), "rl.vllm.ep", f"be 1 or rl.vllm.tp ({self.tp}): vLLM's experts span its TP "
              "ranks", self.ep)
        check(0.0 < self.gpu_memory_utilization <= 1.0, "rl.vllm.gpu_memory_utilization", "be in (0, 1]",
              self.gpu_memory_utilization)
        check(self.kv_cache_bytes >= 1 << 20, "rl.vllm.kv_cache_bytes", "be at least 1 MiB (1048576)",
              self.kv_cache_bytes)
        check(self.max_model_len is None or self.max_model_len >= 1, "rl.vllm.max_model_len", "be >= 1 or null",
              self.max_model_len)
        check(self.max_num_seqs >= 1, "rl.vllm.max_num_seqs", "be >= 1", self.max_num_seqs)
        check(self.bucket_bytes >= 1 << 20, "rl.vllm.bucket_bytes", "be at least 1 MiB (1048576)", self.bucket_bytes)


@dataclass
class GRPOLoopConfig:
    """``rl.grpo``: the GRPO baseline's learner (read with ``rl.algo=grpo`` only): the clipped loss
    (``grpo_clip``) and ``epochs`` passes of ``mini_batches`` optimizer steps per rollout batch."""

    clip_eps: float = 0.2  # PPO clip range eps of grpo_clip (verl clip_ratio: 0.2)
    mini_batches: int = 4  # optimizer steps per rollout batch per epoch (whole prompt groups each; verl: 4)
    epochs: int = 1  # passes over each rollout batch (verl ppo_epochs: 1)
    lr: Optional[float] = None  # constant learning rate of GRPO runs (null: rl.lr)

    def __post_init__(self):
        check(0.0 < self.clip_eps < 1.0, "rl.grpo.clip_eps", "be in (0, 1)", self.clip_eps)
        _check_loop("rl.grpo", self)


@dataclass
class VP2OLoopConfig:
    """``rl.vp2o``: VP2O's learner update (read with ``rl.algo=vp2o`` only); the method's knobs are the
    top-level ``vp2o`` section. Default: one VP2O step on the whole buffer per update, unclipped."""

    clip_eps: Optional[float] = None  # PPO clip on VP2O's loss (null: none, method §2.3; an ablation)
    mini_batches: int = 1  # optimizer steps per update and epoch (> 1 only without the anchor budget)
    epochs: int = 1  # passes over the buffer per update (> 1 only without the anchor budget)
    lr: Optional[float] = None  # constant learning rate of VP2O runs (null: rl.lr)

    def __post_init__(self):
        check(self.clip_eps is None or 0.0 < self.clip_eps < 1.0, "rl.vp2o.clip_eps", "be in (0, 1) or null",
              self.clip_eps)
        _check_loop("rl.vp2o", self)


def _check_loop(section: str, loop) -> None:
    for name in ("mini_batches", "epochs"):
        check(getattr(loop, name) >= 1, f"{section}.{name}", "be >= 1", getattr(loop, name))
    check(loop.lr is None or loop.lr > 0, f"{section}.lr", "be > 0 or null", loop.lr)


@dataclass
class AblationConfig:
    """Each switch removes one VP2O part (method §2.8-2.12); ``docs/method.md`` §2.8 lists the mapping."""

    stein: bool = True  # the whole Stein transport (attraction, repulsion, freeze of inactive experts)
    attraction: bool = True  # only the kernel-weighted mixing of co-active neighbours' gradients
    repulsion: bool = True  # only the repulsion gradient through the prototypes (alpha = 0)
    specialization: bool = True  # orthogonality + routing-variance losses
    anchor_budget: bool = True  # prototype-barycenter trust region (method §2.10)
    behaviour_budget: bool = True  # drift / ESS refresh triggers (method §2.11)


@dataclass
class BudgetConfig:
    samples: int = 0  # end the run once this many training responses were generated (0: no budget; eval not counted)
    eval_every: int = 0  # also evaluate each time this many more training responses were generated (0: off)


@dataclass
class EvalTaskConfig:
    """One benchmark evaluated during training by `vp2o eval`'s code (docs/evaluation.md)."""

    task: Literal["math", "multiple_choice", "ifeval", "code"] = "math"  # the benchmark's task
    data: str = ""  # benchmark file in the task's public layout (e.g. data/eval/math_aime_sample.jsonl)
    template: Optional[str] = None  # prompt template (null: the task's own; '{problem}' for the bare problem)


@dataclass
class RLConfig:
    algo: Literal["vp2o", "grpo"] = "vp2o"  # learner: VP2O or the GRPO-with-clipping baseline
    policy: Optional[str] = None  # initial policy checkpoint (megatron dist checkpoint; null: checkpoint.load)
    prompts: str = "data/prompts/digit_sum_train.jsonl"  # prompt JSONL (prompt, task, answer/tests/meta)
    eval_prompts: Optional[str] = "data/prompts/digit_sum_eval.jsonl"  # evaluated at start/end (null: off)
    eval_every: int = 0  # also evaluate every n steps (0: only at start and end)
    eval_samples: int = 8  # samples per eval prompt (for pass@1 and distinct correct answers)
    eval: list[EvalTaskConfig] = field(default_factory=list)  # benchmarks evaluated with eval_prompts -> eval/<file>/*
    steps: int = 30  # learner updates
    lr: Optional[float] = None  # constant RL lr of both algorithms (null: train.lr and its schedule; rl.<algo>.lr wins)
    prompts_per_step: int = 8  # prompts per rollout batch (all data-parallel ranks)
    refresh: Optional[Literal["every_step", "event"]] = None  # actor refresh (None: event for vp2o, every_step for grpo)
    grpo: GRPOLoopConfig = field(default_factory=GRPOLoopConfig)  # rl.algo=grpo: clip, mini-batches, epochs, lr
    vp2o: VP2OLoopConfig = field(default_factory=VP2OLoopConfig)  # rl.algo=vp2o: the same for VP2O's learner
    micro_batch_size: int = 16  # sequences per learner micro-batch
    reward_timeout_s: float = 10.0  # per-call reward timeout
    engine: Literal["megatron", "vllm"] = "megatron"  # rollout engine: megatron's own decoding, or vLLM
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # rl.engine=vllm: the engine's own settings
    engine_is_cap: Optional[float] = None  # per-token advantage weight min(mu_learner / mu_engine, cap) (null: off)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    ablate: AblationConfig = field(default_factory=AblationConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "micro_batch_size", "eval_samples"):
            check(getattr(self, name) >= 1, f"rl.{name}", "be >= 1", getattr(self, name))
        check(self.budget.samples >= 0, "rl.budget.samples", "be >= 0 (0: no budget)", self.budget.samples)
        check(self.budget.eval_every >= 0, "rl.budget.eval_every", "be >= 0 (0: off)", self.budget.eval_every)
        check(self.eval_every >= 0, "rl.eval_every", "be >= 0", self.eval_every)
        check(self.lr is None or self.lr > 0, "rl.lr", "be > 0 or null", self.lr)
        check(self.reward_timeout_s > 0, "rl.reward_timeout_s", "be > 0", self.reward_timeout_s)
        check(self.engine_is_cap is None or self.engine_is_cap >= 1.0, "rl.engine_is_cap",
              "be >= 1 (a truncation cap on the engine-mismatch weight; verl uses 2) or null (off)", self.engine_is_cap)

    def policy_path(self, checkpoint_load: Optional[str]) -> Optional[str]:
        return self.policy or checkpoint_load

    @property
    def refresh_policy(self) -> str:
        return self.refresh or ("event" if self.algo == "vp2o" else "every_step")

    @property
    def loop(self):
        """The chosen algorithm's section: ``rl.grpo`` or ``rl.vp2o`` (clip, mini-batches, epochs, lr)."""
        return self.grpo if self.algo == "grpo" else self.vp2o

    @property
    def loop_name(self) -> str:
        return f"rl.{self.algo}"

    @property
    def clip_eps(self) -> Optional[float]:
        """The PPO clip of the chosen algorithm's loss (``rl.<algo>.clip_eps``)."""
        return self.loop.clip_eps

    @property
    def resolved_lr(self) -> Optional[float]:
        """The constant RL learning rate: ``rl.<algo>.lr``, else ``rl.lr`` (None: train.lr and its schedule)."""
        return self.lr if self.loop.lr is None else self.loop.lr

    @property
    def loss_name(self) -> str:
        """grpo uses PPO clipping (grpo_clip); vp2o uses the configured loss (default: unclipped)."""
        return "grpo_clip" if self.algo == "grpo" else self.policy_loss.policy_loss

