"""Checkpoint metadata without megatron: find the newest complete checkpoint, read its ``vp2o.json``,
and check that it holds the model our config builds *before* any tensor is loaded.

Every checkpoint this project writes (``vp2o sft``, ``vp2o train``, ``vp2o convert hf-to-mcore``)
stores the full config it was written with in ``vp2o.json`` (``{"config": {"model": {...}, ...}}``)
and the project version that wrote it (``"version"``); :func:`read_meta` returns the config migrated to
this version's keys (:mod:`megatron_vp2o.config.migrate`) and refuses a newer version's checkpoint.
:func:`check_same_model` compares the fields that decide tensor names and shapes; a checkpoint
without a saved config (none are known, but a hand-made one may lack it) is not compared and loads
as before. Nothing here imports megatron-core, so the CLI runs these checks before the platform
layer or any process group exists.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_vp2o.config import ConfigError
from megatron_vp2o.config.migrate import PROJECT_VERSION, migrate_meta

# ModelConfig fields that decide which tensors a checkpoint holds and their shapes.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim", "num_experts",
                "moe_ffn_hidden_size", "ffn_hidden_size", "moe_layer_freq", "shared_expert_ffn_hidden_size",
                "vocab_size", "qk_layernorm", "untie_embeddings", "swiglu")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one), else None."""
    root = Path(root)
    if (root / "vp2o.json").is_file():
        return root
    marker = root / "latest"
    if marker.is_file():
        try:
            path = root / marker.read_text().strip()
        except (OSError, UnicodeDecodeError):
            path = None
        if path is not None and (path / "vp2o.json").is_file():
            return path
    done = sorted(p for p in root.glob("iter_*") if p.suffix != ".tmp" and (p / "vp2o.json").is_file())
    return done[-1] if done else None


def new_meta(**fields) -> dict:
    """The ``vp2o.json`` of a checkpoint written now: ``fields`` plus this project version."""
    return dict(fields, version=PROJECT_VERSION)


def read_meta(found: str | Path, what: str) -> dict:
    """``found/vp2o.json`` as a dict, its saved config migrated to this version's keys (a checkpoint of a
    newer version is refused); unreadable or malformed metadata is a one-line :class:`ConfigError`."""
    path = Path(found) / "vp2o.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = getattr(exc, "msg", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{what}: checkpoint metadata '{path}' cannot be read ({reason}); "
                          "the checkpoint is damaged: point at another one") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{what}: checkpoint metadata '{path}' is not a JSON object; point at another checkpoint")
    return migrate_meta(meta, what, str(found))  # the saved config in this version's keys (config/migrate.py)


def find_checkpoint(path: str | Path, what: str) -> Path:
    """The newest complete checkpoint at ``path``, or a :class:`ConfigError` naming ``what``."""
    found = latest_checkpoint(path)
    if found is None:
        raise ConfigError(f"{what}: no complete checkpoint at '{path}' (a directory written by `vp2o sft`, "
                          "`vp2o train` or `vp2o convert hf-to-mcore`, holding vp2o.json or a 'latest' marker)")
    return found


def _head_dim(model: dict):
    return model.get("head_dim") or model["hidden_size"] // max(1, model["num_attention_heads"])


def model_differences(saved: dict, ours: dict) -> list[str]:
    """``model.<field>`` differences (saved first) over :data:`SHAPE_FIELDS` present in both."""
    out = []
    for name in SHAPE_FIELDS:
        if name not in saved or name not in ours:
            continue
        a, b = saved[name], ours[name]
        if name == "head_dim":
            try:
                a, b = _head_dim(saved), _head_dim(ours)
            except (KeyError, TypeError):
                pass
        if a != b:
            out.append(f"model.{name} is {a!r} there, {b!r} here")
    return out


def check_same_model(path: str | Path, model_cfg, what: str) -> Path:
    """Check that the checkpoint at ``path`` was written for ``model_cfg`` (a ModelConfig); returns
    the checkpoint directory. Raises a one-line :class:`ConfigError` naming ``what`` otherwise."""
    import dataclasses

    found = find_checkpoint(path, what)
    saved = (read_meta(found, what).get("config") or {}).get("model")
    if not isinstance(saved, dict):
        return found  # no saved config to compare with: loads as before
    diffs = model_differences(saved, dataclasses.asdict(model_cfg))
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(f"{what}: checkpoint '{found}' is of a different model: {diffs[0]}{more}; set the "
                          f"model.* fields to the checkpoint's (see its vp2o.json) or point {what} at a "
                          "checkpoint of this model")
    return found


# The RL loop's scalars a `vp2o train` checkpoint keeps in its common ``extra`` to resume exactly: the saved
# fields of rl/state.py ``LoopState`` (listed here so the pre-flight imports no megatron;
# tests/checkpoint/test_pre_loop_state.py keeps the two equal). RL checkpoints written before the loop state
# was saved (before 05c75cd) lack next_refresh, forced, anchor_failed, samples, tokens and elapsed_s.
RL_LOOP_KEYS = ("step", "refreshes", "steps_since_refresh", "next_refresh", "forced", "anchor_failed", "skipped",
                "samples", "tokens", "elapsed_s")


def missing_rl_loop_state(found: str | Path, what: str = "--resume") -> list[str]:
    """The :data:`RL_LOOP_KEYS` an RL checkpoint (``vp2o.json`` kind ``rl``) lacks in its ``extra``, in
    that order; ``[]`` for a complete one, another kind, or a checkpoint without ``common.pt`` (the 0.19
    layout, read only by megatron-core: the RL session checks it when it loads, `missing_loop_keys`).
    Reads ``common.pt`` weights-only, writes nothing."""
    if read_meta(found, what).get("kind") != "rl":
        return []
    from megatron_vp2o.checkpoint.safety import read_common

    common = read_common(found, what)
    if common is None:
        return []
    return missing_loop_keys(common.get("extra"))


def missing_loop_keys(extra) -> list[str]:
    """The :data:`RL_LOOP_KEYS` missing from a checkpoint's ``extra`` (a dict, or anything else: all)."""
    extra = extra if isinstance(extra, dict) else {}
    return [key for key in RL_LOOP_KEYS if key not in extra]


def loop_state_refusal(found, missing: list[str], new_dirs: str = "a new --out") -> str:
    """The one line that refuses to resume an RL checkpoint without the loop state, and the way on."""
    return (f"--resume: checkpoint '{found}' was written before RL checkpoints kept the loop state "
            f"(it lacks {', '.join(missing)}), so its run cannot be resumed; start a fresh run from "
            f"its weights instead: rl.policy={found} with {new_dirs}, without --resume")


def require_loop_state(found, extra) -> None:
    """Refuse to resume from checkpoint ``found`` whose loaded ``extra`` lacks the loop state, with
    `loop_state_refusal`'s line (the RL session's check for layouts the pre-flight cannot read)."""
    missing = missing_loop_keys(extra)
    if missing:
        from megatron_vp2o.checkpoint.state import CheckpointStateError

        raise CheckpointStateError(loop_state_refusal(found, missing))
