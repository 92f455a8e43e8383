"""Saved configs across versions: the table of config keys that moved or went away, applied to every
config a checkpoint saved (``vp2o.json``) before it is built.

A checkpoint records the project version that wrote it (``vp2o.json`` ``"version"``; checkpoints
without one were written by 0.1.0, the version before versions were recorded). :func:`migrate_config`
applies every :data:`MIGRATIONS` entry whose version is not older than the checkpoint's, in table
order (so renames chain: ``rl.inner_epochs`` -> ``rl.epochs`` -> ...); an entry whose old key is
absent does nothing, so applying one twice is harmless. A checkpoint of a newer version than this
one is refused with one line (its keys may mean something this version does not know).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import megatron_vp2o
from megatron_vp2o.config.loader import ConfigError

PROJECT_VERSION: str = megatron_vp2o.__version__
UNVERSIONED = "0.1.0"  # what wrote a checkpoint that records no version


@dataclasses.dataclass(frozen=True)
class Change:
    """One config key that moved (``new``) or was removed (``new`` None) in ``version``."""

    version: str  # the first version whose configs no longer have ``old``
    old: str  # dotted key, e.g. "rl.inner_epochs"
    new: str | None  # dotted key it moved to; None: removed (its value is dropped)
    why: str  # what changed, and where (commit)
    implies: tuple[tuple[str, Any], ...] = ()  # keys set (when absent) to keep the old meaning

    def describe(self) -> str:
        target = f"-> {self.new}" if self.new else "removed"
        extra = "".join(f", {k}={v!r}" for k, v in self.implies)
        return f"{self.version}: {self.old} {target}{extra} ({self.why})"


MIGRATIONS: tuple[Change, ...] = (
    Change("0.1.0", "rl.inner_epochs", "rl.epochs",
           "05c75cd: GRPO takes rl.mini_batches x rl.epochs optimizer steps per rollout batch; inner_epochs "
           "was one optimizer step per pass over the whole batch", implies=(("rl.mini_batches", 1),)),
)


def parse_version(text: Any, what: str) -> tuple[int, ...]:
    parts = str(text).split(".")
    if not (1 <= len(parts) <= 4 and all(p.isdigit() for p in parts)):
        raise ConfigError(f"{what}: checkpoint version {text!r} is not a version like {PROJECT_VERSION!r}; the "
                          "checkpoint's vp2o.json is damaged: point at another checkpoint")
    return tuple(int(p) for p in parts) + (0,) * (4 - len(parts))


def check_version(version: Any, what: str, where: str = "") -> str:
    """The checkpoint's version (``UNVERSIONED`` for None); a newer one than ours is a one-line error."""
    version = UNVERSIONED if version is None else str(version)
    if parse_version(version, what) > parse_version(PROJECT_VERSION, what):
        at = f" '{where}'" if where else ""
        raise ConfigError(f"{what}: checkpoint{at} was written by megatron-vp2o {version}, newer than this "
                          f"{PROJECT_VERSION}; upgrade megatron-vp2o (git pull && make install) to read it")
    return version


def _pop(data: dict, dotted: str):
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if leaf not in node:
        return False, None
    return True, node.pop(leaf)


def _has(data: dict, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return  # a malformed saved config: build() names it
    node[leaf] = value


def migrate_config(saved: dict, version: Any = None, what: str = "checkpoint", where: str = "") -> dict:
    """A copy of ``saved`` (a config dict written by ``version``) with the keys of this version."""
    version = parse_version(check_version(version, what, where), what)
    data = copy.deepcopy(saved)
    for change in MIGRATIONS:
        if parse_version(change.version, what) < version:
            continue
        found, value = _pop(data, change.old)
        if not found:
            continue
        if change.new is not None and not _has(data, change.new):
            _put(data, change.new, value)
        for key, implied in change.implies:
            if not _has(data, key):
                _put(data, key, implied)
    return data


def migrate_meta(meta: dict, what: str = "checkpoint", where: str = "") -> dict:
    """``vp2o.json`` contents with its saved config migrated (version checked even without a config)."""
    version = check_version(meta.get("version"), what, where)
    if isinstance(meta.get("config"), dict):
        meta = dict(meta, config=migrate_config(meta["config"], version, what, where))
    return meta


def table() -> str:
    """The migration table, one change per line (docs)."""
    return "\n".join(change.describe() for change in MIGRATIONS)
