"""``vp2o plan``: per-rank memory of a config on a layout, without building anything.

:mod:`.counts` counts the parameters a rank holds (checked against megatron's model built on the
``meta`` device); :mod:`.memory` (with :mod:`.vp2o_rows` for VP2O's own state) turns them into
bytes per row (parameters, gradients, optimizer shard, trust-region snapshot, prototypes, routing
records, Stein buffers, activations, KV cache or the vLLM engine's share; host memory per node) and a fits / does-not-fit
verdict for a named GPU with headroom; :func:`render` prints the table; :mod:`.live` measures the
same rows on a live 1-rank run (``vp2o plan --check``).
"""

from __future__ import annotations

from megatron_vp2o.plan.counts import StageParams, model_params, stage_params
from megatron_vp2o.plan.memory import GIB, GPUS, GPUS_PER_NODE, HOST_BYTES, HOST_ROWS, ROWS, RankPlan, plan_rank


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render(title: str, plans: list[RankPlan]) -> str:
    """A fixed-width table: one column per plan (layout); the device rows per rank in GiB, the peaks
    and fits verdicts, then what lives in host memory per node (``GPUS_PER_NODE`` ranks) against the
    node's host memory."""
    heads = [f"[{i}] {p.world} GPUs" for i, p in enumerate(plans)]
    width = max([10] + [len(h) for h in heads]) + 2
    lines = [title]
    lines += [f"  [{i}] {p.layout}  params/rank {p.params.total / 1e9:.3f} B "
              f"(dense {p.params.dense / 1e9:.3f} B, expert {p.params.expert / 1e9:.3f} B)"
              for i, p in enumerate(plans)]
    lines.append(f"{'GiB per rank (device)':<26}" + "".join(f"{h:>{width}}" for h in heads))
    rows = [(row, lambda p, row=row: _gib(p.bytes[row])) for row in ROWS if row not in HOST_ROWS]
    if any(p.vllm_sequences is not None for p in plans):
        rows.append(("vllm_sequences", lambda p: "" if p.vllm_sequences is None else str(p.vllm_sequences)))
    rows += [("peak (no recompute)", lambda p: _gib(p.peak_bytes(False))),
             ("peak (selective)", lambda p: _gib(p.peak_bytes("selective"))),
             ("peak (full recompute)", lambda p: _gib(p.peak_bytes(True))),
             ("peak (model.recompute)", lambda p: _gib(p.peak)),
             ("usable (1 - headroom)", lambda p: _gib(p.usable)),
             ("fits (no recompute)", lambda p: _yes(p.fits(False))),
             ("fits (full recompute)", lambda p: _yes(p.fits(True))),
             ("fits (model.recompute)", lambda p: _yes(p.fits())),
             (f"GiB per node (host, x{GPUS_PER_NODE})", lambda p: "")]
    rows += [(f"{row} / node", lambda p, row=row: _gib(GPUS_PER_NODE * p.bytes[row])) for row in HOST_ROWS]
    rows += [("host total / node", lambda p: _gib(p.host_per_node)),
             ("host memory / node", lambda p: _gib(HOST_BYTES)),
             ("host fits", lambda p: _yes(p.host_fits()))]
    for name, fn in rows:
        lines.append((f"{name:<26}" + "".join(f"{fn(p):>{width}}" for p in plans)).rstrip())
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


__all__ = ["GIB", "GPUS", "GPUS_PER_NODE", "HOST_BYTES", "HOST_ROWS", "ROWS", "RankPlan", "StageParams",
           "model_params", "plan_rank", "render", "stage_params"]
