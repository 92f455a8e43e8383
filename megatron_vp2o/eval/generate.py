"""Generation for evaluation: n samples per problem with our rollout engine, independent of layout.

Sampling is a function of (seed, problem index) only, so 1 rank and torchrun EP=2 (or any other
layout) produce the same texts: every problem's n samples are one ``generate`` call of n rows (no
left padding, no other problem in the batch), seeded with :func:`problem_seed`, on an engine whose
generator is *not* offset by the data-parallel rank (:class:`EvalEngine`; the training actors'
engine offsets it so that ranks draw different samples). Problems are dealt round-robin to the
data-parallel ranks; every rank makes the same number of calls (a rank out of problems repeats its
last one and drops the result), because expert-parallel forwards need every rank of the group; the
texts are gathered over the data-parallel group.

Prompts go through the tokenizer's chat template where it has one (``generation.prompts.apply_chat_template``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_vp2o.device import device
from megatron_vp2o.generation.prompts import apply_chat_template
from megatron_vp2o.generation import MegatronEngine


class EvalEngine(MegatronEngine):
    """The rollout engine with one sampling stream per call, the same on every rank."""

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=device()).manual_seed(seed)


def problem_seed(seed: int, index: int) -> int:
    """The sampling seed of problem ``index`` (fits torch's 64-bit seed)."""
    return (seed * 1_000_003 + index * 7_919) % (1 << 62)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of every prompt: through the chat template where the tokenizer has one (encoded
    without added special tokens), else ``encode_prompt`` (BOS + text, as RL prompts). A prompt the
    tokenizer cannot encode is a :class:`~megatron_vp2o.eval.tasks.DataError` naming it."""
    from megatron_vp2o.eval.tasks import DataError

    out = []
    for i, prompt in enumerate(prompts):
        try:
            text = apply_chat_template(tokenizer, prompt)
            # a rendered chat template carries its own special tokens (as HF's tokenize=True: none added)
            out.append(tokenizer.encode(text) if text != prompt else tokenizer.encode_prompt(prompt))
        except ValueError as err:
            raise DataError(f"problem {i}: the tokenizer cannot encode its prompt ({err}); "
                            "use --template or a tokenizer that covers the data") from None
    return out


def _dp() -> tuple[int, int]:
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def generate_samples(engine, tokenizer, prompt_ids: list[list[int]], samples: int, sampling,
                     seed: int) -> list[list[str]]:
    """The ``samples`` response texts of every problem (stop token dropped), the same on every rank."""
    dp, rank = _dp()
    stop = tuple(sampling.stop_token_ids) or (tokenizer.eos_id,)
    mine = list(range(rank, len(prompt_ids), dp))
    calls = math.ceil(len(prompt_ids) / dp)
    local = {}
    for c in range(calls):
        index = mine[min(c, len(mine) - 1)] if mine else 0
        cfg = dataclasses.replace(sampling, seed=problem_seed(seed, index), stop_token_ids=stop)
        rollouts = engine.generate([prompt_ids[index]] * samples, cfg)
        if c < len(mine):
            local[index] = _decode(rollouts, tokenizer, stop)
    parts = [None] * dp
    if dp > 1:
        dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    else:
        parts = [local]
    merged = {k: v for part in parts for k, v in part.items()}
    return [merged[i] for i in range(len(prompt_ids))]


def _decode(rollouts, tokenizer, stop: tuple) -> list[str]:
    out = []
    for b in range(rollouts.response_ids_BT.shape[0]):
        ids = rollouts.response_ids_BT[b, rollouts.response_mask_BT[b] > 0].tolist()
        out.append(tokenizer.decode([i for i in ids if i not in stop]))
    return out
