"""Rollouts on the megatron model itself: batched KV-cached decoding in every trainer layout.

:class:`MegatronEngine` drives a bare ``GPTModel`` chunk (unwrapped from DDP) with megatron-core's
``StaticInferenceContext``: one prefill forward over the left-padded prompts, then one forward per new
token, the cache offset advanced after each (see rollouts.py for the padding / position scheme and
routing.py for the hooks). Parallel layouts:

* DP (attention data parallel, which includes EP's ranks): every rank generates for its own prompts
  with its own sampling generator (seed + 1000003 * dp rank); ranks keep stepping (with pad tokens)
  until every rank is done -- one scalar all-reduce per step -- because EP's all-to-all needs every
  rank of the expert group in every forward.
* TP: all ranks of a replica step together; logits are vocab-gathered, and the sampled tokens are
  broadcast from the TP source rank so the replicas cannot diverge. Sequence parallelism is switched
  off outside the MoE layers while generating (a 1-token step cannot be split over the sequence), as
  megatron's own static engine does; the MoE layers then see replicated tokens and still compute the
  same result.
* PP: a forward-only pipeline per step: each stage receives the previous stage's hidden states
  (``[S_step, B, H]``, point-to-point), runs its layers with its own KV cache and sends on; the last
  stage samples and broadcasts the tokens (and log-probs) to all stages. Routing logged on each stage
  is all-gathered over the pipeline group so every rank returns the same full :class:`Rollouts`.

:func:`teacher_forced_logprobs` is the learner's side: one full forward over the rollout's columns,
positions and mask (optionally replaying its routing, R3) giving the same per-token log-probs and
routing. It keeps autograd when PP == 1; with PP it is forward-only (the trainer's pipeline
schedule owns backward there).

Shape legend: B sequences, P padded prompt length, T response tokens, S columns, V vocabulary
(padded), H hidden, L MoE layers, K top-k.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from megatron_vp2o.device import device
from megatron_vp2o.generation.rollouts import Rollouts, attention_mask, left_pad, positions_from_pads
from megatron_vp2o.generation.routing import RoutingCapture, replay_routing, rope_positions
from megatron_vp2o.generation.sampling import SamplingConfig, sample, token_logprobs


def _pp() -> tuple[bool, bool, int]:
    return ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), ps.get_pipeline_model_parallel_world_size()


def stage_forward(model, ids_BS, pos_BS, mask, ctx, hidden: int, dtype) -> torch.Tensor | None:
    """One forward of this pipeline stage; returns logits ``[B, S', V]`` on the last stage, else None."""
    first, last, pp = _pp()
    b, s = ids_BS.shape
    if not first:
        recv_SBH = torch.empty(s, b, hidden, dtype=dtype, device=ids_BS.device)
        dist.recv(recv_SBH, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(recv_SBH)
    kwargs = {"inference_context": ctx} if ctx is not None else {}
    out = model(ids_BS, pos_BS, mask, runtime_gather_output=True, **kwargs)
    if not last:
        dist.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """Broadcast a last-stage tensor to every stage (same shape and dtype expected on all)."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


def _gather_stages(idx_LBSK: torch.Tensor, gates_LBSK: torch.Tensor, layers: list[int]):
    """All MoE layers' routing on every stage (object all-gather over the pipeline group)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return idx_LBSK, gates_LBSK, layers
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, (idx_LBSK, gates_LBSK, layers), group=ps.get_pipeline_model_parallel_group())
    parts = [p for p in parts if p[2]]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), [n for p in parts for n in p[2]])


@contextlib.contextmanager
def inference_mode(model):
    """eval + no_grad, and sequence parallelism off outside the MoE layers (restored on exit).

    On CPU the platform layer's device-rewriting ``TorchFunctionMode`` is suspended while decoding: it
    costs ~40% of a tiny model's step, and no call on the decoding path needs it (KV buffers and router
    weights use ``torch.cuda.current_device()``, which the platform answers with the CPU without the mode).
    """
    was_training, sp = model.training, model.config.sequence_parallel
    model.eval()
    if sp:
        set_model_to_sequence_parallel(model, False, exclude_modules=[BaseMoELayer])
    no_mode = torch._C.DisableTorchFunction() if not torch.cuda.is_available() else contextlib.nullcontext()
    try:
        with torch.no_grad(), no_mode:
            yield
    finally:
        if sp:
            set_model_to_sequence_parallel(model, True, exclude_modules=[BaseMoELayer])
        model.train(was_training)


@dataclass
class _State:
    tokens_BT: list  # sampled token columns
    logp_BT: list
    logits_BTV: list
    active_B: torch.Tensor
    finish: list


class MegatronEngine:
    """:class:`~megatron_vp2o.generation.rollouts.RolloutEngine` on a megatron ``GPTModel`` chunk."""

    def __init__(self, model, pad_id: int, vocab_size: int | None = None, use_cache: bool = True,
                 keep_logits: bool = False):
        self.model, self.pad_id, self.vocab_size = model, pad_id, vocab_size
        self.use_cache = use_cache  # False: full forward over all columns every step (benchmark baseline)
        self.keep_logits = keep_logits  # also return every step's logits (tests)
        self.last_logits_BTV: torch.Tensor | None = None

    def _generator(self, seed: int) -> torch.Generator:
        # on the model's device: torch.multinomial on CUDA takes a CUDA generator
        return torch.Generator(device=device()).manual_seed(seed + 1000003 * ps.get_data_parallel_rank())

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Rollouts:
        cfg = self.model.config
        ids_BP, lens_B = left_pad(prompts, self.pad_id, device())
        (b, p), t_max = ids_BP.shape, sampling.max_new_tokens
        pads_B = p - lens_B
        pos_BS = positions_from_pads(pads_B, p + t_max)
        ctx = StaticInferenceContext(b, p + t_max) if self.use_cache else None
        gen, st = self._generator(sampling.seed), _State([], [], [], torch.ones(b, dtype=torch.bool, device=ids_BP.device), ["length"] * b)
        capture = RoutingCapture(self.model)
        cols_BS = torch.cat([ids_BP, ids_BP.new_full((b, t_max), self.pad_id)], dim=1)  # filled column by column
        # decoding steps read rows of it (views); no left padding: plain causal attention, no mask at all
        mask_B1SS = attention_mask(pads_B, p + t_max, p + t_max) if bool((pads_B > 0).any()) else None
        with inference_mode(self.model), rope_positions(self.model, pos_BS), capture:
            for step in range(t_max):
                n = p + step
                if ctx is not None and step > 0:
                    inp_BS, rows, capture.keep_last = cols_BS[:, n - 1:n], slice(n - 1, n), None
                else:
                    inp_BS, rows, capture.keep_last = cols_BS[:, :n], slice(0, n), (None if step == 0 else 1)
                mask = None if mask_B1SS is None else mask_B1SS[:, :, rows, :n]
                logits = stage_forward(self.model, inp_BS, pos_BS[:, n - inp_BS.shape[1]:n], mask, ctx,
                                       cfg.hidden_size, cfg.params_dtype)
                if ctx is not None:
                    ctx.increment_sequence_len_offset(inp_BS.shape[1])
                cols_BS[:, n] = self._sample_step(logits, sampling, gen, st, b)
                if not self._any_active(st.active_B):
                    break
        return self._finish(ids_BP, lens_B, pos_BS, st, capture, sampling)

    def _sample_step(self, logits, sampling, gen, st: _State, b: int) -> torch.Tensor:
        dev = st.active_B.device
        tok_B, logp_B = torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, device=dev)
        if logits is not None:
            last_BV = logits[:, -1].float()
            tok_B, logp_B = sample(last_BV, sampling, gen, self.vocab_size)
            if self.keep_logits:
                st.logits_BTV.append(last_BV)
        if ps.get_tensor_model_parallel_world_size() > 1:
            for t in (tok_B, logp_B):
                dist.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
        tok_B, logp_B = _from_last_stage(tok_B), _from_last_stage(logp_B)
        tok_B = torch.where(st.active_B, tok_B, torch.full_like(tok_B, self.pad_id))
        st.tokens_BT.append(tok_B)
        st.logp_BT.append(torch.where(st.active_B, logp_B, torch.zeros_like(logp_B)))
        stopped_B = st.active_B & torch.isin(tok_B, torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=tok_B.device))
        for i in stopped_B.nonzero().flatten().tolist():
            st.finish[i] = "stop"
        st.active_B = st.active_B & ~stopped_B
        return tok_B

    @staticmethod
    def _any_active(active_B: torch.Tensor) -> bool:
        flag = active_B.any().to(torch.int32).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _finish(self, ids_BP, lens_B, pos_BS, st: _State, capture: RoutingCapture, sampling) -> Rollouts:
        resp_BT = torch.stack(st.tokens_BT, dim=1)
        t = resp_BT.shape[1]
        # a token is in the response if the sequence was still active when it was sampled
        mask_BT = torch.ones_like(resp_BT, dtype=torch.float)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=resp_BT.device)
        stopped_BT = torch.isin(resp_BT, stop_ids).long().cumsum(1)
        mask_BT[(stopped_BT - torch.isin(resp_BT, stop_ids).long()) > 0] = 0.0
        idx, gates = capture.stacked()
        s = ids_BP.shape[1] + t - 1
        idx, gates, layers = _gather_stages(idx[:, :, :s], gates[:, :, :s], capture.layers)
        self.last_logits_BTV = torch.stack(st.logits_BTV, 1) if st.logits_BTV else None
        return Rollouts(ids_BP, lens_B, resp_BT, mask_BT, torch.stack(st.logp_BT, 1) * mask_BT, pos_BS[:, :s],
                        idx, gates, st.finish, sampling, self.pad_id, self.vocab_size, layers)


@dataclass
class TeacherForced:
    logp_BT: torch.Tensor  # log mu-definition log-probs of the response tokens (0 where masked)
    topk_idx_LBSK: torch.Tensor  # this forward's routing (all stages)
    gates_LBSK: torch.Tensor
    logits_BTV: torch.Tensor | None  # logits at the response columns (last stage; None elsewhere)
    replay_agreement: list  # (layer, fraction of tokens whose own top-k equals the replayed one) under R3


def teacher_forced_logprobs(model, rollouts: Rollouts, temperature: float | None = None, replay: bool = False,
                            min_agreement: float | None = 0.5) -> TeacherForced:
    """Per-token log-probs (``sampling_logprobs`` definition, at ``temperature`` or the rollout's) and
    routing from one full forward over the rollout's tokens, positions and attention mask."""
    sampling = rollouts.sampling if temperature is None else dataclasses.replace(rollouts.sampling,
                                                                                 temperature=temperature)
    batch = rollouts.training_input()
    tokens_BS, pos_BS, mask = batch.tokens_BS, batch.positions_BS, batch.attention_mask_B1SS
    s = tokens_BS.shape[1]
    tp = ps.get_tensor_model_parallel_world_size()
    extra = (-s) % tp if model.config.sequence_parallel else 0  # SP splits the sequence: pad to a multiple of tp
    if extra:
        tokens_BS = torch.cat([tokens_BS, tokens_BS.new_full((tokens_BS.shape[0], extra), rollouts.pad_id)], 1)
        pos_BS = torch.cat([pos_BS, pos_BS[:, -1:] + torch.arange(1, extra + 1, device=pos_BS.device)], 1)
        mask = attention_mask(rollouts.pads_B, s + extra, s + extra)
    routing = rollouts.topk_idx_LBSK
    if extra:
        routing = torch.cat([routing, routing[:, :, :1].expand(-1, -1, extra, -1)], dim=2)
    capture = RoutingCapture(model)
    replayer = replay_routing(model, routing, rollouts.moe_layers, min_agreement) if replay else contextlib.nullcontext([])
    with rope_positions(model, pos_BS), capture, replayer as agreement:
        logits = stage_forward(model, tokens_BS, pos_BS, mask, None, model.config.hidden_size, model.config.params_dtype)
    cols = rollouts.response_cols
    b, t = rollouts.response_ids_BT.shape
    logp_BT, logits_BTV = torch.zeros(b, t, device=tokens_BS.device), None
    if logits is not None:
        logits_BTV = logits[:, cols].float()
        logp_BT = token_logprobs(logits_BTV, rollouts.response_ids_BT, sampling, rollouts.vocab_size)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        logp_BT = _from_last_stage(logp_BT.detach().contiguous())
    idx, gates = capture.stacked()
    idx, gates, _ = _gather_stages(idx[:, :, :s], gates[:, :, :s], capture.layers)
    return TeacherForced(logp_BT * rollouts.response_mask_BT, idx, gates, logits_BTV, list(agreement))
