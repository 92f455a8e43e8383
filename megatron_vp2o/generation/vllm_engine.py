"""Rollouts on vLLM: a :class:`~megatron_vp2o.generation.rollouts.RolloutEngine` colocated with each rank.

What: :class:`VLLMEngine` runs a vLLM ``LLM`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; no
tokenizer: prompts go in as token ids, ``TokensPrompt``) on the model's Hugging Face architecture (the
config.json that ``vp2o convert mcore-to-hf`` writes for it, weights left as vLLM's dummy init) and
returns the same :class:`Rollouts` as :class:`MegatronEngine`: left-padded prompts, responses padded with
``pad_id`` after a stop token, the response mask, the sampled tokens' log-probs and the positions. The
weights come from the learner through :mod:`megatron_vp2o.generation.weight_sync` (:meth:`load_weights`).
Why: paged KV cache, continuous batching and (on GPU) CUDA graphs make rollouts, most of an RL step, faster
than the megatron engine's static cache (2x+ on CPU, bench/bench_rollout.py).

Sampling, one to one: temperature (0 = greedy), top_p, top_k (0 = off), max_new_tokens, stop ids (the stop
token is kept in the response, as the megatron engine does; the HF config's EOS is ignored, only
``stop_token_ids`` stop). Log-probs are vLLM's ``processed_logprobs``: log_softmax of the tempered,
top-k/top-p-filtered logits (after the padded-vocabulary mask), i.e. ``sampling.sampling_logprobs``'s
definition (greedy: the raw log-softmax, as ours); top-p/top-k ties may be broken differently.
Padded vocabulary: ids >= ``vocab_size`` are excluded with ``allowed_token_ids`` when the model's
vocabulary is larger.

Seeding: a per-request ``SamplingParams(seed=...)`` fails on vLLM's CPU backend, and without one vLLM's
sampler draws from torch's global generator. Each :meth:`generate` therefore seeds that generator with
``sampling.seed + 1000003 * dp_rank`` (the megatron engine's rule; the RL loop passes ``seed + refresh``)
inside ``torch.random.fork_rng``, so the trainer's own random state is untouched and a seeded run repeats
exactly (all prompts of a call are scheduled together, in order). On GPU each request gets its own seed
(``seed + 1000003 * dp_rank + i``).

Routing: vLLM reports routed experts (``enable_return_routed_experts``) only with its model runner V2,
which needs Triton: GPU only. On CPU the rollouts carry no routing (L = 0 layers); the learner's own
forward over the rollouts (:func:`learner_behaviour`) gives the routing and behaviour log-probs used by
VP2O and GRPO, and vLLM's log-probs stay for the mismatch metrics.

Engines over several ranks (``rl.vllm.tp`` > 1): ``tp`` consecutive ranks of the trainer's world form
one vLLM engine, tensor- (and with ``rl.vllm.ep``, expert-) parallel over those ranks, through vLLM's
``external_launcher`` executor: each rank is one of the engine's workers, in its own process, on the
process group torchrun made (gloo on CPU, NCCL on GPU). A Qwen3-30B-A3B engine over a node's 8 GPUs holds
1/8 of the model per GPU where an engine per rank would hold all of it. Each rank loads the full HF
tensors of a refresh and vLLM's loaders keep its shard (the in-process path of weight_sync.py).
The prompts are shared through an :class:`EnginePool` whenever an engine spans several ranks or ranks share
a data-parallel rank (a learner with tp, pp or cp > 1): every data-parallel rank's prompts once, split
evenly over the engines, whose first ranks share the completions; each rank gets the completions of its
own prompts, so every rank of a data-parallel rank (every pipeline stage) holds the same rollouts and
the shapes are those a per-rank engine gives. The sampling seed is offset by the engine's index instead
of the data-parallel rank.

GPU: vLLM's sleep mode (``sleep()`` / ``wake_up()`` around learner steps) frees its weights and KV cache
while the learner runs.
Shape legend: B sequences, P padded prompt length, T response tokens, S = P + T - 1 columns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile

import torch

from megatron_vp2o import platform
from megatron_vp2o.generation.rollouts import Rollouts, left_pad, positions_from_pads
from megatron_vp2o.config.rl import VLLMConfig
from megatron_vp2o.generation.sampling import SamplingConfig

_KEPT_ALIVE: list = []  # closed engines of a torchrun world (VLLMEngine.close)
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "0", "TOKENIZERS_PARALLELISM": "false"}


def cuda() -> bool:
    return torch.cuda.is_available()


def _dp_rank() -> int:
    try:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return 0


def _shares_data() -> bool:
    """Whether ranks of this world share a data-parallel rank (learner tp, pp or cp > 1)."""
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            return False
        return ps.get_data_parallel_world_size() != dist.get_world_size()
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return False


@dataclasses.dataclass
class Completion:
    """One request's result, as plain data (it crosses ranks in an :class:`EnginePool`)."""

    token_ids: list
    logprobs: list  # the sampled tokens' log-probs
    finish_reason: str
    routed_experts: object = None  # [tokens, layers, K] (GPU, rl.vllm.routed_experts) or None

    @classmethod
    def of(cls, out) -> "Completion":
        ids = list(out.token_ids)
        return cls(ids, [lp[tok].logprob for tok, lp in zip(ids, out.logprobs)], out.finish_reason,
                   getattr(out, "routed_experts", None))


@dataclasses.dataclass
class EnginePool:
    """The vLLM engines of a torchrun world and how a step's prompts are shared among them.

    ``rl.vllm.tp`` consecutive ranks form one engine (``index``; ``engines`` in the world). Each call
    gathers every data-parallel rank's prompts once (ranks of one data-parallel rank, the learner's tp /
    pp / cp ranks, send the same ones), in data-parallel order, and splits that list evenly over the
    engines; an engine's ranks run the same requests, its first rank (``leader``) shares the results, and
    every rank keeps the completions of its own prompts. Built only when something must be shared: an
    engine over several ranks, or ranks that share a data-parallel rank."""

    size: int
    index: int
    engines: int
    leader: bool
    group: object  # gloo, over the world

    @classmethod
    def build(cls, size: int, shares_data: bool) -> "EnginePool | None":
        """None when every rank is an engine of its own prompts; collective otherwise."""
        if size == 1 and not shares_data:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError(f"rl.vllm.tp={size}: an engine over several ranks needs a torchrun world "
                             "(launch with torchrun, or set rl.vllm.tp=1)")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % size:
            raise ValueError(f"rl.vllm.tp={size} must divide the world size ({world}): set rl.vllm.tp to a "
                             "divisor of the ranks, e.g. the GPUs per node")
        return cls(size, rank // size, world // size, rank % size == 0, dist.new_group(backend="gloo"))

    def _gather(self, item) -> list:
        import torch.distributed as dist

        got: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(got, item, group=self.group)
        return got

    def split(self, data_rank: int, prompts: list, seed: int) -> tuple[list, slice, slice, int]:
        """(this engine's requests, their slice of the step's list, this rank's prompts' slice, the seed
        every engine samples with: the lowest data-parallel rank's, since an engine's ranks must draw
        alike and callers may pass each rank its own seed, as ``vp2o eval`` does per problem)."""
        everyone = sorted(self._gather((data_rank, [list(p) for p in prompts], seed)), key=lambda x: x[0])
        seen, flat, mine = set(), [], slice(0, 0)
        for rank_data, rank_prompts, _ in everyone:
            if rank_data in seen:
                continue
            seen.add(rank_data)
            if rank_data == data_rank:
                mine = slice(len(flat), len(flat) + len(rank_prompts))
            flat.extend(rank_prompts)
        lo, hi = len(flat) * self.index // self.engines, len(flat) * (self.index + 1) // self.engines
        return flat[lo:hi], slice(lo, hi), mine, everyone[0][2]

    def share(self, completions: list, engine_part: slice, mine: slice) -> list:
        """Every engine leader's completions, put together; this rank's part of them."""
        parts = self._gather((engine_part.start, completions) if self.leader else None)
        flat: list = [None] * max([0] + [start + len(c) for start, c in filter(None, parts)])
        for start, part in filter(None, parts):
            flat[start:start + len(part)] = part
        return flat[mine]


class _NoChatWarmupFilter(logging.Filter):
    """vLLM warms up its chat-template renderer at start and logs the failure with a traceback when there
    is no tokenizer (``skip_tokenizer_init``: our prompts go in as token ids, no chat template is ever
    rendered by vLLM): expected, so that one record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


def _quiet_chat_warmup() -> None:
    log = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _NoChatWarmupFilter) for f in log.filters):
        log.addFilter(_NoChatWarmupFilter())


@contextlib.contextmanager
def _keep_process_state():
    """In-process, vLLM's start-up would change the trainer's process: its CPU worker replaces
    ``torch.set_num_threads`` with a no-op and drops to one thread, and it seeds python's, numpy's and
    torch's global generators with its ``seed``. Restore all of them."""
    import random

    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)


def hf_architecture(model_cfg, arch=None):
    """(Arch, HF config dict) of a megatron ModelConfig: the ones ``vp2o convert mcore-to-hf`` writes."""
    from megatron_vp2o.checkpoint.hf import archs

    arch = arch or archs.get_arch("qwen3_moe" if model_cfg.qk_layernorm else "mixtral")
    return arch, archs.hf_config_from_model(arch, model_cfg)


class VLLMEngine:
    """:class:`~megatron_vp2o.generation.rollouts.RolloutEngine` on an in-process vLLM ``LLM``."""

    def __init__(self, model_cfg, pad_id: int, vocab_size: int | None = None, config: VLLMConfig | None = None,
                 arch=None, dp_rank: int | None = None, seed: int = 0):
        for key, value in _ENV.items():
            os.environ.setdefault(key, value)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights reach the worker directly
        from vllm import LLM

        self.config = config or VLLMConfig()
        self.model_cfg, self.pad_id = model_cfg, pad_id
        self.vocab_size = vocab_size
        self.arch, hf_config = hf_architecture(model_cfg, arch)
        self.data_rank = _dp_rank()  # whose prompts these are (the pool's exchange)
        self.pool = EnginePool.build(self.config.tp, _shares_data())
        # the sampling stream's offset: the engine's index in a pool, else the data-parallel rank
        self.dp_rank = self.pool.index if self.pool else (self.data_rank if dp_rank is None else dp_rank)
        self.weight_version = 0
        self.asleep = False
        self._dir = tempfile.mkdtemp(prefix="vp2o-vllm-")
        with open(os.path.join(self._dir, "config.json"), "w") as fh:
            json.dump(hf_config, fh)
        c, on_gpu = self.config, cuda()
        kwargs = dict(model=self._dir, skip_tokenizer_init=True, load_format="dummy", seed=seed,
                      dtype={"fp32": "float32", "bf16": "bfloat16"}[model_cfg.params_dtype],
                      max_model_len=c.max_model_len or model_cfg.seq_length, max_num_seqs=c.max_num_seqs,
                      logprobs_mode="processed_logprobs", max_logprobs=0, disable_log_stats=True,
                      enforce_eager=(not on_gpu) if c.enforce_eager is None else c.enforce_eager)
        if c.tp > 1:
            kwargs.update(tensor_parallel_size=c.tp, enable_expert_parallel=c.ep > 1,
                          distributed_executor_backend="external_launcher")
        if on_gpu:
            kwargs.update(gpu_memory_utilization=c.gpu_memory_utilization, enable_sleep_mode=c.sleep)
            if c.routed_experts:
                kwargs["enable_return_routed_experts"] = True
        else:
            kwargs.update(kv_cache_memory_bytes=c.kv_cache_bytes)
        _quiet_chat_warmup()
        with _keep_process_state():
            self.llm = LLM(**kwargs)
        self.num_model_vocab = int(hf_config["vocab_size"])

    # ---- weights ----

    def load_weights(self, buckets) -> int:
        """Push HF ``(name, tensor)`` buckets into the engine (weight_sync.py builds them); returns the
        number of tensors: one ``reload_weights`` over a lazy iterator (vLLM processes each layer once all
        its tensors arrived, so a layer split over buckets is still whole). In an engine group every rank
        pushes the full tensors into its own worker, whose loaders keep its shard."""
        from megatron_vp2o.generation import weight_sync

        n = weight_sync.reload_in_process(self.llm, buckets)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.weight_version += 1
        return n

    def sleep(self) -> None:
        """GPU: release weights and KV cache (level 1 keeps weights on the host) during learner steps."""
        if cuda() and self.config.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        llm, self.llm = getattr(self, "llm", None), None
        import torch.distributed as dist

        # vLLM's teardown (shutdown, also run by a finalizer when the LLM is collected or the interpreter
        # exits) ends with torch.distributed.destroy_process_group(): in a torchrun world that is the
        # trainer's own group, which later collectives (the final checkpoint, the results gather) still
        # use, and which the trainer destroys itself before exiting. There the finalizer is detached, the
        # LLM kept referenced, and its memory goes with the process.
        if llm is not None and dist.is_initialized():
            finalizer = getattr(getattr(llm.llm_engine, "engine_core", None), "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            _KEPT_ALIVE.append(llm)
        elif llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()

    # ---- generation ----

    def sampling_params(self, sampling: SamplingConfig, index: int | None = None):
        """vLLM ``SamplingParams`` equal to ``sampling`` (module doc); ``index`` gives a per-request seed (GPU)."""
        from vllm import SamplingParams

        extra = {}
        if self.vocab_size is not None and self.vocab_size < self.num_model_vocab:
            extra["allowed_token_ids"] = list(range(self.vocab_size))
        if index is not None:
            extra["seed"] = sampling.seed + 1000003 * self.dp_rank + index
        return SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                              max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_token_ids),
                              ignore_eos=True, logprobs=0, detokenize=False, skip_special_tokens=False, **extra)

    @contextlib.contextmanager
    def _seeded(self, sampling: SamplingConfig):
        if cuda():
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sampling.seed + 1000003 * self.dp_rank)
            yield

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Rollouts:
        from vllm.inputs import TokensPrompt

        self.wake_up()
        todo, part, mine = list(prompts), slice(0, len(prompts)), slice(0, len(prompts))
        if self.pool:
            todo, part, mine, seed = self.pool.split(self.data_rank, prompts, sampling.seed)
            sampling = dataclasses.replace(sampling, seed=seed)
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in todo]
        params = ([self.sampling_params(sampling, i) for i in range(len(todo))] if cuda()
                  else self.sampling_params(sampling))
        with self._seeded(sampling), platform.native():  # CPU: no device-rewriting mode on vLLM's hot path
            outs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        completions = [Completion.of(o.outputs[0]) for o in outs]
        if self.pool:
            completions = self.pool.share(completions, part, mine)
        return self._rollouts(prompts, completions, sampling)

    def _rollouts(self, prompts, completions, sampling: SamplingConfig) -> Rollouts:
        ids_BP, lens_B = left_pad(prompts, self.pad_id, "cpu")
        b, p = ids_BP.shape
        t = max(1, max(len(c.token_ids) for c in completions))
        resp_BT = torch.full((b, t), self.pad_id, dtype=torch.long, device="cpu")
        mask_BT = torch.zeros(b, t, device="cpu")
        logp_BT = torch.zeros(b, t, device="cpu")
        for i, c in enumerate(completions):
            n = len(c.token_ids)
            resp_BT[i, :n] = torch.tensor(list(c.token_ids), dtype=torch.long, device="cpu")
            mask_BT[i, :n] = 1.0
            logp_BT[i, :n] = torch.tensor(c.logprobs, device="cpu")
        finish = ["stop" if c.finish_reason == "stop" else "length" for c in completions]
        pos_BS = positions_from_pads(p - lens_B, p + t)[:, :p + t - 1]
        routing = self._routing(completions, (p - lens_B).tolist(), p + t - 1)
        dev = _device()
        return Rollouts(ids_BP.to(dev), lens_B.to(dev), resp_BT.to(dev), mask_BT.to(dev), logp_BT.to(dev),
                        pos_BS.to(dev), routing[0].to(dev), routing[1].to(dev), finish, sampling, self.pad_id,
                        self.vocab_size, list(range(1, self.model_cfg.num_layers + 1)) if routing[0].shape[0] else [])

    def _routing(self, completions, pads: list[int], s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_idx_LBSK, gates_LBSK)``: empty (L = 0) unless vLLM reported routed experts (GPU)."""
        k, b = self.model_cfg.moe_router_topk, len(pads)
        empty = (torch.zeros(0, b, s, k, dtype=torch.long, device="cpu"), torch.zeros(0, b, s, k, device="cpu"))
        if not (cuda() and self.config.routed_experts):
            return empty
        routed = [c.routed_experts for c in completions]
        if any(r is None for r in routed):
            return empty
        layers = self.model_cfg.num_layers
        idx = torch.zeros(layers, b, s, k, dtype=torch.long, device="cpu")
        for i, r in enumerate(routed):  # [tokens, layers, k], from the sequence's first real token (column pad)
            r_SLK = torch.as_tensor(r, device="cpu").long()[:s - pads[i]]
            idx[:, i, pads[i]:pads[i] + r_SLK.shape[0]] = r_SLK.permute(1, 0, 2)
        return idx, torch.full((layers, b, s, k), 1.0 / k, device="cpu")  # gates: from the learner's forward


def _device():
    from megatron_vp2o.device import device

    return device()


def learner_behaviour(model, rollouts: Rollouts) -> tuple[Rollouts, torch.Tensor]:
    """The rollouts with the learner's own behaviour log-probs and routing (one teacher-forced forward
    of the refreshed learner weights, so ratios and VP2O's budgets compare megatron with megatron), and
    the engine's log-probs ``[B, T]`` (kept for the mismatch metrics, and in the returned rollouts'
    ``engine_logp_BT``: they travel with the RL loop's buffer and its checkpoint, for ``rl.engine_is_cap``).
    Routing the engine reported (GPU, ``routed_experts``) is replayed in that forward (R3); on CPU the
    forward routes by itself."""
    from megatron_vp2o.generation.megatron_engine import inference_mode, teacher_forced_logprobs

    with inference_mode(model):
        tf = teacher_forced_logprobs(model, rollouts, replay=rollouts.topk_idx_LBSK.shape[0] > 0)
    layers = list(range(1, tf.topk_idx_LBSK.shape[0] + 1))  # every layer is an MoE layer (checkpoint/hf)
    return dataclasses.replace(rollouts, logp_BT=tf.logp_BT.detach(), topk_idx_LBSK=tf.topk_idx_LBSK,
                               gates_LBSK=tf.gates_LBSK, moe_layers=layers,
                               engine_logp_BT=rollouts.logp_BT), rollouts.logp_BT


def mismatch(engine_logp_BT: torch.Tensor, learner_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict:
    """``rollout/mismatch_k3`` (mean k3 estimate of KL(engine || learner) over response tokens) and
    ``rollout/mismatch_max_abs`` (largest |log-prob difference|)."""
    m = mask_BT > 0
    d = (learner_logp_BT - engine_logp_BT)[m]
    if d.numel() == 0:
        return {"rollout/mismatch_k3": 0.0, "rollout/mismatch_max_abs": 0.0}
    k3 = (torch.exp(d) - 1.0 - d).mean()
    return {"rollout/mismatch_k3": float(k3), "rollout/mismatch_max_abs": float(d.abs().max())}


class SyncedEngine:
    """The RL loop's :class:`RolloutEngine` on vLLM: each :meth:`generate` refreshes the engine from the
    learner (:class:`~megatron_vp2o.generation.weight_sync.WeightSync`), samples with vLLM, then takes the
    behaviour log-probs and routing from the learner's own forward (:func:`learner_behaviour`).
    ``last_metrics`` holds the refresh's and the mismatch's metrics of the last call (``timing/weight_sync``,
    ``rollout/weight_version``, ``rollout/mismatch_k3``, ``rollout/mismatch_max_abs``) and
    ``last_engine_logp_BT`` vLLM's own log-probs (``rollout/engine_logp``). GPU: vLLM sleeps in between."""

    def __init__(self, engine: VLLMEngine, sync, model):
        self.engine, self.sync, self.model = engine, sync, model
        self.last_metrics: dict = {}
        self.last_engine_logp_BT: torch.Tensor | None = None

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Rollouts:
        self.engine.wake_up()
        metrics = self.sync()
        rollouts, engine_logp_BT = learner_behaviour(self.model, self.engine.generate(prompts, sampling))
        self.engine.sleep()
        self.last_engine_logp_BT = engine_logp_BT
        self.last_metrics = {**metrics, **mismatch(engine_logp_BT, rollouts.logp_BT, rollouts.response_mask_BT)}
        return rollouts

    def close(self) -> None:
        self.engine.close()


def truncated_is_weight(engine_logp_BT: torch.Tensor, behaviour_logp_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight ``w = min(exp(logp_behaviour - logp_engine), cap)`` per token, i.e.
    ``min(mu_learner / mu_engine, cap)`` (no gradient): corrects the policy gradient for sampling with the
    engine's slightly different numerics (verl / slime / NeMo-RL's TIS; ``rl.engine_is_cap``, applied to the
    per-token advantages in :func:`megatron_vp2o.rl.batches.make_batches`). Equal log-probs give exactly 1."""
    return torch.exp(behaviour_logp_BT.detach() - engine_logp_BT.detach()).clamp(max=cap)
