"""Entry point of one rank of a test world (see harness.py): activate the platform, run the target."""

import importlib
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    target, tmp = sys.argv[1], Path(sys.argv[2])
    from megatron_vp2o import platform

    platform.activate()
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(torch.load(tmp / "payload.pt", weights_only=False))
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        torch.save(result, tmp / "result.pt")
    if dist.is_initialized():
        dist.barrier()
        from megatron_vp2o.distributed.init import shutdown

        shutdown()


if __name__ == "__main__":
    main()
