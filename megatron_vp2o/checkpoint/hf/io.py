"""Streaming safetensors IO for Hugging Face checkpoints, validated up front, written atomically.

:class:`HFReader` opens a checkpoint directory lazily (``safe_open``: tensors are read one at a
time, memory-mapped), after checking everything that can be checked without reading tensor data:
``config.json`` parses, the index names existing shards, every shard's header parses and its
data section is complete (a truncated download fails here, with the file named, instead of deep
inside a conversion). :class:`ShardedWriter` buffers tensors up to ``max_shard_bytes`` and writes
HF-style shards plus ``model.safetensors.index.json``. :func:`atomic_dir` builds an output in a
sibling temporary directory and renames it into place only on success, so a failed conversion
leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_vp2o.checkpoint.hf.archs import ConversionError

INDEX = "model.safetensors.index.json"


def _check_shard(path: Path) -> dict[str, list[int]]:
    """{name: shape} from one safetensors header; raises if the header is bad or the data is truncated."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"'{path}' is not a valid safetensors file ({exc}); re-download or re-export it") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise ConversionError(f"'{path}' is truncated or corrupted: its header describes {8 + n + end} bytes but the "
                              f"file has {size}; re-download or re-export it")
    return {k: v["shape"] for k, v in header.items()}


class HFReader:
    """Lazy, validated access to an HF checkpoint directory (``config``, ``keys()``, ``get(name)``)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"HF checkpoint directory '{self.dir}' does not exist")
        self.config = self._read_config()
        self.files = self._locate()
        self._handles: dict[Path, object] = {}

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise ConversionError(f"'{self.dir}' has no config.json; is it a Hugging Face model directory?")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"'{path}' is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise ConversionError(f"'{path}' must hold a JSON object")
        return cfg

    def _locate(self) -> dict[str, Path]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"'{index}' is not a valid safetensors index ({exc!r})") from None
            shards = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            weight_map, shards = None, ["model.safetensors"]
        else:
            raise ConversionError(f"'{self.dir}' has neither model.safetensors nor {INDEX} (only safetensors "
                                  "checkpoints convert; re-save with save_pretrained(safe_serialization=True))")
        files: dict[str, Path] = {}
        self.shapes: dict[str, tuple] = {}
        for shard in shards:
            path = self.dir / shard
            if not path.is_file():
                raise ConversionError(f"shard '{shard}' listed in {INDEX} is missing from '{self.dir}'")
            for key, shape in _check_shard(path).items():
                files[key] = path
                self.shapes[key] = tuple(shape)
        missing = sorted(set(weight_map or {}) - set(files))
        if missing:
            raise ConversionError(f"{len(missing)} tensors listed in {INDEX} are not in their shards, e.g. {missing[:3]}")
        return files

    def keys(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ConversionError(f"tensor '{name}' is missing from the HF checkpoint '{self.dir}'")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)


class ShardedWriter:
    """Write tensors into ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_bytes``."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 4 << 30):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.buffer or any(name in s for s in self.shards):
            raise ConversionError(f"tensor '{name}' was produced twice (converter bug)")
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max:
            self._flush()
        self.buffer[name] = tensor.detach().contiguous().clone()
        self.buffered += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(self.buffer, str(self.dir / f"part-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> dict[str, str]:
        """Flush, give shards their final names, write the index; returns the weight map."""
        if self.buffer:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"part-{i:05d}.tmp", self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2))
        return weight_map


def check_output_dir(out: str | Path) -> Path:
    """``out`` must not exist or be an empty directory (we never overwrite a checkpoint)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"output '{out}' already exists and is not empty; choose a new --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, owner: bool = True):
    """Yield a temporary sibling of ``out``; rename it to ``out`` on success, remove it on failure.

    ``owner=False`` ranks only receive the path (rank 0 creates, renames and cleans up).
    """
    out = check_output_dir(out)
    tmp = out.parent / f".{out.name}.partial"
    if owner:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if owner:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
