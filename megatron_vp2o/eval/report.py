"""``results.json`` / ``results.md`` of ``vp2o eval`` and the Table-1 comparison of ``--compare``.

results.json::

    {"settings": {...}, "benchmarks": {name: {"task", "data", "problems"}},
     "checkpoints": [{"label", "path", "step", "results": {name: {"summary": {...}, "problems": [...]}}}],
     "average": {name: {metric: mean over checkpoints}}}

``summary`` holds ``pass@1``, ``pass@2``, ... (k = 1, 2, 4, ... <= n), ``avg@n``, ``maj@k``
(math, multiple_choice), ``tokens/median``, ``tokens/mean`` (``thinking_tokens/*``,
``answer_tokens/*`` with a thinking block), the four IFBench numbers (ifeval) and ``rating`` (code
with problem ratings). Files are written to a temporary name and renamed: nothing half-written.

``--compare A B`` pairs the problems of each benchmark present in both (by id), averages each
problem's record over the checkpoints of its side, and prints, per benchmark and headline metric,
baseline | VP2O | delta with a paired percentile-bootstrap 95% interval of the delta.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from megatron_vp2o.eval import metrics as M
from megatron_vp2o.eval.rating import fit_rating
from megatron_vp2o.eval.score import ifeval_numbers

HEADLINE = {"math": ("pass@1", "maj@{n}", "tokens/median"), "multiple_choice": ("pass@1", "tokens/median"),
            "ifeval": ("prompt_loose", "prompt_strict", "inst_loose", "inst_strict"),
            "code": ("rating", "pass@1", "tokens/median")}


def average(checkpoints: list[dict]) -> dict:
    """Mean of every numeric summary metric over the checkpoints, per benchmark."""
    out = {}
    for ck in checkpoints:
        for name, res in ck["results"].items():
            for key, value in res["summary"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(name, {}).setdefault(key, []).append(value)
    return {name: {k: sum(v) / len(v) for k, v in d.items()} for name, d in out.items()}


def build_results(settings: dict, benchmarks, checkpoints: list[dict]) -> dict:
    for ck in checkpoints:
        for res in ck["results"].values():
            res.pop("responses", None)
    return {"settings": settings,
            "benchmarks": {b.name: {"task": b.task, "data": b.path, "problems": len(b.items)} for b in benchmarks},
            "checkpoints": checkpoints, "average": average(checkpoints)}


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_responses(out: Path, label: str, bench, texts: list[list[str]]) -> Path:
    """``OUT/responses/<label>/<benchmark>.jsonl`` in the ``--responses`` input format."""
    path = out / "responses" / label / f"{bench.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps({"id": it.id, "responses": t}) + "\n" for it, t in zip(bench.items, texts)))
    return path


def write_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(results, indent=1))
    atomic_write(out / "results.md", render_markdown(results))


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def render_markdown(results: dict) -> str:
    """One table per benchmark: rows checkpoints (and their average), columns the summary metrics."""
    lines = ["# vp2o eval", "", f"settings: `{json.dumps(results['settings'])}`", ""]
    for name, info in results["benchmarks"].items():
        rows = [(ck["label"], ck["results"][name]["summary"]) for ck in results["checkpoints"]]
        if len(rows) > 1:
            rows.append(("average", results["average"][name]))
        keys = [k for k in rows[0][1] if k not in ("rating/censored",)]
        lines += [f"## {name} ({info['task']}, {info['problems']} problems, {info['data']})", "",
                  "| checkpoint | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + label + " | " + " | ".join(_fmt(s.get(k)) for k in keys) + " |" for label, s in rows]
        lines.append("")
    return "\n".join(lines)


# ---- --compare ------------------------------------------------------------------------------------

def load_results(path: str | Path) -> dict:
    from megatron_vp2o.eval.tasks import DataError

    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"--compare: '{path}' is not a results.json (or a directory holding one) of `vp2o eval`")
    return json.loads(path.read_text())


def _problems(results: dict, name: str) -> dict:
    """Problem id -> its record averaged over checkpoints (numbers and per-sample lists as they are)."""
    per_id: dict = {}
    for ck in results["checkpoints"]:
        for rec in ck["results"][name]["problems"]:
            per_id.setdefault(rec["id"], []).append(rec)
    out = {}
    for pid, recs in per_id.items():
        merged = dict(recs[0])
        for key, value in recs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = sum(r[key] for r in recs) / len(recs)
            elif isinstance(value, list):
                merged[key] = [x for r in recs for x in r[key]]
        out[pid] = merged
    return out


def stat_fn(metric: str):
    """The benchmark number ``metric`` as a function of a list of per-problem records."""
    if metric in ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose"):
        return lambda recs: ifeval_numbers(recs)[metric]
    if metric == "rating":
        return lambda recs: fit_rating([r["rating"] for r in recs], [r["pass@1"] for r in recs])["rating"]
    if metric.startswith("tokens/"):
        import statistics

        agg = statistics.median if metric.endswith("median") else statistics.fmean
        return lambda recs: float(agg([t for r in recs for t in r["tokens"]]))
    return lambda recs: M.mean_over(recs, metric)


def compare(base: dict, new: dict, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Rows ``{benchmark, metric, base, new, delta, lo, hi, problems}`` for benchmarks in both files."""
    rows = []
    for name, info in base["benchmarks"].items():
        if name not in new["benchmarks"]:
            continue
        a, b = _problems(base, name), _problems(new, name)
        ids = [i for i in a if i in b]
        if not ids:
            continue
        pa, pb = [a[i] for i in ids], [b[i] for i in ids]
        n = int(min(r["n"] for r in pa + pb))
        for metric in HEADLINE.get(info["task"], ("pass@1",)):
            metric = metric.format(n=n)
            if not all(_has(r, metric) for r in pa + pb):
                continue
            fn = stat_fn(metric)
            delta, lo, hi = M.bootstrap_delta(pa, pb, fn, n_boot, seed)
            rows.append({"benchmark": name, "metric": metric, "base": fn(pa), "new": fn(pb), "delta": delta,
                         "lo": lo, "hi": hi, "problems": len(ids)})
    return rows


def _has(rec: dict, metric: str) -> bool:
    if metric.startswith("tokens/"):
        return "tokens" in rec
    if metric in ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose"):
        return "instructions" in rec
    return metric in rec


def render_compare(rows: list[dict], base_label: str = "baseline", new_label: str = "VP2O") -> str:
    lines = [f"| benchmark | metric | {base_label} | {new_label} | delta [95% CI] | problems |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['metric']} | {_fmt(r['base'])} | {_fmt(r['new'])} | "
                     f"{r['delta']:+.4g} [{r['lo']:+.4g}, {r['hi']:+.4g}] | {r['problems']} |")
    return "\n".join(lines) + "\n"
