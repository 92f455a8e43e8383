"""``vp2o``: the command line of megatron-vp2o.

    vp2o sft   --config C --out DIR [--resume] [section.field=value ...]   supervised warm-up / SFT
    vp2o train --config C --out DIR [--resume] [section.field=value ...]   RL (VP2O or GRPO)
    vp2o make-data digit-sum --out FILE [--n N --seed S]        the tiny recipe's SFT data
    vp2o convert hf-to-mcore|mcore-to-hf ...                    checkpoint conversion (cli/convert.py)

Further subcommands live one per module in this package (``SUBCOMMANDS`` below): each module
defines ``add_parser(subparsers)``, ``run(args) -> int`` and ``NEEDS_PLATFORM`` (whether the
megatron platform layer must be active before ``run``).

Runs the same as a single process or under ``torchrun --nproc-per-node N --no-python vp2o ...``.
Bad input is reported as one line on stderr naming the field or path and the fix, exit code 2
(docs/errors.md lists the errors): argument errors by the parser, config and input errors by the
pre-flight checks (``cli/checks.py``; a subcommand module may define ``validate(args)`` for its
own), which run before the platform layer, megatron-core, any process group or any output file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommands defined in their own modules (megatron_vp2o/cli/<name>.py), in help order.
SUBCOMMANDS = ("convert", "eval", "plot", "plan", "launch", "compare")


def subcommand_modules() -> dict:
    mods = {}
    for name in SUBCOMMANDS:
        try:
            mods[name] = importlib.import_module(f"megatron_vp2o.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name != f"megatron_vp2o.cli.{name.replace('-', '_')}":
                raise
    return mods


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one stderr line (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="vp2o", description="VP2O RL for Mixture-of-Experts models on megatron-core")
    sub = p.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning (warm-up) of the MoE GPT")
    sft.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    sft.add_argument("--out", required=True, help="output directory (metrics.jsonl, checkpoints/)")
    sft.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    sft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=40 parallel.ep=2")
    train = sub.add_parser("train", help="RL: VP2O or the GRPO baseline (rl.algo)")
    train.add_argument("--config", required=True, help="YAML config with an rl section (see examples/configs/)")
    train.add_argument("--out", required=True, help="output directory (metrics.jsonl, checkpoints/)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.algo=grpo rl.steps=10")
    data = sub.add_parser("make-data", help="generate the built-in datasets")
    data.add_argument("name", choices=["digit-sum"])
    data.add_argument("--out", required=True)
    data.add_argument("--n", type=int, default=4096)
    data.add_argument("--seed", type=int, default=0)
    for mod in subcommand_modules().values():
        mod.add_parser(sub)
    return p


def _summary_table(title: str, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def _run_job(args, runner, title: str) -> int:
    """Run ``runner(cfg, out, resume)`` on the pre-flight-checked config, shut the process groups
    down, print the summary."""
    from megatron_vp2o.distributed.init import shutdown

    cfg = args.cfg
    try:
        summary = runner(cfg, args.out, resume=args.resume)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        _summary_table(title.format(cfg=cfg), summary)
    return 0


def cmd_sft(args) -> int:
    from megatron_vp2o.training.sft import run_sft

    return _run_job(args, run_sft, "vp2o sft")


def cmd_train(args) -> int:
    from functools import partial

    from megatron_vp2o.eval.runner import rl_evaluator
    from megatron_vp2o.rl.trainer import run_rl

    return _run_job(args, partial(run_rl, evaluate=rl_evaluator(args.cfg)), "vp2o train ({cfg.rl.algo})")


def cmd_make_data(args) -> int:
    from megatron_vp2o.data.tiny import digit_sum_sft_rows, write_jsonl

    from megatron_vp2o.config import ConfigError

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1 (got {args.n})")
    try:
        path = write_jsonl(digit_sum_sft_rows(args.n, args.seed), args.out)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write '{args.out}' ({exc.strerror or exc}); choose a writable path") from None
    print(f"wrote {args.n} rows to {path}")
    return 0


def parse_args(argv: list[str] | None):
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come before or after options
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def validate_args(args, modules: dict) -> None:
    """Every check that needs no megatron: before the platform layer and any process group."""
    from megatron_vp2o.cli.checks import PREFLIGHT

    if args.command in PREFLIGHT:
        args.cfg = PREFLIGHT[args.command](args)
    elif hasattr(modules.get(args.command), "validate"):
        modules[args.command].validate(args)


def one_line(exc: BaseException) -> str:
    """An error message folded onto one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from megatron_vp2o.config import ConfigError

    try:
        args = parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a one-line usage error (2)
        return stop.code if isinstance(stop.code, int) else 2
    handlers = {"sft": cmd_sft, "train": cmd_train, "make-data": cmd_make_data}
    needs_platform = {"sft": True, "train": True, "make-data": False}
    modules = subcommand_modules()
    for name, mod in modules.items():
        handlers[name] = mod.run
        needs_platform[name] = getattr(mod, "NEEDS_PLATFORM", True)
    try:
        validate_args(args, modules)
        if needs_platform[args.command]:
            from megatron_vp2o import platform

            platform.activate()  # once, at start-up: CUDA, or the CPU layer when CUDA is absent
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"vp2o {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
