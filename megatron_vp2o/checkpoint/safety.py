"""Refuse a dist checkpoint whose pickles could run code, before megatron-core reads it.

megatron's ``torch_dist`` loader goes through torch.distributed.checkpoint, which reads the
checkpoint's ``.metadata`` with ``pickle.load`` and every non-tensor entry (layers'
``_extra_state``, our RNG state, ...) with ``torch.load(weights_only=False)``: a checkpoint
directory from someone else could execute code on load. :func:`verify_checkpoint` checks those
same bytes first, without executing anything:

- ``.metadata`` is unpickled by a restricted unpickler that constructs only the dataclasses and
  enums of ``torch.distributed.checkpoint`` / ``megatron.core.dist_checkpointing``, ``torch.Size``,
  torch dtypes and layouts; any other global refuses the checkpoint;
- every bytes entry the metadata lists, and ``common.pt``, must load with
  ``torch.load(weights_only=True)`` (numpy arrays allowed: the RNG state holds numpy's).

Imports no megatron-core. Each refusal is one :class:`~megatron_vp2o.config.ConfigError` line.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from megatron_vp2o.checkpoint.state import refusal
from megatron_vp2o.config import ConfigError

_CLASS_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_TORCH_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
_NUMPY_GLOBALS = [np.dtype, np.ndarray, (getattr(np, "_core", None) or np.core).multiarray._reconstruct] + [
    getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file holds a pickle that could run code on load; it was not loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _TORCH_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_CLASS_MODULES):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def _refuse(path: Path, what: str, reason: str):
    raise UnsafeCheckpointError(f"{what}: '{path}' holds a pickle that could run code on load ({reason[:160]}); "
                                "it was not loaded: use a checkpoint written by vp2o from a source you trust")


def _weights_only(raw: bytes, path: Path, what: str, entry: str) -> None:
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001  (any refusal of the weights-only unpickler)
        _refuse(path, what, f"entry '{entry}': {refusal(exc)}")


def read_metadata(found: Path, what: str):
    """The torch.distributed.checkpoint ``Metadata`` of ``found``, through the restricted unpickler."""
    path = found / ".metadata"
    try:
        with path.open("rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ConfigError(f"{what}: '{found}' has no .metadata; it is not a complete dist checkpoint") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as exc:
        _refuse(path, what, str(exc) or type(exc).__name__)


def verify_checkpoint(found: str | Path, what: str = "checkpoint") -> None:
    """Check every pickle megatron would read from checkpoint directory ``found`` (module doc)."""
    found = Path(found)
    metadata = read_metadata(found, what)
    kinds = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(kinds, dict) or not isinstance(storage, dict):
        _refuse(found / ".metadata", what, "not a torch.distributed.checkpoint Metadata")
    bytes_entries = {fqn for fqn, kind in kinds.items() if type(kind).__name__ == "BytesStorageMetadata"}
    handles: dict[str, object] = {}
    try:
        for index, info in storage.items():
            if getattr(index, "fqn", None) not in bytes_entries:
                continue
            file = found / str(info.relative_path)
            if file.parent != found:
                _refuse(found / ".metadata", what, f"entry '{index.fqn}' points outside the checkpoint")
            handle = handles.get(file.name) or handles.setdefault(file.name, file.open("rb"))
            handle.seek(int(info.offset))
            _weights_only(handle.read(int(info.length)), file, what, index.fqn)
    finally:
        for handle in handles.values():
            handle.close()
    common = found / "common.pt"
    if common.is_file():
        _weights_only(common.read_bytes(), common, what, "common state")


def read_common(found: str | Path, what: str = "checkpoint") -> dict | None:
    """The common state of checkpoint ``found`` (``common.pt``: step, ``extra``, scheduler), read
    weights-only as :func:`verify_checkpoint` checks it; None when there is no ``common.pt``
    (megatron-core >= 0.19 keeps it as a ``common_state`` sharded object: compat.py row 5). Writes nothing."""
    common = Path(found) / "common.pt"
    if not common.is_file():
        return None
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            blob = torch.load(common, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001  (any refusal of the weights-only unpickler)
        _refuse(common, what, f"entry 'common state': {refusal(exc)}")
    return blob if isinstance(blob, dict) else {}
