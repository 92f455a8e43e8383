"""PNG plots of training runs from their ``metrics.jsonl`` (``vp2o plot``), plus an ``index.html``.

Runs are grouped by name with a trailing seed suffix removed (``vp2o_seed1``, ``vp2o_seed2`` ->
``vp2o``); a run directory named only by its seed (``vp2o compare``'s ``OUT/task/arm/seed_N``)
belongs to the group ``task/arm``. A group's curve is the mean over its seeds and the shaded band
spans the seeds' min..max at each step. Figures (each skipped when no run logged
its keys):

  reward.png        reward/mean and reward/pass_at_1 per step
  eval.png          every eval/* number (start/periodic/end evaluations, and rl.eval benchmarks)
  router_entropy.png  moe/router_entropy/layerN: heatmap layers x steps, one panel per group
  utilisation.png   moe/utilisation/layerN (tokens per expert, as fractions): experts x steps per layer
                    (at most 8 layers, evenly spaced)
  overlap.png       moe/proto_overlap and moe/coact_overlap: heatmaps layers x steps per group
  trust_region.png  vp2o/d_anc, vp2o/drift, vp2o/ess with their thresholds (the run's config, else
                    the defaults: anchor_delta, drift_delta, ess_min)
  loss_grads.png    spec/grad_ratio_{ortho,var}/layerN (log10): heatmaps layers x steps per group
  ratios.png        policy/ratio_p50, policy/ratio_p99, policy/ratio_max per step (both algorithms)
  decisions.png     trust-region decision per step (accept / backtrack / reject) and refreshes

Heatmaps show the first group's seeds averaged; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from pathlib import Path

_SEED = re.compile(r"(?:[_-]?seed[_-]?|[_-]s)\d+$")
_SEED_DIR = re.compile(r"seed[_-]?\d+")
_LAYER = re.compile(r"/layer(\d+)$")
DECISIONS = ("accept", "backtrack", "reject", "refresh")
MAX_LAYER_PANELS = 8  # utilisation panels: at most this many layers, evenly spaced


@dataclasses.dataclass
class Run:
    name: str
    group: str
    rows: list[dict]
    thresholds: dict


def _thresholds(run_dir: Path) -> dict:
    """anchor_delta / drift_delta / ess_min of the run's saved config, else the defaults."""
    from megatron_vp2o.algo.config import TrustRegionConfig

    tr = TrustRegionConfig()
    out = {"anchor_delta": tr.anchor_delta, "drift_delta": tr.drift_delta, "ess_min": tr.ess_min}
    for meta in sorted(run_dir.glob("checkpoints/iter_*/vp2o.json"))[-1:]:
        saved = json.loads(meta.read_text()).get("config", {}).get("vp2o", {}).get("trust_region", {})
        out.update({k: saved[k] for k in out if isinstance(saved.get(k), (int, float))})
    return out


def read_metrics(path: str | Path) -> list[dict] | None:
    """The rows of a run directory's ``metrics.jsonl`` (one dict per logged step), or None when the
    directory has none. The one reader of metrics files (plots, ``vp2o compare``'s report)."""
    metrics = Path(path) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def load_run(path: str | Path) -> Run:
    path = Path(path)
    rows = read_metrics(path)
    if rows is None:
        raise FileNotFoundError(f"run '{path}' has no metrics.jsonl; pass the --out directory of `vp2o train`")
    if _SEED_DIR.fullmatch(path.name):  # OUT/task/arm/seed_N
        group = f"{path.parent.parent.name}/{path.parent.name}"
        return Run(f"{group}/{path.name}", group, rows, _thresholds(path))
    return Run(path.name, _SEED.sub("", path.name) or path.name, rows, _thresholds(path))


def _num(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def series(rows: list[dict], key: str) -> dict[int, float]:
    """step -> value of ``key`` (numeric entries only)."""
    return {r["step"]: v for r in rows if (v := _num(r.get(key))) is not None}


def mean_band(curves: list[dict], spread: str = "range"):
    """(xs, mean, lo, hi) of several ``{x: value}`` curves at every x some curve has; the band is
    the min..max (``spread="range"``) or mean +- one sample standard deviation (``"sd"``). The one
    mean-and-band of the project (``vp2o plot`` and ``vp2o compare``'s report)."""
    xs = sorted({x for c in curves for x in c})
    vals = [[c[x] for c in curves if x in c] for x in xs]
    mean = [sum(v) / len(v) for v in vals]
    if spread == "range":
        return xs, mean, [min(v) for v in vals], [max(v) for v in vals]
    sd = [math.sqrt(sum((u - m) ** 2 for u in v) / (len(v) - 1)) if len(v) > 1 else 0.0 for v, m in zip(vals, mean)]
    return xs, mean, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)]


def band(runs: list[Run], key: str):
    """(steps, mean, lo, hi) over the runs at every step some run logged ``key`` (band: min..max)."""
    return mean_band([series(r.rows, key) for r in runs])


def _groups(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict = {}
    for r in runs:
        out.setdefault(r.group, []).append(r)
    return out


def _keys(runs: list[Run], pattern: str) -> list[str]:
    found = {k for r in runs for row in r.rows for k in row if re.fullmatch(pattern, k)}
    return sorted(found, key=lambda k: (_LAYER.sub("", k), int(m.group(1)) if (m := _LAYER.search(k)) else 0))


def _line_panels(runs, keys, path: Path, title: str, hlines: dict | None = None) -> bool:
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(series(r.rows, k) for r in runs)]
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for group, members in _groups(runs).items():
            steps, mean, lo, hi = band(members, key)
            if steps:
                line, = ax.plot(steps, mean, marker="." if len(steps) < 30 else None,
                                label=f"{group} (n={len(members)})")
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        if hlines and key in hlines:
            ax.axhline(hlines[key], color="red", linestyle="--", label="threshold")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(fig, axes, len(keys), title, path)


def _matrix(runs: list[Run], keys: list[str], vector: bool = False):
    """steps, [len(keys) or E, steps] mean over runs (vector: one key's per-expert fractions)."""
    import numpy as np

    steps = sorted({row["step"] for r in runs for row in r.rows if any(k in row for k in keys)})
    if vector:
        key = keys[0]
        cols = []
        for s in steps:
            vecs = [np.asarray(row[key], float) for r in runs for row in r.rows if row["step"] == s and key in row]
            vecs = [v / v.sum() if v.sum() > 0 else v for v in vecs]
            cols.append(np.mean(vecs, axis=0) if vecs else None)
        width = max(len(c) for c in cols if c is not None)
        return steps, np.array([c if c is not None else np.full(width, np.nan) for c in cols]).T
    rows = []
    for key in keys:
        at = dict(zip(*band(runs, key)[:2]))
        rows.append([at.get(s, np.nan) for s in steps])
    return steps, np.array(rows)


def _heatmaps(panels: list[tuple[str, list, object, list[str]]], path: Path, title: str, cbar: str) -> bool:
    import matplotlib.pyplot as plt

    if not panels:
        return False
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, steps, mat, ylabels) in zip(axes.flat, panels):
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, len(ylabels) - 0.5, -0.5))
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, label=cbar)
    return _save(fig, axes, len(panels), title, path)


def plot_router_entropy(runs, path: Path) -> bool:
    keys = _keys(runs, r"moe/router_entropy/layer\d+")
    panels = []
    for group, members in _groups(runs).items():
        steps, mat = _matrix(members, keys) if keys else ([], None)
        if steps:
            panels.append((f"{group}: router entropy (nats)", steps, mat, [k.rsplit("/", 1)[1] for k in keys]))
    return _heatmaps(panels, path, "Router entropy per layer", "entropy")


def plot_overlap(runs, path: Path) -> bool:
    panels = []
    for group, members in _groups(runs).items():
        for kind in ("proto", "coact"):
            keys = _keys(members, rf"moe/{kind}_overlap/layer\d+")
            steps, mat = _matrix(members, keys) if keys else ([], None)
            if steps:
                panels.append((f"{group}: {kind}_overlap", steps, mat, [k.rsplit("/", 1)[1] for k in keys]))
    return _heatmaps(panels, path, "Prototype overlap and co-activation overlap per layer", "overlap")


def _spread(keys: list[str], most: int) -> list[str]:
    """At most ``most`` keys, evenly spaced, first and last included."""
    if len(keys) <= most:
        return keys
    return [keys[round(i * (len(keys) - 1) / (most - 1))] for i in range(most)]


def plot_utilisation(runs, path: Path) -> bool:
    group, members = next(iter(_groups(runs).items()))
    panels = []
    for key in _spread(_keys(members, r"moe/utilisation/layer\d+"), MAX_LAYER_PANELS):
        steps, mat = _matrix(members, [key], vector=True)
        if steps:
            panels.append((f"{group}: {key}", steps, mat, [f"e{i}" for i in range(mat.shape[0])]))
    return _heatmaps(panels, path, "Expert utilisation (fraction of routed tokens)", "fraction")


def plot_stein(runs, path: Path) -> bool:
    """Heatmaps layers x steps (mean over seeds) of whether the Stein parts act (issue 21): relative
    change of the gradient by the attraction and by the repulsion, kernel spread (min, median, max
    off-diagonal k) and the shares of experts co-active / inactive."""
    panels = []
    for group, members in _groups(runs).items():
        for name in ("rel_change_attraction", "rel_change_repulsion", "kernel_min", "kernel_median", "kernel_max",
                     "share_coactive", "share_inactive"):
            keys = _keys(members, rf"stein/{name}/layer\d+")
            steps, mat = _matrix(members, keys) if keys else ([], None)
            if steps:
                panels.append((f"{group}: {name}", steps, mat, [k.rsplit("/", 1)[1] for k in keys]))
    return _heatmaps(panels, path, "Stein transport per layer: relative change, kernel spread, expert shares", "value")


def plot_loss_grads(runs, path: Path) -> bool:
    """Heatmaps layers x steps (mean over seeds) of the specialisation losses' gradient norms relative
    to the policy gradient's (spec/grad_ratio_{ortho,var}, log10; issue 21), where a run logged them."""
    import numpy as np

    panels = []
    for group, members in _groups(runs).items():
        for name in ("ortho", "var"):
            keys = _keys(members, rf"spec/grad_ratio_{name}/layer\d+")
            steps, mat = _matrix(members, keys) if keys else ([], None)
            if steps:
                with np.errstate(divide="ignore", invalid="ignore"):
                    mat = np.log10(mat)
                mat[~np.isfinite(mat)] = np.nan
                panels.append((f"{group}: log10 |grad {name}| / |grad pg|", steps, mat,
                               [k.rsplit("/", 1)[1] for k in keys]))
    return _heatmaps(panels, path, "Specialisation-loss gradient norms against the policy gradient's", "log10 ratio")


def plot_decisions(runs, path: Path) -> bool:
    import matplotlib.pyplot as plt

    if not any(isinstance(row.get("vp2o/decision"), str) for r in runs for row in r.rows):
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.8 * len(runs) + 0.8), squeeze=False)
    colors = {"accept": "tab:green", "backtrack": "tab:orange", "reject": "tab:red", "refresh": "tab:purple"}
    for ax, run in zip(axes[:, 0], runs):
        for y, name in enumerate(DECISIONS):
            steps = [row["step"] for row in run.rows if row.get("vp2o/decision") == name]
            ax.scatter(steps, [y] * len(steps), color=colors[name], s=25, label=name)
        fresh = [row["step"] for row in run.rows if row.get("vp2o/refreshed") is True]
        ax.scatter(fresh, [len(DECISIONS)] * len(fresh), marker="|", s=200, color="black", label="rollout refresh")
        ax.set_yticks(range(len(DECISIONS) + 1), [*DECISIONS, "refreshed"], fontsize=7)
        ax.set_title(f"{run.name}: trust-region decisions and actor refreshes", fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_plots(run_dirs: list[str | Path], out: str | Path) -> list[tuple[str, str]]:
    """Write the PNGs and index.html under ``out``; returns (file, caption) of each figure written."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    th = runs[0].thresholds
    figures = [
        ("reward.png", "Training reward (mean, pass@1) per step; band = min..max over seeds",
         lambda p: _line_panels(runs, ["reward/mean", "reward/pass_at_1"], p, "Reward")),
        ("eval.png", "Evaluations (eval/*): start, every rl.eval_every steps, end; rl.eval benchmarks",
         lambda p: _line_panels(runs, _keys(runs, r"eval/.+"), p, "Evaluation")),
        ("router_entropy.png", "Router entropy per MoE layer over steps (mean over seeds)",
         lambda p: plot_router_entropy(runs, p)),
        ("utilisation.png", f"Expert utilisation per layer over steps ({runs[0].group})",
         lambda p: plot_utilisation(runs, p)),
        ("overlap.png", "Prototype overlap and co-activation overlap: heatmaps layers x steps (mean over seeds)",
         lambda p: plot_overlap(runs, p)),
        ("trust_region.png", "Anchor distance D_anc, behaviour drift and ESS with their thresholds (dashed)",
         lambda p: _line_panels(runs, ["vp2o/d_anc", "vp2o/drift", "vp2o/ess", "vp2o/refreshes"], p, "Trust region",
                                {"vp2o/d_anc": th["anchor_delta"], "vp2o/drift": th["drift_delta"],
                                 "vp2o/ess": th["ess_min"]})),
        ("stein.png", "Stein transport per layer: ||attraction - raw|| / ||raw||, ||alpha dR/dW|| / ||raw||, kernel "
         "spread (min / median / max off-diagonal k), shares of experts co-active / inactive (mean over seeds)",
         lambda p: plot_stein(runs, p)),
        ("loss_grads.png", "Orthogonality / variance loss gradient norm over the policy gradient's, per layer "
         "(log10; every logging.loss_grad_every steps, mean over seeds)", lambda p: plot_loss_grads(runs, p)),
        ("ratios.png", "Per-token likelihood ratio pi/mu of each update: p50, p99, max",
         lambda p: _line_panels(runs, ["policy/ratio_p50", "policy/ratio_p99", "policy/ratio_max"], p,
                                "Likelihood ratios")),
        ("decisions.png", "Trust-region decisions and rollout refreshes per step", lambda p: plot_decisions(runs, p)),
    ]
    written = [(name, caption) for name, caption, draw in figures if draw(out / name)]
    write_index(out, runs, written)
    return written


def write_index(out: Path, runs: list[Run], figures: list[tuple[str, str]]) -> None:
    items = "\n".join(f'<figure><img src="{html.escape(n)}" alt="{html.escape(n)}"><figcaption>{html.escape(c)}'
                      f"</figcaption></figure>" for n, c in figures)
    names = ", ".join(html.escape(f"{r.name} ({r.group})") for r in runs)
    (out / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>vp2o plot</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}figure{margin:0 0 2em}</style>"
        f"</head><body><h1>vp2o plot</h1><p>runs: {names}</p>\n{items}\n</body></html>\n")


def _save(fig, axes, used: int, title: str, path: Path) -> bool:
    """Blank the unused panels, title, write the PNG and close the figure."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
