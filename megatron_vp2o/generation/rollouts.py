"""What a rollout engine returns (:class:`Rollouts`) and the engine interface (:class:`RolloutEngine`).

Layout of one batch (left padding): prompts are right-aligned in ``[B, P]`` so every sequence's last
prompt token sits at column P-1 and generation writes column P+t for every row at step t. Positions
count from each sequence's first real token (``pos = max(0, col - pad_b)``): these are the positions
the generator used, and :meth:`Rollouts.training_input` hands them to training forwards so RoPE (and
hence routing) sees exactly the rollout's positions. Left-pad keys are masked in attention; tokens
written after a sequence stopped are ``pad_id``, masked out of the loss, and never attended to by
earlier tokens (causality), so they change nothing that is logged.

Routing is logged for every *input* column of the teacher-forced sequence (S = P + T - 1 columns: the
prompt, then every response token but the last), i.e. for every token that went through the model;
``topk_idx_LBTK`` selects the columns P-1 .. P+T-2 whose logits produced the response tokens.

Shape legend: B sequences, P padded prompt length, T response tokens, S = P + T - 1 input columns,
L MoE layers (all pipeline stages), K experts per token, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from megatron_vp2o.generation.sampling import SamplingConfig


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_BP, lens_B)``: prompts right-aligned in a ``pad_id``-filled ``[B, P]`` tensor on ``device``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    lens = [len(p) for p in prompts]
    rows = [[pad_id] * (max(lens) - len(p)) + list(p) for p in prompts]  # built on the host, one copy
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(lens, dtype=torch.long, device=device))


def positions_from_pads(pads_B: torch.Tensor, num_cols: int) -> torch.Tensor:
    """``pos_BS[b, s] = max(0, s - pads_B[b])``: positions count from the first real token."""
    return (torch.arange(num_cols, device=pads_B.device).unsqueeze(0) - pads_B.unsqueeze(1)).clamp_min(0)


def attention_mask(pads_B: torch.Tensor, num_q: int, num_k: int) -> torch.Tensor:
    """Bool ``[B, 1, num_q, num_k]``, True = masked: causal (queries are the last ``num_q`` columns)
    plus left-pad keys; a pad query keeps its own key so no softmax row is empty."""
    q_col = torch.arange(num_k - num_q, num_k, device=pads_B.device).view(1, 1, num_q, 1)
    k_col = torch.arange(num_k, device=pads_B.device).view(1, 1, 1, num_k)
    pad_key = k_col < pads_B.view(-1, 1, 1, 1)
    return ((k_col > q_col) | pad_key) & (k_col != q_col)


@dataclass
class TeacherForcedBatch:
    """Inputs of a training forward over the rollout (megatron's GPTModel conventions)."""
    tokens_BS: torch.Tensor  # input ids: prompt + response[:-1]
    labels_BS: torch.Tensor  # next token at every column
    positions_BS: torch.Tensor  # the rollout's positions (pass to rope_positions)
    attention_mask_B1SS: torch.Tensor  # bool, True = masked
    loss_mask_BS: torch.Tensor  # 1.0 on columns whose label is a generated (unmasked) response token


@dataclass
class Rollouts:
    prompt_ids_BP: torch.Tensor  # left-padded prompts (pad_id)
    prompt_lens_B: torch.Tensor  # real prompt lengths
    response_ids_BT: torch.Tensor  # generated tokens, pad_id after a stop token
    response_mask_BT: torch.Tensor  # 1.0 for generated tokens up to and including the stop token
    logp_BT: torch.Tensor  # behaviour log-prob log mu (sampling.sampling_logprobs), 0 where masked
    positions_BS: torch.Tensor  # positions of the S input columns, as used by the generator
    topk_idx_LBSK: torch.Tensor  # per MoE layer, experts chosen at every input column (by gate, descending)
    gates_LBSK: torch.Tensor  # their gates renormalised over the top-k (sum 1 per token)
    finish_reason: list[str]  # "stop" (a stop token) or "length" (max_new_tokens) per sequence
    sampling: SamplingConfig
    pad_id: int
    vocab_size: int | None = None  # real vocabulary (padded logits beyond it are -inf)
    moe_layers: list[int] = field(default_factory=list)  # global layer numbers of the L MoE layers
    engine_logp_BT: torch.Tensor | None = None  # the sampling engine's own log-probs where they differ from
    # logp_BT (vLLM: logp_BT is the learner's recomputation); None: the engine's are logp_BT (megatron engine)

    @property
    def engine_logp(self) -> torch.Tensor:
        """The sampling engine's log-probs of the response tokens ``[B, T]`` (``logp_BT`` when not kept apart)."""
        return self.logp_BT if self.engine_logp_BT is None else self.engine_logp_BT

    @property
    def pads_B(self) -> torch.Tensor:
        return self.prompt_ids_BP.shape[1] - self.prompt_lens_B

    @property
    def response_cols(self) -> slice:
        """Input columns whose logits produced the response tokens (P-1 .. P+T-2)."""
        p = self.prompt_ids_BP.shape[1]
        return slice(p - 1, p - 1 + self.response_ids_BT.shape[1])

    @property
    def topk_idx_LBTK(self) -> torch.Tensor:
        return self.topk_idx_LBSK[:, :, self.response_cols]

    @property
    def gates_LBTK(self) -> torch.Tensor:
        return self.gates_LBSK[:, :, self.response_cols]

    def sequences(self) -> list[list[int]]:
        """Each prompt + response without padding (the text a reward function scores)."""
        out = []
        for b in range(self.prompt_ids_BP.shape[0]):
            prompt = self.prompt_ids_BP[b, int(self.pads_B[b]):]
            resp = self.response_ids_BT[b, self.response_mask_BT[b] > 0]
            out.append(torch.cat([prompt, resp]).tolist())
        return out

    def training_input(self) -> TeacherForcedBatch:
        """Teacher-forced input over the same columns, positions and mask as the generation."""
        full_BS1 = torch.cat([self.prompt_ids_BP, self.response_ids_BT], dim=1)
        s = full_BS1.shape[1] - 1
        loss_mask_BS = torch.zeros(full_BS1.shape[0], s, device=full_BS1.device)
        loss_mask_BS[:, self.response_cols] = self.response_mask_BT.float()
        return TeacherForcedBatch(full_BS1[:, :-1], full_BS1[:, 1:], self.positions_BS,
                                  attention_mask(self.pads_B, s, s), loss_mask_BS)


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns prompts into :class:`Rollouts`: :class:`MegatronEngine` here; later an external
    server (vLLM / SGLang) after a weight refit. It must log ``logp_BT`` with ``sampling_logprobs``'s
    definition and routing in the layout above, or the learner's ratios and anchors are meaningless."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Rollouts:
        ...
