"""Save and load megatron dist checkpoints (``torch_dist``), atomically.

Layout under a checkpoint root::

    root/iter_0000040/      one complete checkpoint (megatron dist_checkpointing + common.pt)
    root/iter_0000040/vp2o.json   our metadata (step, config, parallel layout)
    root/latest             text file with the newest complete directory name

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, and
``latest`` is replaced atomically after that: a crash while saving leaves the previous checkpoint
as ``latest``. Model state is sharded by megatron's ``sharded_state_dict``, so a checkpoint saved
with one layout (TP/PP/EP) loads under another. Optimizer state is saved reshardable
(``fully_reshardable``, ``chained_optim_avoid_prefix``) as the notes in shared/ recommend.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one), else None."""
    root = Path(root)
    if (root / "vp2o.json").is_file():
        return root
    marker = root / "latest"
    if marker.is_file():
        path = root / marker.read_text().strip()
        if (path / "vp2o.json").is_file():
            return path
    done = sorted(p for p in root.glob("iter_*") if p.suffix != ".tmp" and (p / "vp2o.json").is_file())
    return done[-1] if done else None


def model_sharded_state_dict(models) -> dict:
    module = models[0].module if hasattr(models[0], "module") else models[0]
    return module.sharded_state_dict(prefix="")


def save_checkpoint(root: str | Path, step: int, trainable, meta: dict, extra: dict | None = None,
                    with_optimizer: bool = True) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    final, tmp = step_dir(root, step), Path(str(step_dir(root, step)) + ".tmp")
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_sd = model_sharded_state_dict(trainable.models)
    state = {"model": model_sd, "step": step, "extra": extra or {}}
    if with_optimizer:
        state["optimizer"] = trainable.optimizer.sharded_state_dict(model_sd, metadata=OPT_METADATA)
        state["scheduler"] = trainable.scheduler.state_dict()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank0():
        (tmp / "vp2o.json").write_text(json.dumps(dict(meta, step=step), indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / "latest")
    _barrier()
    return final


def load_model(path: str | Path, models, strict: bool = True) -> dict:
    """Load model weights (any saved layout) into ``models``; returns the checkpoint's metadata."""
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at '{path}' (expected vp2o.json or a 'latest' marker); "
                                "check checkpoint.load / --ckpt")
    sharded = model_sharded_state_dict(models)
    loaded = dist_checkpointing.load({"model": sharded}, str(found))
    module = models[0].module if hasattr(models[0], "module") else models[0]
    module.load_state_dict(loaded["model"], strict=strict)
    return json.loads((found / "vp2o.json").read_text())
