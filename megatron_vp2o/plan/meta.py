"""Build megatron's model for one rank of a large layout on the ``meta`` device, in one process.

torch's fake process-group backend (``torch.testing._internal.distributed.fake_pg``: collectives
return immediately, nothing is communicated) lets this process be rank ``rank`` of a world of any
size, so megatron-core's ``initialize_model_parallel`` builds the real groups for the layout and
``GPTModel`` allocates this rank's pipeline stage with its local experts -- on the ``meta`` device,
so a 30B model costs no memory. Used by ``vp2o plan --check`` and the CI check that the recipes
build and that :mod:`.counts` counts what megatron allocates.

Run it in a fresh process (it owns the default process group while it runs); ``te_grouped``
experts are built as megatron's ``SequentialMLP`` when Transformer Engine is absent (same
parameter count: one fc1 and one fc2 weight per local expert).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


def meta_rank_params(cfg, world: int, rank: int = 0) -> dict:
    """{"dense", "expert", "total", "stage"} parameter elements of ``rank``'s model, built on meta."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_vp2o import platform

    platform.activate()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vp2o.config import check_layout
    from megatron_vp2o.model import build_gpt, transformer_config

    check_layout(cfg, world)
    par = cfg.parallel
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp, context_parallel_size=par.cp,
            expert_model_parallel_size=par.ep, expert_tensor_parallel_size=par.expert_tp,
            create_gloo_process_groups=False,
        )
        model_parallel_cuda_manual_seed(0)
        model = cfg.model
        if model.expert_impl == "te_grouped" and not _has_te():
            model = dataclasses.replace(model, expert_impl="sequential")
        tconf = transformer_config(model, par, use_cpu_init=True)
        with torch.device("meta"):
            gpt = build_gpt(model, tconf)
        expert = sum(p.numel() for n, p in gpt.named_parameters() if ".experts." in n and "shared_experts" not in n)
        total = sum(p.numel() for p in gpt.parameters())
        return {"dense": total - expert, "expert": expert, "total": total,
                "stage": ps.get_pipeline_model_parallel_rank()}
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
