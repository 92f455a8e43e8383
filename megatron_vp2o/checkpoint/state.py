"""Per-rank resume state in a format that cannot run code when it is loaded.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a checkpoint directory from
someone else could execute code on ``--resume``. The per-rank state (the RL rollout buffer, the
anchors, the last reward metrics) is therefore written as *plain data* only -- tensors, ``None``,
``bool``/``int``/``float``/``str``, and lists, tuples and dicts of those (numpy values become
Python numbers / tensors, sets become lists) -- and read with
``torch.load(weights_only=True)``, which refuses everything else without constructing it.

Our own dataclasses (``Rollouts``, ``SamplingConfig``, ``PromptRecord``, ...) travel as
``{"__dataclass__": "module:QualName", "fields": {...}}``. On load only dataclasses defined in a
``megatron_vp2o`` module that is already imported are rebuilt, from their plain fields; any
other name is refused. A file that is not plain data (an old ``weights_only=False`` pickle, or a
crafted one) is refused with a one-line :class:`CheckpointStateError` before any of it is built.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_vp2o.config import ConfigError

TAG = "__dataclass__"
FORMAT = "vp2o-plain-v1"
_SCALARS = (type(None), bool, int, float, str)


class CheckpointStateError(ConfigError):
    """A resume-state file that is not plain data, or names a type we do not rebuild."""


def to_plain(obj: Any, where: str = "state") -> Any:
    """``obj`` as plain data (see module doc); raises TypeError naming the path of anything else."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, np.generic):  # numpy scalars (e.g. in reward metadata) as Python numbers
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, (set, frozenset)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(sorted(obj, key=repr))]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        fields = {f.name: to_plain(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)
                  if f.init}
        return {TAG: f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, _SCALARS)]
        if bad:
            raise TypeError(f"{where}: dict keys must be str or numbers to be saved as plain data (got {bad[0]!r})")
        return {k: to_plain(v, f"{where}.{k}") for k, v in obj.items()}
    raise TypeError(f"{where}: {type(obj).__qualname__} cannot be saved as plain resume state; "
                    "use tensors, numbers, strings, lists, dicts or a megatron_vp2o dataclass")


def _dataclass_type(name: Any, where: str) -> type:
    module, _, qualname = str(name).partition(":")
    if not (module == "megatron_vp2o" or module.startswith("megatron_vp2o.")) or not qualname:
        raise CheckpointStateError(f"{where}: type '{name}' is not a megatron_vp2o dataclass; refused")
    cls: Any = sys.modules.get(module)  # only modules already imported: a file never triggers an import
    try:
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except AttributeError:
        cls = None
    if cls is None:
        raise CheckpointStateError(f"{where}: type '{name}' is not known here; "
                                   "resume from a checkpoint written by this version") from None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise CheckpointStateError(f"{where}: '{name}' is not a dataclass; refused")
    return cls


def from_plain(data: Any, where: str = "state") -> Any:
    """Inverse of :func:`to_plain`: rebuild tagged megatron_vp2o dataclasses, keep the rest."""
    if isinstance(data, dict):
        if TAG in data:
            cls = _dataclass_type(data[TAG], where)
            fields = data.get("fields")
            if not isinstance(fields, dict):
                raise CheckpointStateError(f"{where}: malformed entry for {data[TAG]}; refused")
            known = {f.name for f in dataclasses.fields(cls) if f.init}
            kwargs = {k: from_plain(v, f"{where}.{k}") for k, v in fields.items() if k in known}
            try:
                return cls(**kwargs)
            except (TypeError, ValueError) as exc:
                raise CheckpointStateError(f"{where}: cannot rebuild {data[TAG]} ({exc})") from None
        return {k: from_plain(v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(data, list):
        return [from_plain(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, tuple):
        return tuple(from_plain(v, f"{where}[{i}]") for i, v in enumerate(data))
    return data


def save_state(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as plain data (loadable with ``weights_only=True``)."""
    torch.save({"format": FORMAT, "state": to_plain(obj)}, path)


def refusal(exc: BaseException) -> str:
    """A short reason from torch's (long, multi-line) weights-only refusal."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)  # torch: "... unsupported GLOBAL posix.mkdir ..."
    if found:
        return f"it names the global {found.group(1)}, which is not plain data"
    return (text.strip().splitlines() or [type(exc).__name__])[0][:160]


def check_state_file(path: str | Path) -> dict:
    """Load ``path`` as plain data only (``weights_only=True``) and check its format; returns the
    raw blob. Anything else is refused (:class:`CheckpointStateError`, one line), never unpickled."""
    path = Path(path)
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError, OSError) as exc:
        raise CheckpointStateError(f"resume state '{path}' is not plain data and was not loaded ({refusal(exc)}); "
                                   "it was not written by this version of vp2o: resume from another checkpoint "
                                   "or start without --resume") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointStateError(f"resume state '{path}' has an unknown format; resume from a checkpoint written "
                                   "by this version of vp2o or start without --resume")
    return blob


def load_state(path: str | Path) -> Any:
    """Read a file written by :func:`save_state` (see :func:`check_state_file`) and rebuild it."""
    return from_plain(check_state_file(path).get("state"), where=str(path))
