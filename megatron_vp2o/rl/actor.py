"""The actor side of the RL loop: prompts -> rollouts -> rewards -> group advantages.

Actors hold the behaviour snapshot mu. In one process they *are* the learner's model at the last
refresh: a refresh regenerates with the current weights (``MegatronEngine`` on the same module).
Everything the learner needs from them crosses one boundary, :class:`ActorBatch` (rollouts with
their logged log-probs and routing, rewards, advantages), so separate actor processes (or a vLLM /
SGLang engine implementing ``RolloutEngine``) can produce it later.

Prompt order: refresh r takes a seeded permutation slice of the prompt set (the data position is
r); each data-parallel rank takes its own prompts, each repeated G times (whole groups per rank, so
group advantages are local). Sampling seeds are ``seed + r`` (offset per rank by the engine), so a
resumed run regenerates nothing differently.

Shape legend: B sequences on this rank (prompts x G), G group size, T response tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_vp2o.device import device
from megatron_vp2o.algo import grpo
from megatron_vp2o import rewards as reward_registry
from megatron_vp2o.generation.prompts import PromptRecord
from megatron_vp2o.generation.rollouts import Rollouts


@dataclass
class ActorBatch:
    records: list  # PromptRecord per sequence (prompt repeated G times)
    rollouts: Rollouts
    texts: list  # decoded responses
    rewards_B: torch.Tensor
    adv_B: torch.Tensor
    correct_B: torch.Tensor  # reward >= 1 (pass@1 numerator)
    canonical: list  # canonical correct answer per sequence (None if incorrect)
    failures: int  # reward calls recorded as failures
    refresh_index: int
    logp_ref_BT: torch.Tensor | None = None  # frozen reference policy's log-probs (KL penalty), set by the learner


def select_prompts(records: list[PromptRecord], refresh_index: int, per_step: int, seed: int) -> list[PromptRecord]:
    """This data-parallel rank's prompts for refresh ``refresh_index`` (epochs reshuffled)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if per_step % dp:
        raise ValueError(f"rl.prompts_per_step={per_step} must be divisible by the data-parallel size {dp}")
    n, start, out = len(records), refresh_index * per_step, []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        gen = torch.Generator(device="cpu").manual_seed(seed + 7919 * epoch)  # host: prompt order
        perm = torch.randperm(n, generator=gen, device="cpu").tolist()
        out.extend(perm[offset: offset + per_step - len(out)])
    mine = out[rank * (per_step // dp):(rank + 1) * (per_step // dp)]
    return [records[i] for i in mine]


def generate(engine, tokenizer, records: list[PromptRecord], group: int, sampling, seed: int):
    prompts = [tokenizer.encode_prompt(r.prompt) for r in records for _ in range(group)]
    sampling = dataclasses.replace(sampling, seed=seed, stop_token_ids=tuple(sampling.stop_token_ids) or (tokenizer.eos_id,))
    rollouts = engine.generate(prompts, sampling)
    texts = []
    for b in range(rollouts.response_ids_BT.shape[0]):
        ids = rollouts.response_ids_BT[b, rollouts.response_mask_BT[b] > 0].tolist()
        texts.append(tokenizer.decode([i for i in ids if i not in sampling.stop_token_ids]))
    return rollouts, texts


def score(records: list[PromptRecord], texts: list[str], timeout_s: float):
    """Rewards per sequence (failures recorded, never raised), canonical correct answers."""
    by_task = defaultdict(list)
    for i, rec in enumerate(records):
        by_task[rec.task].append(i)
    rewards_B, failures, canonical = torch.zeros(len(records), device="cpu"), 0, [None] * len(records)  # host
    for task, idx in by_task.items():
        scores = reward_registry.score_batch(task, [records[i].prompt for i in idx], [texts[i] for i in idx],
                                             [records[i].reward_meta() for i in idx], timeout_s=timeout_s)
        failures += scores.num_failed
        for i, s in zip(idx, scores.scores):
            rewards_B[i] = s if math.isfinite(s) else 0.0
            if s >= 1.0:
                canonical[i] = reward_registry.canonical_answer(task, texts[i], records[i].reward_meta(),
                                                                records[i].prompt)
    return rewards_B.to(device()), canonical, failures


def act(engine, tokenizer, prompt_set, cfg, refresh_index: int, seed: int, per_step: int | None = None,
        group: int | None = None) -> ActorBatch:
    """One refresh's worth of experience on this rank (``per_step`` prompts x ``group`` samples)."""
    rl = cfg.rl
    group = group or rl.policy_loss.group_size
    chosen = select_prompts(prompt_set, refresh_index, per_step or rl.prompts_per_step, seed)
    rollouts, texts = generate(engine, tokenizer, chosen, group, rl.sampling, seed + refresh_index)
    records = [r for r in chosen for _ in range(group)]
    rewards_B, canonical, failures = score(records, texts, rl.reward_timeout_s)
    estimator = grpo.ADVANTAGES.get(rl.policy_loss.advantage)
    adv_B = estimator(rewards_B.view(-1, group), eps=rl.policy_loss.adv_eps).reshape(-1)
    return ActorBatch(records, rollouts, texts, rewards_B, adv_B, rewards_B >= 1.0, canonical, failures,
                      refresh_index)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def reward_metrics(batch: ActorBatch, group: int, prefix: str = "reward") -> dict:
    """Mean reward, pass@1, unbiased pass@k (k = G/2), distinct correct answers per prompt, mean
    response length, failures: summed over DP ranks. Also ``rollout/new_samples`` and
    ``rollout/new_tokens`` (responses and response tokens of this batch, all ranks)."""
    n_prompts, k = batch.rewards_B.numel() // group, max(group // 2, 1)
    distinct = sum(len({c for c in batch.canonical[p * group:(p + 1) * group] if c is not None})
                   for p in range(n_prompts))
    correct_P = batch.correct_B.view(n_prompts, group).sum(-1).tolist() if n_prompts else []
    pass_k = sum(pass_at_k(group, int(c), k) for c in correct_P)
    tokens = float(batch.rollouts.response_mask_BT.sum())
    sums = torch.tensor([float(batch.rewards_B.sum()), float(batch.correct_B.sum()), float(distinct),
                         float(batch.failures), float(batch.rewards_B.numel()), float(n_prompts), pass_k, tokens],
                        dtype=torch.float64, device=device())  # all-reduced (NCCL: on the device)
    owner = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
    sums = sums * float(owner)
    dist.all_reduce(sums)
    total, prompts = max(sums[4].item(), 1.0), max(sums[5].item(), 1.0)
    return {f"{prefix}/mean": sums[0].item() / total, f"{prefix}/pass_at_1": sums[1].item() / total,
            f"{prefix}/pass_at_{k}": sums[6].item() / prompts,
            f"{prefix}/distinct_correct": sums[2].item() / prompts, f"{prefix}/failed": sums[3].item(),
            f"{prefix}/response_len": sums[7].item() / total,
            "rollout/new_samples": sums[4].item(), "rollout/new_tokens": sums[7].item()}
