"""Configs across versions: the table of config keys that moved or went away, applied to every
config a checkpoint saved (``vp2o.json``) before it is built, and to every YAML and its dotted
overrides (``load_config``), so old checkpoints and old configs and command lines keep loading.

A checkpoint records the project version that wrote it (``vp2o.json`` ``"version"``; checkpoints
without one were written by 0.1.0, the version before versions were recorded). :func:`migrate_config`
applies every :data:`MIGRATIONS` entry whose version is not older than the checkpoint's, in table
order (so renames chain: ``rl.inner_epochs`` -> ``rl.epochs`` -> ``rl.grpo.epochs``); an entry whose
old key is absent does nothing, so applying one twice is harmless. A checkpoint of a newer version
than this one is refused with one line (its keys may mean something this version does not know).
A YAML records no version: every entry applies (:func:`migrate_input`), and each old key read is
reported once as a ``FutureWarning`` naming its new place.

A new key may name another key of the same config in braces, resolved from that config
(``rl.{rl.algo}.clip_eps``: the clip went to the section of the algorithm the config ran).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from typing import Any

import megatron_vp2o
from megatron_vp2o.config.loader import ConfigError, apply_overrides

PROJECT_VERSION: str = megatron_vp2o.__version__
UNVERSIONED = "0.1.0"  # what wrote a checkpoint that records no version


@dataclasses.dataclass(frozen=True)
class Change:
    """One config key that moved (``new``) or was removed (``new`` None) in ``version``."""

    version: str  # the first version whose configs no longer have ``old``
    old: str  # dotted key, e.g. "rl.inner_epochs"
    new: str | None  # dotted key it moved to ({other.key}: that key's value); None: removed (value dropped)
    why: str  # what changed, and where (commit)
    implies: tuple[tuple[str, Any], ...] = ()  # keys set (when absent) to keep the old meaning
    defaults: tuple[tuple[str, Any], ...] = ()  # values of keys named in ``new`` when the config lacks them
    none_is_default: bool = False  # an old value None is dropped: the new key's default means what None meant

    def describe(self) -> str:
        target = f"-> {self.new}" if self.new else "removed"
        extra = "".join(f", {k}={v!r}" for k, v in self.implies)
        return f"{self.version}: {self.old} {target}{extra} ({self.why})"

    def target(self, context: dict) -> str | None:
        """``new`` with every ``{dotted.key}`` replaced by that key's value in ``context``."""
        if self.new is None:
            return None
        defaults = dict(self.defaults)
        return re.sub(r"\{([^}]+)\}", lambda m: str(_get(context, m.group(1), defaults.get(m.group(1)))), self.new)


MIGRATIONS: tuple[Change, ...] = (
    Change("0.1.0", "rl.inner_epochs", "rl.epochs",
           "05c75cd: GRPO takes rl.mini_batches x rl.epochs optimizer steps per rollout batch; inner_epochs "
           "was one optimizer step per pass over the whole batch", implies=(("rl.mini_batches", 1),)),
    # 0.3.0 (issue 22 item 3): each algorithm's tuned learner settings in its own section, rl.grpo / rl.vp2o
    Change("0.3.0", "rl.mini_batches", "rl.grpo.mini_batches",
           "GRPO's optimizer steps per epoch moved to its section (VP2O never read them)"),
    Change("0.3.0", "rl.epochs", "rl.grpo.epochs", "GRPO's passes over a rollout batch moved to its section"),
    Change("0.3.0", "rl.policy_loss.clip_eps", "rl.{rl.algo}.clip_eps",
           "the clip is each algorithm's own (it was shared: a GRPO clip switched clipping on for VP2O too); a "
           "value goes to the section of the config's rl.algo, null (0.2 for grpo, none for vp2o) to the defaults",
           defaults=(("rl.algo", "vp2o"),), none_is_default=True),
    Change("0.3.0", "rl.vllm.weight_transfer", None,
           "issue 20: an engine over several ranks has a worker in each rank's process (vLLM's "
           "external_launcher), so every refresh is in-process; the CUDA IPC transfer went away"),
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


def _get(data: dict, dotted: str, default=None):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


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


def migrate_config(saved: dict, version: Any = None, what: str = "checkpoint", where: str = "",
                   context: dict | None = None, overwrite: bool = False, moved: list | None = None) -> dict:
    """A copy of ``saved`` (a config dict written by ``version``) with the keys of this version.

    ``context``: the config that braces in a new key are read from (default: ``saved``, as it is
    migrated). An old key's value goes to its new key only where that is absent, or always with
    ``overwrite`` (an old key given on the command line is the last word). ``moved`` collects the
    changes applied."""
    version = parse_version(check_version(version, what, where), what)
    data = copy.deepcopy(saved)
    for change in MIGRATIONS:
        if parse_version(change.version, what) < version:
            continue
        found, value = _pop(data, change.old)
        if not found:
            continue
        new = change.target(data if context is None else context)
        keep = not (change.none_is_default and value is None)
        if new is not None and keep and (overwrite or not _has(data, new)):
            _put(data, new, value)
        for key, implied in change.implies:
            if not _has(data, key):
                _put(data, key, implied)
        if moved is not None:
            moved.append((change, new))
    return data


def migrate_input(data: dict, overrides: list[str], what: str = "--config") -> dict:
    """A YAML's ``data`` with the dotted ``overrides`` applied, both in this version's keys: the YAML
    is migrated first (its braces read the final config, overrides included), then the overrides are
    applied, then an old key among them is moved over whatever is there. Each old key read is
    reported once (``FutureWarning``) with its new place."""
    moved: list = []
    final = apply_overrides(copy.deepcopy(data), list(overrides))
    data = migrate_config(data, None, what, context=final, moved=moved)
    data = apply_overrides(data, list(overrides))
    data = migrate_config(data, None, what, overwrite=True, moved=moved)
    for change, new in dict.fromkeys(moved):
        place = f"is {new}" if new else "was removed"
        warnings.warn(f"{what}: {change.old} {place} since megatron-vp2o {change.version} (read as such); "
                      "update the config or command line", FutureWarning, stacklevel=3)
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
