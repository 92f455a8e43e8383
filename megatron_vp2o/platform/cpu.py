"""CPU compatibility layer: run the real megatron-core on CPU with gloo when CUDA is absent.

megatron-core assumes a CUDA device in a handful of places. On a machine without CUDA (our
development machines and CI) :func:`install` redirects exactly these, and nothing else:

| # | megatron-core call site | redirect | why |
|---|---|---|---|
| 1 | ``torch.cuda.current_device()`` (buffers, router weights, ~170 sites) | returns ``torch.device("cpu")`` | the device argument of every factory call |
| 2 | ``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`` (the CUDA RNG tracker: TP/EP weight init, dropout forks) | the CPU default generator | the "device generator" on CPU is the CPU one; forks stay deterministic |
| 3 | ``torch.cuda.Stream/Event/stream/current_stream/default_stream/set_stream/synchronize/empty_cache`` (alltoall dispatcher, p2p, async checkpoint) | no-op stand-ins | CPU ops are synchronous: a stream is the identity |
| 4 | ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` factory calls (optimizer overflow buffer, clip_grads, pipeline schedules, causal mask, ``local_multi_tensor_l2_norm``, distributed-optimizer save) | a ``TorchFunctionMode`` that rewrites the device to CPU | generic: the list of such sites changes between megatron releases |
| 5 | ``Tensor.type() == 'torch.cuda.FloatTensor'`` dispatch in the optimizers and ``clip_grads`` | ``Tensor.type()`` without arguments answers the CUDA name for CPU tensors when called from megatron code | these branches pick the fp32/fp16 path by the type string |
| 6 | ``moe_utils.te_general_gemm`` (NameError without Transformer Engine) | defined as ``None`` | then the router uses its torch.mm path |
| 7 | ``moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)`` (alltoall split sizes) | also converts CPU tensors to numpy | gloo's ``all_to_all_single`` rejects tensor split sizes |
| 8 | ``tensor_parallel.mappings._gather_along_first_dim`` / ``_reduce_scatter_along_first_dim`` with uneven splits (MoE with TP>1) | pad + all_gather / all_reduce + slice when sizes differ | gloo requires equal sizes |
| 9 | ``moe.grouped_gemm_util.ops.gmm`` (legacy ``GroupedMLP``; the ``grouped_gemm`` package is CUDA-only; megatron-core <= 0.18 only, see ``compat`` row 3) | ``torch._grouped_mm`` without autograd, else a torch loop of ``mm`` over the expert groups | keeps the GroupedMLP weight layout testable (and decodable) on CPU |

None of these changes arithmetic: every op runs the same kernel it would run on CPU anyway, so a
CPU run is bitwise reproducible. The TorchFunctionMode (4) is per thread (torch semantics); it is
entered for the thread that calls :func:`install`. Code reached from autograd's worker threads
does not see it, which is why the model code passes explicit CPU attention masks.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_state: dict[str, Any] = {"installed": False, "mode": None, "saved": []}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite ``device='cuda'`` factory arguments, ``.cuda()`` and ``.to('cuda')`` to the CPU (redirect 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``/``Event`` (redirect 3): every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: _NullStream()  # e.g. stream.record_event().synchronize()

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


@contextlib.contextmanager
def _null_stream_ctx(*args, **kwargs):
    yield


def _patch(obj: Any, name: str, value: Any) -> None:
    _state["saved"].append((obj, name, getattr(obj, name, _MISSING), value))
    setattr(obj, name, value)


_MISSING = object()


def _tensor_type_factory(original):
    def tensor_type(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if args or kwargs:
            return result
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron.") and result in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[result]
        return result

    return tensor_type


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: _CPU)  # 1
    _patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())  # 2
    _patch(cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    for name in ("Stream", "Event"):  # 3
        _patch(cuda, name, _NullStream)
    for name in ("current_stream", "default_stream"):
        _patch(cuda, name, lambda *a, **k: _NullStream())
    _patch(cuda, "stream", _null_stream_ctx)
    for name in ("synchronize", "empty_cache", "set_stream"):
        _patch(cuda, name, lambda *a, **k: None)
    _patch(torch.Tensor, "type", _tensor_type_factory(torch.Tensor.type))  # 5


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import mappings, random as mrandom
    from megatron.core.transformer.moe import moe_utils

    _patch(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())  # 2
    _patch(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    if not hasattr(moe_utils, "te_general_gemm"):  # 6
        _patch(moe_utils, "te_general_gemm", None)
    _patch(moe_utils, "maybe_move_tensor_to_cpu", _move_to_cpu_factory(moe_utils.maybe_move_tensor_to_cpu))  # 7
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_vp2o import compat

    grouped_gemm_util = compat.grouped_gemm_util()  # None from megatron-core 0.19 (compat row 3)
    if grouped_gemm_util is not None and grouped_gemm_util.ops is None:  # 9
        _patch(grouped_gemm_util, "ops", _TorchGroupedGemm())
        _patch(grouped_gemm_util, "assert_grouped_gemm_is_available", lambda: None)
        _patch(grouped_gemm_util, "grouped_gemm_is_available", lambda: True)

    _patch(token_dispatcher, "maybe_move_tensor_to_cpu", moe_utils.maybe_move_tensor_to_cpu)
    _patch(mappings, "_gather_along_first_dim", _uneven_gather_factory(mappings._gather_along_first_dim))  # 8
    _patch(
        mappings,
        "_reduce_scatter_along_first_dim",
        _uneven_reduce_scatter_factory(mappings._reduce_scatter_along_first_dim),
    )


class _TorchGroupedGemm:
    """CPU reference of ``grouped_gemm.ops.gmm`` (redirect 9): ``out[g] = a[g] @ b[g]`` per expert group."""

    @staticmethod
    def gmm(a, b, batch_sizes, trans_b=False):
        if hasattr(torch, "_grouped_mm") and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
            # one grouped kernel when no backward is needed (rollouts): torch's CPU _grouped_mm has no
            # reliable backward here, so training keeps the per-group loop below
            offs = torch.as_tensor(batch_sizes, device=a.device).cumsum(0).to(torch.int32)
            try:
                return torch._grouped_mm(a, b.transpose(1, 2) if trans_b else b, offs=offs)
            except RuntimeError:  # shapes it does not take (strides must be multiples of 16 bytes)
                pass
        sizes = [int(n) for n in batch_sizes]
        outs = [x @ (w.t() if trans_b else w) for x, w in zip(a.split(sizes), b.unbind(0))]
        return torch.cat(outs, dim=0)


def _move_to_cpu_factory(original):
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


def _uneven_gather_factory(original):
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = torch.empty((largest * group.size(), *input_.shape[1:]), dtype=input_.dtype, device=input_.device)
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        chunks = gathered.split(largest)
        return torch.cat([c[:n] for c, n in zip(chunks, output_split_sizes)], dim=0)

    return gather_along_first_dim


def _uneven_reduce_scatter_factory(original):
    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or len(set(input_split_sizes)) == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        rank = torch.distributed.get_rank(group)
        start = sum(input_split_sizes[:rank])
        return total[start : start + input_split_sizes[rank]].contiguous()

    return reduce_scatter_along_first_dim


def _quiet_expected_warnings() -> None:
    """Warnings that are expected on CPU (no TE/apex fallbacks; the mode's non-leaf ``.grad`` reads)."""
    import warnings

    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*grad attribute of a Tensor that is not a leaf.*", ".*is deprecated. Please use `torch.distributed.*"):
        warnings.filterwarnings("ignore", message=pattern)


def install() -> None:
    """Apply every redirect listed in the module docstring (idempotent)."""
    if _state["installed"]:
        return
    _quiet_expected_warnings()
    _patch_torch_cuda()
    _patch_megatron()
    mode = CudaToCpuMode()
    mode.__enter__()
    _state.update(installed=True, mode=mode)


def uninstall() -> None:
    """Undo :func:`install` (tests use it to check that each redirect is needed)."""
    if not _state["installed"]:
        return
    _state["mode"].__exit__(None, None, None)
    for obj, name, old, _ in reversed(_state["saved"]):
        if old is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, old)
    _state.update(installed=False, mode=None, saved=[])


def installed() -> bool:
    return bool(_state["installed"])
