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

import contextlib
import json
import os
import shutil
from pathlib import Path

import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_vp2o.checkpoint.meta import latest_checkpoint, new_meta, read_meta  # noqa: F401  (re-exported)
from megatron_vp2o.checkpoint.safety import verify_checkpoint
from megatron_vp2o.checkpoint.state import load_state, save_state
from megatron_vp2o.config import ConfigError

OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def _module(models):
    """The bare model chunk (unwrapped from DDP)."""
    return models[0].module if hasattr(models[0], "module") else models[0]


def model_sharded_state_dict(models) -> dict:
    return _module(models).sharded_state_dict(prefix="")


def save_checkpoint(root: str | Path, step: int, trainable, meta: dict, extra: dict | None = None,
                    with_optimizer: bool = True, rank_state=None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    ``extra``: small common state (rank 0's); ``rank_state``: per-rank state (e.g. an RL rollout
    buffer) made of tensors, plain containers and megatron_vp2o dataclasses, stored as plain data in
    ``rank<r>.pt`` inside the checkpoint (:mod:`.state`: loads with ``weights_only=True``)."""
    root = Path(root)
    final, tmp = step_dir(root, step), Path(str(step_dir(root, step)) + ".tmp")
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_sd = model_sharded_state_dict(trainable.models)
    state = {"model": model_sd, "step": step, "extra": extra or {}, "rng": _rng_object(capture_rng())}
    if with_optimizer:
        state["optimizer"] = trainable.optimizer.sharded_state_dict(model_sd, metadata=OPT_METADATA)
        state["scheduler"] = trainable.scheduler.state_dict()
    dist_checkpointing.save(state, str(tmp))
    if rank_state is not None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        save_state(rank_state, tmp / f"rank{rank}.pt")
    _barrier()
    if _rank0():
        (tmp / "vp2o.json").write_text(json.dumps(new_meta(**dict(meta, step=step)), indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / "latest")
    _barrier()
    return final


# Model state that a checkpoint may lack: recomputed from the weights after loading (VP2O prototypes).
OPTIONAL_KEY_PARTS = ("protos",)


def _present(sharded: dict, found: Path) -> tuple[dict, list[str]]:
    """Drop optional entries the checkpoint does not hold; a missing weight is an error."""
    saved = set(dist_checkpointing.load_tensors_metadata(str(found)).keys())
    keep, missing = {}, []
    for name, item in sharded.items():
        key = getattr(item, "key", None)
        if not isinstance(item, ShardedTensor) or key in saved:
            keep[name] = item
        elif any(part in name for part in OPTIONAL_KEY_PARTS):
            missing.append(name)
        else:
            raise ConfigError(f"checkpoint '{found}' has no tensor '{key}' (model parameter '{name}'): it is a "
                              "checkpoint of another model; set the model.* fields to those in its vp2o.json")
    return keep, missing


def load_model(path: str | Path, models, strict: bool = True) -> dict:
    """Load model weights (any saved layout) into ``models``; returns the checkpoint's metadata
    (with ``missing_optional``: optional buffers the checkpoint lacked, e.g. VP2O prototypes)."""
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at '{path}' (expected vp2o.json or a 'latest' marker); "
                                "check checkpoint.load / --ckpt")
    verify_checkpoint(found)  # torch DCP unpickles .metadata and bytes entries: refuse code-running ones first
    sharded, missing = _present(model_sharded_state_dict(models), found)
    loaded = dist_checkpointing.load({"model": sharded}, str(found))
    result = _module(models).load_state_dict(loaded["model"], strict=False)
    unexpected = [k for k in result.missing_keys if not any(p in k for p in OPTIONAL_KEY_PARTS) and "_extra_state" not in k]
    if strict and (unexpected or result.unexpected_keys):
        raise RuntimeError(f"loading '{found}': missing {unexpected}, unexpected {result.unexpected_keys}")
    return dict(read_meta(found, "checkpoint"), missing_optional=missing)


def load_rank_state(path: str | Path):
    """This rank's ``rank_state`` of :func:`save_checkpoint` (None if it saved none). Read with
    ``weights_only=True``: a file that is not plain data is refused (``CheckpointStateError``)."""
    found = latest_checkpoint(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    file = None if found is None else found / f"rank{rank}.pt"
    return load_state(file) if file is not None and file.is_file() else None


def capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_object(data) -> ShardedObject:
    """Per-rank RNG states: one shard per global rank (exact resume needs the same world size)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("vp2o_rng_state", data, (world,), (rank,), replica_id=0)


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _unshare_adam_steps(optimizer) -> None:
    """After a reshardable load, torch Adam's per-parameter ``step`` tensors are one shared tensor,
    so each update would bump it once per parameter (notes: resumed losses drift). Clone them."""
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        for param_state in getattr(torch_opt, "state", {}).values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].detach().clone()


@contextlib.contextmanager
def _tolerate_missing_adam_step(optimizer):
    """megatron-core 0.16's fully-reshardable loader skips torch Adam's ``step`` (restored separately
    from the param groups) but then copies every state key, ``step`` included (KeyError). For the
    duration of the load, hand the setter the step it already holds. Instance-level, load-only."""
    patched = []
    for inner in _inner_optimizers(optimizer):
        original = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def setter(model_param, tensors, _orig=original, _inner=inner):
            if "step" not in tensors:
                group, order = _inner.model_param_group_index_map[model_param]
                main_param = _inner.optimizer.param_groups[group]["params"][order]
                step = _inner.optimizer.state[main_param].get("step")
                if step is not None:
                    tensors = dict(tensors, step=step.detach().clone())
            return _orig(model_param, tensors)

        inner._set_main_param_and_optimizer_states = setter
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states


def load_checkpoint(path: str | Path, trainable, with_optimizer: bool = True, restore_rng_state: bool = True) -> dict:
    """Load weights, optimizer, scheduler and RNG state to continue exactly; returns ``vp2o.json``
    plus ``extra`` (what the caller saved). Optimizer state reshards across layouts; RNG state
    is restored only when the world size matches."""
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at '{path}'; nothing to resume")
    verify_checkpoint(found, "--resume")
    meta = read_meta(found, "--resume")
    model_sd = model_sharded_state_dict(trainable.models)
    state = {"model": model_sd}
    world = dist.get_world_size() if dist.is_initialized() else 1
    same_world = meta.get("world_size", world) == world
    if restore_rng_state and same_world:
        state["rng"] = _rng_object(None)
    if with_optimizer:
        for inner in _inner_optimizers(trainable.optimizer):
            if hasattr(inner, "_init_optimizer_states_with_dummy_values"):
                inner._init_optimizer_states_with_dummy_values()  # a fresh torch Adam has no state to map
        state["optimizer"] = trainable.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPT_METADATA)
    loaded = dist_checkpointing.load(state, str(found))
    _module(trainable.models).load_state_dict(loaded["model"], strict=True)
    if with_optimizer:
        with _tolerate_missing_adam_step(trainable.optimizer):
            trainable.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(trainable.optimizer)
        trainable.scheduler.load_state_dict(loaded["scheduler"])
    else:
        trainable.optimizer.reload_model_params()
    if "rng" in loaded:
        restore_rng(loaded["rng"])
    return dict(meta, step=loaded["step"], extra=loaded.get("extra", {}))
