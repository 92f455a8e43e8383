"""``vp2o plot RUN [RUN ...] --out DIR``: PNGs and an index.html from runs' metrics.jsonl.

Runs whose names differ only in a seed suffix (``vp2o_seed1``, ``vp2o_seed2``) form one curve with
a min..max band; see megatron_vp2o/monitor/plots.py for the figures. Headless (matplotlib Agg).
"""

from __future__ import annotations

import argparse
import sys

NEEDS_PLATFORM = False


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="plot training runs (reward, eval, routing, trust region)")
    p.add_argument("runs", nargs="+", help="run directories (the --out of vp2o train), each with metrics.jsonl")
    p.add_argument("--out", required=True, help="output directory for the PNGs and index.html")
    return p


def run(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("vp2o plot: error: matplotlib is missing; pip install matplotlib", file=sys.stderr)
        return 2
    from megatron_vp2o.monitor.plots import write_plots

    try:
        figures = write_plots(args.runs, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"vp2o plot: error: {exc}", file=sys.stderr)
        return 2
    for name, caption in figures:
        print(f"{args.out}/{name}: {caption}")
    print(f"wrote {args.out}/index.html")
    return 0
