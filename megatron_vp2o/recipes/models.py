"""Recipes: Python functions that return our typed :class:`~megatron_vp2o.config.Config` with a
parallel layout for a given number of nodes (as Megatron-Bridge's recipes do).

* :func:`tiny_cpu` -- the CPU recipe of ``examples/configs/tiny_cpu.yaml`` on ``ranks`` processes.
* :func:`qwen3_30b_a3b` -- RL of Qwen3-30B-A3B converted from Hugging Face (``vp2o convert
  hf-to-mcore``) on 1, 2 or 4 nodes of 8 x H100 80GB.
* :func:`paper_33b_a4b` -- the paper's 33B-total / ~4B-active MoE on 8 nodes of 8 x H100.

The model section of :func:`qwen3_30b_a3b` is what ``model_config_from_hf`` produces from
Qwen3-30B-A3B's ``config.json`` (a test checks it field by field) except two run-time choices:
``expert_impl=te_grouped`` (Transformer Engine grouped GEMM on H100; the checkpoint layout is the
same) and ``seq_length=4096`` (the RL context, prompt + response; the HF file's 40960 is the RoPE
position limit, which megatron's RoPE does not need). The layouts were chosen with ``vp2o plan``
(docs/cluster.md has the tables): the per-rank memory of VP2O is dominated by the expert optimizer
state and its trust-region snapshot, so more nodes buy expert data parallelism first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_vp2o.algo.config import PolicyLossConfig
from megatron_vp2o.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RouterConfig,
    TrainConfig,
    load_config,
)
from megatron_vp2o.config.rl import RLConfig, VLLMConfig
from megatron_vp2o.generation.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[2]
GPUS_PER_NODE = 8

# (tp, pp, ep) per node count on 8 x H100 80GB nodes; see docs/cluster.md for the plan tables.
QWEN3_LAYOUTS = {1: (1, 1, 8), 2: (1, 4, 4), 4: (1, 4, 8)}
PAPER_LAYOUTS = {8: (1, 2, 8), 16: (1, 2, 16)}


def _layout(name: str, layouts: dict, nodes: int) -> ParallelConfig:
    if nodes not in layouts:
        raise ConfigError(f"{name}: no layout for nodes={nodes}; choose nodes among {sorted(layouts)}")
    tp, pp, ep = layouts[nodes]
    return ParallelConfig(tp=tp, pp=pp, ep=ep, etp=1, cp=1, distributed_optimizer=True, overlap_grad_reduce=True)


def _absolute(path: str | None) -> str | None:
    return path if path is None or Path(path).is_absolute() else str(ROOT / path)


def tiny_cpu(ranks: int = 1, ep: int = 1, steps: int | None = None) -> Config:
    """The tiny CPU recipe (``examples/configs/tiny_cpu.yaml``) for ``ranks`` processes with EP=``ep``."""
    cfg = load_config(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
    rl = cfg.rl  # the YAML's repository-relative paths made absolute: a launcher may start elsewhere
    rl = dataclasses.replace(rl, policy=_absolute(rl.policy), prompts=_absolute(rl.prompts),
                             eval_prompts=_absolute(rl.eval_prompts))
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep), rl=rl,
                              data=dataclasses.replace(cfg.data, path=_absolute(cfg.data.path)))
    if steps is not None:
        cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, steps=steps))
    return cfg


def qwen3_30b_a3b_model() -> ModelConfig:
    """Qwen3-30B-A3B: 48 layers, 128 experts top-8, GQA 32q/4kv x 128, D=2048, F=768, V=151936."""
    return ModelConfig(
        num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4, head_dim=128,
        num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768, ffn_hidden_size=6144,
        vocab_size=151936, seq_length=4096, norm_eps=1e-6, rotary_base=1000000, qk_layernorm=True,
        untie_embeddings=True, swiglu=True, expert_impl="te_grouped", dispatcher="alltoall", params_dtype="bf16",
        router=RouterConfig(score_function="softmax", topk_normalize=True, aux_loss_type="aux_loss",
                            aux_loss_coeff=0.001),
    )


def paper_33b_a4b_model() -> ModelConfig:
    """The paper's MoE: 48 layers, 128 experts top-8 (F=832) + a 2048-wide shared expert, D=2048."""
    return ModelConfig(
        num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4, head_dim=128,
        num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=832, ffn_hidden_size=6144,
        shared_expert_ffn_hidden_size=2048, vocab_size=151936, seq_length=8192, norm_eps=1e-6,
        rotary_base=1000000, qk_layernorm=True, untie_embeddings=True, expert_impl="te_grouped",
        dispatcher="alltoall", params_dtype="bf16",
        router=RouterConfig(score_function="softmax", topk_normalize=True, aux_loss_type="global_aux_loss",
                            aux_loss_coeff=1e-3),
    )


#: The GPU recipes' rollout engine: vLLM, one engine per node (tensor and expert parallel over its 8
#: GPUs: 1/8 of the model per GPU), colocated with the learner and asleep during its step; awake it takes
#: 30% of each GPU (weights ~7-8 GiB, the rest KV cache: 85-179 full-length sequences per engine rank).
#: `vp2o plan` counts it (vllm_weights, vllm_kv, host_vllm); docs/vllm.md.
VLLM_GPU = VLLMConfig(tp=GPUS_PER_NODE, ep=GPUS_PER_NODE, gpu_memory_utilization=0.3)


def _rl_config(nodes: int, ckpt: str, prompts_per_step: int, max_new_tokens: int) -> RLConfig:
    return RLConfig(
        algo="vp2o", engine="vllm", vllm=VLLM_GPU, policy=f"{ckpt}/mcore", prompts="/data/prompts/math_train.jsonl",
        eval_prompts="/data/prompts/math_eval.jsonl", eval_every=50, eval_samples=4, steps=500, lr=1e-6,
        prompts_per_step=prompts_per_step, micro_batch_size=1,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, stop_token_ids=(151643, 151645)),
        policy_loss=PolicyLossConfig(group_size=8),
    )


def qwen3_30b_a3b(nodes: int = 2, ckpt: str = "/checkpoints/qwen3-30b-a3b") -> Config:
    """RL of Qwen3-30B-A3B on ``nodes`` x 8 H100 (1, 2 or 4); ``ckpt`` holds ``hf/`` and ``mcore/``."""
    parallel = _layout("qwen3_30b_a3b", QWEN3_LAYOUTS, nodes)
    dp = nodes * GPUS_PER_NODE // (parallel.tp * parallel.pp * parallel.cp)
    return fitted(Config(
        model=qwen3_30b_a3b_model(), parallel=parallel,
        train=TrainConfig(steps=500, micro_batch_size=1, global_batch_size=dp, lr=1e-6, min_lr=1e-6, warmup_steps=0,
                          weight_decay=0.01, clip_grad=1.0, seed=1234),
        data=DataConfig(tokenizer=f"{ckpt}/hf"),
        checkpoint=CheckpointConfig(every=20),
        logging=LoggingConfig(progress=False, wandb=True, wandb_project="vp2o-qwen3-30b-a3b"),
        rl=_rl_config(nodes, ckpt, prompts_per_step=64, max_new_tokens=3072),
    ), "qwen3_30b_a3b", nodes)


def paper_33b_a4b(nodes: int = 8, ckpt: str = "/checkpoints/qwen3-moe-33b-a4b") -> Config:
    """The paper's 33B/4B MoE on ``nodes`` x 8 H100 (8 or 16)."""
    parallel = _layout("paper_33b_a4b", PAPER_LAYOUTS, nodes)
    dp = nodes * GPUS_PER_NODE // (parallel.tp * parallel.pp * parallel.cp)
    return fitted(Config(
        model=paper_33b_a4b_model(), parallel=parallel,
        train=TrainConfig(steps=1000, micro_batch_size=1, global_batch_size=dp, lr=1e-6, min_lr=1e-6,
                          warmup_steps=0, weight_decay=0.01, clip_grad=1.0, seed=1234),
        data=DataConfig(tokenizer=f"{ckpt}/hf"),
        checkpoint=CheckpointConfig(every=50),
        logging=LoggingConfig(progress=False, wandb=True, wandb_project="vp2o-33b"),
        rl=_rl_config(nodes, ckpt, prompts_per_step=128, max_new_tokens=4096),
    ), "paper_33b_a4b", nodes)


#: Memory settings that make each layout fit 80 GB with 10% headroom at VP2O <= 1.10 x GRPO
#: (`vp2o plan`, docs/cluster.md): activation recompute, the trust-region snapshot on the host, and on
#: one node Adam on the host (megatron's HybridDeviceOptimizer; the snapshot follows it).
MEMORY = {
    ("qwen3_30b_a3b", 1): dict(recompute="full", snapshot="host", optimizer_cpu_offload=True),
    ("qwen3_30b_a3b", 2): dict(recompute="full", snapshot="host"),
    ("qwen3_30b_a3b", 4): dict(recompute="full", snapshot="host"),
    ("paper_33b_a4b", 8): dict(recompute="full", snapshot="host"),
    ("paper_33b_a4b", 16): dict(recompute="selective", snapshot="host"),
}


#: Micro-batches per rank the GPU recipes measure D_anc on (``vp2o.trust_region.anchor_micro_batches``):
#: 4 x 4096-8192 tokens x 8-64 data-parallel ranks, 130K-2M tokens per judgement.
ANCHOR_MICRO_BATCHES = 4


def fitted(cfg: Config, name: str, nodes: int) -> Config:
    """``cfg`` with the layout's memory settings (`MEMORY`)."""
    import dataclasses

    mem = MEMORY.get((name, nodes))
    if not mem:
        return cfg
    # D_anc on the first ANCHOR_MICRO_BATCHES micro-batches of each rank (of 16-128): the post-step
    # re-route costs that share of a forward instead of a whole one (bench/bench_step.py)
    tr = dataclasses.replace(cfg.vp2o.trust_region, snapshot=mem["snapshot"], anchor_micro_batches=ANCHOR_MICRO_BATCHES)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, recompute=mem["recompute"]),
        train=dataclasses.replace(cfg.train, optimizer_cpu_offload=mem.get("optimizer_cpu_offload", False)),
        vp2o=dataclasses.replace(cfg.vp2o, trust_region=tr))


RECIPES = {"tiny_cpu": tiny_cpu, "qwen3_30b_a3b": qwen3_30b_a3b, "paper_33b_a4b": paper_33b_a4b}
NODES = {"tiny_cpu": (1,), "qwen3_30b_a3b": tuple(sorted(QWEN3_LAYOUTS)), "paper_33b_a4b": tuple(sorted(PAPER_LAYOUTS))}


def get_recipe(name: str):
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def _diff(value, default):
    """The parts of a nested dict ``value`` that differ from ``default`` (tuples as lists)."""
    if isinstance(value, dict) and isinstance(default, dict):
        out = {k: _diff(v, default.get(k)) for k, v in value.items() if v != default.get(k)}
        return {k: v for k, v in out.items() if v != {}}
    return list(value) if isinstance(value, tuple) else value


def recipe_yaml(cfg: Config, header: str = "") -> str:
    """YAML of ``cfg`` with only the fields that differ from the defaults (loads back equal)."""
    import yaml

    from megatron_vp2o.config import to_dict

    body = yaml.safe_dump(_diff(to_dict(cfg), to_dict(Config())), sort_keys=False, default_flow_style=False, width=100)
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()] if header else []
    return "\n".join(lines + [body])
