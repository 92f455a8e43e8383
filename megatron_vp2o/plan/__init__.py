"""``vp2o plan``: per-rank memory of a config on a layout, without building anything.

:mod:`.counts` counts the parameters a rank holds (checked against megatron's model built on the
``meta`` device); :mod:`.memory` turns them into bytes per row (parameters, gradients, optimizer
shard, trust-region snapshot, prototypes, Stein buffers, activations, KV cache) and a fits /
does-not-fit verdict for a named GPU with headroom; :func:`render` prints the table.
"""

from __future__ import annotations

from megatron_vp2o.plan.counts import StageParams, model_params, stage_params
from megatron_vp2o.plan.memory import GIB, GPUS, ROWS, RankPlan, plan_rank


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render(title: str, plans: list[RankPlan]) -> str:
    """A fixed-width table: one column per plan (layout), one row per memory item, in GiB."""
    heads = [f"[{i}] {p.world} GPUs" for i, p in enumerate(plans)]
    width = max([10] + [len(h) for h in heads]) + 2
    lines = [title]
    lines += [f"  [{i}] {p.layout}  params/rank {p.params.total / 1e9:.3f} B "
              f"(dense {p.params.dense / 1e9:.3f} B, expert {p.params.expert / 1e9:.3f} B)" for i, p in enumerate(plans)]
    lines.append(f"{'GiB per rank':<24}" + "".join(f"{h:>{width}}" for h in heads))
    for row in ROWS:
        lines.append(f"{row:<24}" + "".join(f"{_gib(p.bytes[row]):>{width}}" for p in plans))
    for name, fn in (("peak (no recompute)", lambda p: _gib(p.peak_bytes(False))),
                     ("peak (selective)", lambda p: _gib(p.peak_bytes("selective"))),
                     ("peak (full recompute)", lambda p: _gib(p.peak_bytes(True))),
                     ("peak (model.recompute)", lambda p: _gib(p.peak)),
                     ("usable (1 - headroom)", lambda p: _gib(p.usable)),
                     ("fits (no recompute)", lambda p: _yes(p.fits(False))),
                     ("fits (full recompute)", lambda p: _yes(p.fits(True))),
                     ("fits (model.recompute)", lambda p: _yes(p.fits())),
                     ("host GiB per node", lambda p: _gib(p.host_per_node)),
                     ("host fits (2 TB/node)", lambda p: _yes(p.host_fits()))):
        lines.append(f"{name:<24}" + "".join(f"{fn(p):>{width}}" for p in plans))
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


__all__ = ["GIB", "GPUS", "ROWS", "RankPlan", "StageParams", "model_params", "plan_rank", "render", "stage_params"]
