"""Streamed weight refresh: the learner's weights, from any TP/PP/EP layout, into a rollout engine.

What: :class:`WeightSync` turns the learner's model chunks into the architecture's Hugging Face tensors with
the project's one HF mapping (:func:`megatron_vp2o.checkpoint.hf.stream.hf_tensors`, also behind
``vp2o convert mcore-to-hf``), groups them in buckets of at most ``bucket_bytes`` and hands the buckets to
the engine (:meth:`VLLMEngine.load_weights`), which pushes them into its worker in this process with
:func:`reload_in_process`: one ``worker.model_runner.reload_weights(weights_iterator=...)`` through
``llm.collective_rpc`` over a lazy iterator of the buckets, so the buckets are produced while vLLM consumes
them (vLLM buffers each layer until all of its tensors arrived, then processes and copies it in place;
module ``load_weights`` alone does not reach the CPU backend's packed expert weights). An engine over
several ranks (``rl.vllm.tp`` > 1, vLLM's ``external_launcher``) has one worker in each of its ranks'
processes: every rank pushes the full tensors and vLLM's loaders keep that worker's shard, so no tensor
crosses a process boundary (no CUDA IPC, no extra NCCL group) and a refresh costs each rank one bucket.

Every refresh checks that exactly the model's HF tensors went out (a skipped or partial refresh raises,
:class:`WeightSyncError`), bumps the engine's weight version and returns ``timing/weight_sync`` (seconds),
``rollout/weight_version`` and ``rollout/weight_sync_mib``.
Why: the engine must sample from the learner's current policy; streaming in buckets keeps the extra memory
at one bucket (plus one parameter's gathered tensor) instead of a full model copy.
"""

from __future__ import annotations

import logging
import time

import torch

from megatron_vp2o.checkpoint.hf import mapping, stream


class WeightSyncError(RuntimeError):
    """The engine did not receive exactly the model's tensors."""


def _reload(worker, weights) -> None:  # runs on the vLLM worker (collective_rpc passes the worker first)
    layers: set[str] = set()

    def named(pairs):
        for name, t in pairs:
            layers.add(".".join(name.split(".")[:3]) + ".")  # model.layers.L.
            yield name, t

    _quiet_rotary_reload()
    worker.model_runner.reload_weights(weights_iterator=named(weights))
    _repack_cpu_experts(worker.model_runner.model, layers)


class _RotaryFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # rotary tables have no checkpoint tensors: expected
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _quiet_rotary_reload() -> None:
    """vLLM warns at every reload that the rotary embedding (a computed table, no checkpoint tensor) got no
    weights, and keeps its table, which is right: drop that one message."""
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryFilter) for f in log.filters):
        log.addFilter(_RotaryFilter())


def _repack_cpu_experts(model, layers: set[str]) -> None:
    """vLLM 0.32 re-runs a fused-MoE layer's weight processing on reload but skips the experts' own step on
    a weight update (``_setup_kernel``: only the first load calls ``fused_experts.process_weights_after_loading``),
    which on CPU is the prepacking into the grouped-GEMM layout: the reloaded experts stay unpacked and the
    CPU kernel reads them as packed (wrong logits). Run that step for the MoE layers this reload touched."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and any(name.startswith(p) for p in layers):
            experts.process_weights_after_loading(module)


def reload_in_process(llm, buckets) -> int:
    """Push ``buckets`` into in-process workers with one ``reload_weights``; returns the tensor count."""
    count = [0]

    def pairs():
        for bucket in buckets:
            for pair in bucket:
                count[0] += 1
                yield pair

    llm.collective_rpc(_reload, args=(pairs(),))
    return count[0]


class WeightSync:
    """Refresh ``engine`` from the learner's ``chunks`` (bare GPTModel chunks of this rank); collective over
    the model-parallel groups: every rank calls it at the same time."""

    def __init__(self, engine, chunks: list, cfg, bucket_bytes: int | None = None, arch=None):
        from megatron_vp2o.checkpoint.convert_hf import shards_of

        self.engine, self.chunks, self.cfg = engine, list(chunks), cfg
        self.arch = arch or engine.arch
        self.bucket_bytes = bucket_bytes or engine.config.bucket_bytes
        self.shards = [shards_of(c, cfg) for c in self.chunks]
        self.expected = mapping.expected_hf_shapes(self.arch, cfg.model)
        self.groups = stream.Groups.from_parallel_state()

    def tensors(self):
        return stream.hf_tensors(self.chunks, self.shards, self.arch, self.cfg.model.vocab_size, self.groups)

    def __call__(self, tensors=None) -> dict:
        """One refresh; ``tensors`` replaces the learner's stream (tests: a partial refresh must raise)."""
        start = time.perf_counter()
        seen: dict[str, tuple] = {}
        held = [0]

        def checked():
            for name, t in (self.tensors() if tensors is None else tensors):
                if name in seen:
                    raise WeightSyncError(f"weight refresh: '{name}' sent twice")
                seen[name] = tuple(t.shape)
                held[0] += t.numel() * t.element_size()
                yield name, t

        with torch.no_grad():
            self.engine.load_weights(stream.buckets(checked(), self.bucket_bytes))
        try:
            mapping.check_hf_tensors(seen, self.expected, "weight refresh")
        except mapping.ConversionError as exc:
            raise WeightSyncError(str(exc)) from None
        return {"timing/weight_sync": time.perf_counter() - start, "rollout/weight_version": self.engine.weight_version,
                "rollout/weight_sync_mib": held[0] / (1 << 20)}
