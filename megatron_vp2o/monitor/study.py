"""The report of a comparison study (``vp2o compare``): curves against rollout cost, the claims table, the ablation table.

Each run's evaluation rows (``eval/*``, logged at ``rollout/samples`` = responses generated so far)
form one curve per metric; arms are plotted as the mean over seeds with a band of +- one standard
deviation (matplotlib, Agg). Comparisons are paired by seed (same seed = same initial policy,
prompt order and eval prompts) and report the mean difference with a 95% Student-t interval over
seeds: mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n). A claim "holds" when the whole interval is on its
side of 0, "does not hold" when the whole interval is on the other side, else "inconclusive".

Claims (the paper's, VP2O against GRPO at the same rollout cost):
- final eval reward >= GRPO;  - more distinct correct answers per prompt;
- lower prototype overlap;  - no late-training decline (final reward minus the reward at half the
  budget, VP2O's own);  - fewer refreshes to reach equal reward (rollout batches until the eval
  reward first reaches, after the start, the lower of the two arms' mean best reward after the
  start; never reached = all batches + 1).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from megatron_vp2o.monitor.plots import mean_band, read_metrics

METRICS = [("eval/mean", "eval reward"), ("eval/pass_at_1", "pass@1"), ("eval/pass_at_4", "pass@4 (unbiased)"),
           ("eval/distinct_correct", "distinct correct / prompt"), ("eval/response_len", "response length"),
           ("eval/router_entropy", "router entropy (nats)"), ("eval/expert_util", "expert utilisation"),
           ("eval/proto_overlap", "prototype overlap"), ("updates", "optimizer steps"),
           ("refreshes", "refreshes (rollout batches)")]
# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard table values)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def load_run(path: Path) -> list[dict] | None:
    """Evaluation points of one run: dicts with samples, updates, refreshes and every eval/* metric."""
    rows = read_metrics(path)
    if not rows or not rows[-1].get("budget_end"):
        return None
    points, refreshes, updates = [], 0, 0
    for row in rows:
        refreshes = row.get("vp2o/refreshes", refreshes)
        if row["step"] > 0:
            # optimizer steps per update: GRPO's and VP2O's epoch loops log them; a single VP2O step is one
            updates += row.get("grpo/optimizer_steps", row.get("vp2o/optimizer_steps", 1))
        if "eval/mean" in row:
            point = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
            point |= {"samples": row.get("rollout/samples", 0), "updates": updates, "refreshes": refreshes}
            if points and points[-1]["samples"] == point["samples"]:
                points.pop()  # evaluated twice at one rollout cost (the final evaluation): keep the later
            points.append(point)
    return points


def run_dir(out: Path, task: str, arm: str, seed: int) -> Path:
    """Where ``vp2o compare`` writes one run: OUT/task/arm/seed_N."""
    return out / task / arm / f"seed_{seed}"


def finished(path: Path) -> bool:
    """The run reached its rollout budget (its last metrics row says ``budget_end``)."""
    rows = read_metrics(path)
    return bool(rows) and bool(rows[-1].get("budget_end", False))


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% Student-t interval of the mean of ``diffs``."""
    diffs = [d for d in diffs if d == d]
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T975[min(len(diffs), 31) - 2] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, better: str) -> str:
    """holds / does not hold / inconclusive for 'VP2O - GRPO is > 0' (better='higher') or '< 0'."""
    if low != low:
        return "n/a (one seed)"
    sign = 1.0 if better == "higher" else -1.0
    lo, hi = sorted((sign * low, sign * high))
    return "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"


def final(points: list[dict], key: str) -> float:
    return points[-1].get(key, float("nan"))


def at_half(points: list[dict], key: str) -> float:
    half = points[-1]["samples"] / 2
    return min(points, key=lambda p: abs(p["samples"] - half)).get(key, float("nan"))


def batches_to_reach(points: list[dict], key: str, level: float) -> float:
    for p in points[1:]:  # after the start
        if p.get(key, float("-inf")) >= level:
            return p["refreshes"]
    return points[-1]["refreshes"] + 1


def _fmt(mean: float, low: float, high: float) -> str:
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if low == low else f"{mean:+.3f}"


def claims(runs: dict, seeds: list[int], a: str = "vp2o", b: str = "grpo") -> list[tuple]:
    """(claim, metric, VP2O mean, GRPO mean, difference with CI, verdict) rows."""
    pairs = [(runs[(a, s)], runs[(b, s)]) for s in seeds if runs.get((a, s)) and runs.get((b, s))]
    if not pairs:
        return []
    best = min(statistics.mean(max(p["eval/mean"] for p in x[i][1:]) for x in pairs) for i in (0, 1))
    rows = []
    spec = [("reward >= GRPO", "final eval reward", lambda p: final(p, "eval/mean"), "higher"),
            ("more distinct correct answers", "final distinct correct / prompt",
             lambda p: final(p, "eval/distinct_correct"), "higher"),
            ("lower expert overlap", "final prototype overlap", lambda p: final(p, "eval/proto_overlap"), "lower"),
            ("fewer refreshes at equal reward", f"rollout batches to reach eval reward {best:.3f}",
             lambda p: batches_to_reach(p, "eval/mean", best), "lower")]
    for claim, what, fn, better in spec:
        va, vb = [fn(x) for x, _ in pairs], [fn(y) for _, y in pairs]
        mean, low, high = t_interval([u - v for u, v in zip(va, vb)])
        rows.append((claim, what, statistics.mean(va), statistics.mean(vb), _fmt(mean, low, high),
                     verdict(low, high, better)))
    late = [final(x, "eval/mean") - at_half(x, "eval/mean") for x, _ in pairs]
    late_b = [final(y, "eval/mean") - at_half(y, "eval/mean") for _, y in pairs]
    mean, low, high = t_interval(late)
    no_decline = "does not hold" if high == high and high < 0 else "holds" if low == low and low >= 0 else \
        "inconclusive" if low == low else "n/a (one seed)"
    rows.append(("no late-training decline", "VP2O final minus half-budget eval reward (GRPO's in its column)",
                 statistics.mean(late), statistics.mean(late_b), _fmt(mean, low, high), no_decline))
    return rows


def ablations(runs: dict, arms: list[str], seeds: list[int]) -> list[tuple]:
    """Each non-reference arm against full VP2O: final reward and distinct answers, paired by seed."""
    out = []
    for arm in arms:
        if arm == "vp2o":
            continue
        pairs = [(runs[(arm, s)], runs[("vp2o", s)]) for s in seeds if runs.get((arm, s)) and runs.get(("vp2o", s))]
        if not pairs:
            continue
        cells = [arm, len(pairs)]
        for key in ("eval/mean", "eval/distinct_correct"):
            vals = [final(x, key) for x, _ in pairs]
            cells += [statistics.mean(vals), _fmt(*t_interval([final(x, key) - final(y, key) for x, y in pairs]))]
        cells.append(statistics.mean(final(x, "updates") for x, _ in pairs))
        out.append(tuple(cells))
    return out


def arm_summary(runs: dict, arms: list[str], seeds: list[int]) -> list[tuple]:
    out = []
    for arm in arms:
        done = [runs[(arm, s)] for s in seeds if runs.get((arm, s))]
        if not done:
            continue
        row = [arm, len(done)]
        for key in ("eval/mean", "eval/pass_at_4", "eval/distinct_correct", "eval/proto_overlap", "updates"):
            vals = [final(p, key) for p in done]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row.append(f"{statistics.mean(vals):.3f} +- {sd:.3f}")
        row.append(f"{statistics.mean(p[0]['eval/mean'] for p in done):.3f}")
        out.append(tuple(row))
    return out


def plot(runs: dict, arms: list[str], seeds: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(22, 8))
    for ax, (key, label) in zip(axes.flat, METRICS):
        for arm in arms:
            curves = [runs[(arm, s)] for s in seeds if runs.get((arm, s))]
            if not curves or key not in curves[0][0]:
                continue
            xs, mean, lo, hi = mean_band([{p["samples"]: p[key] for p in c if key in p} for c in curves], "sd")
            line, = ax.plot(xs, mean, label=arm, lw=2 if arm in ("grpo", "vp2o") else 1)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(label)
        ax.set_xlabel("responses generated")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{title} (mean over {len(seeds)} seeds, band: +- 1 sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _table(header: list[str], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row) + " |")
    return lines


def write_report(out: Path, report: Path, tasks: list[str], arms: list[str], seeds: list[int], title: str,
                 setup: dict) -> Path:
    report.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", f"Rollout budget {setup['budget']} responses per run, evaluated every "
          f"{setup['eval_every']}; config `{setup['config']}`, overrides `{' '.join(setup['overrides']) or '-'}`; "
          f"seeds {seeds}. Differences are VP2O minus GRPO (or arm minus full VP2O), paired by seed, with a 95% "
          "Student-t interval over seeds.", ""]
    md += ["Arms: " + "; ".join(f"`{a}`: `{' '.join(setup['arms'][a])}`" for a in arms), ""]
    for task in tasks:
        runs = {(a, s): load_run(run_dir(out, task, a, s)) for a in arms for s in seeds}
        md += [f"## {task}", ""]
        md += _table(["arm", "runs", "final reward", "final pass@4", "final distinct", "final proto overlap",
                      "optimizer steps", "start reward"], arm_summary(runs, arms, seeds)) + [""]
        if "vp2o" in arms and "grpo" in arms:
            md += ["### Claims (VP2O vs GRPO)", ""]
            md += _table(["claim", "measured", "VP2O", "GRPO", "difference [95% CI]", "verdict"],
                         claims(runs, seeds)) + [""]
        abl = ablations(runs, arms, seeds) if "vp2o" in arms else []
        if abl:
            md += ["### Against full VP2O", ""]
            md += _table(["arm", "seeds", "final reward", "minus VP2O [95% CI]", "final distinct",
                          "minus VP2O [95% CI]", "optimizer steps"], abl) + [""]
        main = [a for a in arms if a in ("grpo", "vp2o")] or arms
        plot(runs, main, seeds, report / f"{task}_curves.png", f"{task}: {', '.join(main)}")
        md += [f"![{task} curves]({task}_curves.png)", ""]
        if len(arms) > len(main):
            plot(runs, arms, seeds, report / f"{task}_arms.png", f"{task}: all arms")
            md += [f"![{task} all arms]({task}_arms.png)", ""]
    path = report / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
