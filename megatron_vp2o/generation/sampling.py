"""Sampling for rollouts: the config, the filtered distribution, and the behaviour log-prob.

One function, :func:`sampling_logprobs`, defines the distribution a rollout token is drawn from, and
both the generator (behaviour log-prob mu) and the learner (``teacher_forced_logprobs``) call it, so
the importance ratio pi/mu compares like with like:

    z = logits / T;  z[v] = -inf for v outside top-k(z) or outside the top-p nucleus of softmax(z)
    log mu(v) = log_softmax(z)[v]            (the distribution actually sampled from)

Departures from the textbook: (1) padded vocabulary rows (ids >= vocab_size) are -inf before anything;
(2) T == 0 means greedy decoding (argmax of the raw logits); its sampling distribution is a point
mass, so we log log_softmax(raw logits) instead (temperature 1, no filter) -- greedy rollouts are for
evaluation, not for importance-weighted RL; (3) top-p keeps the smallest prefix of the sorted
distribution whose mass reaches p (always at least one token), computed after top-k, as in HF.

The log-prob of a *given* token (:func:`token_logprobs`: the learner, teacher-forced rescoring, the
reference policy) is the filtered distribution where that is well defined, i.e. where the token is
inside the scoring model's own top-k/top-p set N:

    log pi(v) = z_v - logsumexp_{u in N} z_u                    if v in N   (exactly log_softmax above)
    log pi(v) = z_v - logsumexp_{u in N + {v}} z_u              if v not in N

Outside N the filtered probability is 0 and its log -inf (a token the actor sampled from *its*
nucleus can fall outside the learner's once the two differ); we then score it under the filtered
distribution with its support extended by that one token. It is finite, continuous where the token
enters N, and gives the token a gradient, so the importance ratio, the k3 drift D_beh and the ESS
(method §2.11) stay finite instead of forcing a refresh every step. The actor's own samples are always
inside its N, so its behaviour log-prob mu is unchanged.

Shape legend: B sequences, V vocabulary (padded), T response tokens.
"""

from __future__ import annotations

import torch

from megatron_vp2o.config.rl import SamplingConfig




def mask_padded_vocab(logits_XV: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """-inf on padded vocabulary entries (megatron pads V to a multiple of 8 x tp)."""
    if vocab_size is None or vocab_size >= logits_XV.shape[-1]:
        return logits_XV
    logits_XV = logits_XV.clone()
    logits_XV[..., vocab_size:] = float("-inf")
    return logits_XV


def filter_logits(logits_XV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Tempered logits with top-k / top-p exclusions set to -inf (identity filter when greedy)."""
    logits_XV = logits_XV.float()
    if cfg.greedy:
        return logits_XV
    z_XV = logits_XV / cfg.temperature
    if cfg.top_k and cfg.top_k < z_XV.shape[-1]:
        _, keep_XK = z_XV.topk(cfg.top_k, dim=-1)
        keep_XV = torch.zeros_like(z_XV, dtype=torch.bool).scatter_(-1, keep_XK, True)
        z_XV = z_XV.masked_fill(~keep_XV, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_XV, order_XV = z_XV.sort(dim=-1, descending=True)
        probs_XV = sorted_XV.softmax(-1)
        mass_before_XV = probs_XV.cumsum(-1) - probs_XV  # mass strictly before each token
        drop_sorted_XV = mass_before_XV >= cfg.top_p
        drop_sorted_XV[..., 0] = False
        drop_XV = torch.zeros_like(drop_sorted_XV).scatter_(-1, order_XV, drop_sorted_XV)
        z_XV = z_XV.masked_fill(drop_XV, float("-inf"))
    return z_XV


def sampling_logprobs(logits_XV: torch.Tensor, cfg: SamplingConfig, vocab_size: int | None = None) -> torch.Tensor:
    """log mu over the vocabulary: log_softmax of the filtered, tempered logits (see module doc)."""
    return torch.log_softmax(filter_logits(mask_padded_vocab(logits_XV, vocab_size), cfg), dim=-1)


def token_logprobs(logits_XV: torch.Tensor, tokens_X: torch.Tensor, cfg: SamplingConfig,
                   vocab_size: int | None = None) -> torch.Tensor:
    """log pi(token) per row under the filtered distribution, its support extended by the token
    when the filter drops it (module doc); equals ``sampling_logprobs(...)`` gathered at
    ``tokens_X`` wherever that is finite."""
    logits_XV = mask_padded_vocab(logits_XV, vocab_size)
    idx_X1 = tokens_X.unsqueeze(-1)
    if cfg.greedy:
        return torch.log_softmax(logits_XV.float(), dim=-1).gather(-1, idx_X1).squeeze(-1)
    z_XV = filter_logits(logits_XV, cfg)
    raw_X = (logits_XV.float() / cfg.temperature).gather(-1, idx_X1).squeeze(-1)
    lse_X = torch.logsumexp(z_XV, dim=-1)
    inside_X = torch.isfinite(z_XV.gather(-1, idx_X1).squeeze(-1))
    return torch.where(inside_X, raw_X - lse_X, raw_X - torch.logaddexp(lse_X, raw_X))


def sample(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
           vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; returns ``(tokens_B, logp_B)`` with logp as defined in the module doc."""
    logp_BV = sampling_logprobs(logits_BV, cfg, vocab_size)
    if cfg.greedy:
        tokens_B = logp_BV.argmax(-1)
    else:
        tokens_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    return tokens_B, logp_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1)
