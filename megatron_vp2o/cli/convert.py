"""``vp2o convert``: Hugging Face MoE checkpoints <-> megatron dist checkpoints.

    vp2o convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N --etp N] [--dtype fp32|bf16] [--verify]
    vp2o convert mcore-to-hf --ckpt DIR --out DIR [--max-shard-gb G]

Also ``python tools/convert.py ...`` and ``python -m megatron_vp2o.cli.convert ...``. hf-to-mcore
needs tp x pp x ep ranks (or a multiple): under ``torchrun`` it uses the world it is given; run
as a plain process with a layout larger than one rank, it validates the input and then launches
``torchrun --standalone`` itself. ``--verify`` compares fp32 logits of transformers' model and the
converted checkpoint on random tokens and fails (writing nothing) unless max |diff| <= --tol;
it prints ``max logit diff <value>``. Errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

NEEDS_PLATFORM = True


def add_parser(subparsers) -> argparse.ArgumentParser:
    conv = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and megatron")
    sub = conv.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("hf-to-mcore", help="HF safetensors MoE model -> megatron dist checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="new checkpoint root (must not exist or be empty)")
    for flag in ("tp", "pp", "ep"):
        imp.add_argument(f"--{flag}", type=int, default=1, help=f"{flag} size of the conversion world")
    imp.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: tp)")
    imp.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="params dtype (default: the HF dtype)")
    imp.add_argument("--verify", action="store_true", help="compare fp32 logits with transformers' model")
    imp.add_argument("--tol", type=float, default=1e-4, help="max |logit diff| --verify accepts")
    imp.add_argument("--seed", type=int, default=0, help="seed of the random verification tokens")
    exp = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF safetensors + config.json")
    exp.add_argument("--ckpt", required=True, help="checkpoint root or iter_* directory")
    exp.add_argument("--out", required=True, help="new HF model directory (must not exist or be empty)")
    exp.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size")
    return conv


def _argv(args) -> list[str]:
    out = ["hf-to-mcore", "--hf", args.hf, "--out", args.out, "--tp", str(args.tp), "--pp", str(args.pp),
           "--ep", str(args.ep), "--tol", str(args.tol), "--seed", str(args.seed)]
    out += ["--etp", str(args.etp)] if args.etp else []
    out += ["--dtype", args.dtype] if args.dtype else []
    return out + (["--verify"] if args.verify else [])


def _launch(args, nproc: int) -> int:
    """Re-run this command under ``torchrun --standalone`` with ``nproc`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_vp2o.cli.convert", *_argv(args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rc = subprocess.call(cmd, env=env)
    partial = Path(args.out).parent / f".{Path(args.out).name}.partial"
    if rc != 0 and partial.exists():  # a rank was killed before it could clean up
        shutil.rmtree(partial, ignore_errors=True)
    return 2 if rc != 0 else 0


def run_import(args) -> int:
    from megatron_vp2o.checkpoint import convert_hf
    from megatron_vp2o.checkpoint.hf import io

    convert_hf.prepare_import(args.hf, dtype=args.dtype)  # fail fast, before any process starts
    io.check_output_dir(args.out)
    nproc = args.tp * args.pp * args.ep
    if "RANK" not in os.environ and nproc > 1:
        return _launch(args, nproc)
    from megatron_vp2o.distributed.init import shutdown

    try:
        summary = convert_hf.import_hf(args.hf, args.out, args.tp, args.pp, args.ep, args.etp, args.dtype,
                                       args.verify, args.tol, args.seed)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"converted {summary['arch']} -> {args.out} (layout {summary['layout']})")
    return 0


def run_export(args) -> int:
    from megatron_vp2o.checkpoint import convert_hf
    from megatron_vp2o.distributed.init import shutdown

    try:
        summary = convert_hf.export_hf(args.ckpt, args.out, int(args.max_shard_gb * (1 << 30)))
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"exported {summary['tensors']} {summary['arch']} tensors -> {args.out}")
    return 0


def validate(args) -> None:
    """Checks that need no megatron (``vp2o`` runs them before the platform layer): sizes, the
    input directory or checkpoint, the output directory. Raises ConversionError (one line)."""
    import math

    from megatron_vp2o.checkpoint import convert_hf
    from megatron_vp2o.checkpoint.hf import io
    from megatron_vp2o.checkpoint.hf.archs import ConversionError
    from megatron_vp2o.checkpoint.meta import find_checkpoint, read_meta

    if args.direction == "hf-to-mcore":
        for flag in ("tp", "pp", "ep", "etp"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ConversionError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
        if not (math.isfinite(args.tol) and args.tol >= 0):
            raise ConversionError(f"--tol must be a finite number >= 0 (got {args.tol})")
        try:
            convert_hf.prepare_import(args.hf, dtype=args.dtype)
        except OSError as exc:
            raise ConversionError(f"--hf: '{args.hf}' cannot be read ({exc.strerror or exc}); "
                                  "check its permissions") from None
    else:
        if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
            raise ConversionError(f"--max-shard-gb must be a finite number > 0 (got {args.max_shard_gb})")
        found = find_checkpoint(args.ckpt, "--ckpt")
        saved = read_meta(found, "--ckpt").get("config") or {}  # migrated to this version's keys
        if not isinstance(saved.get("model"), dict):
            raise ConversionError(f"--ckpt: '{found}/vp2o.json' holds no model config; only checkpoints written by "
                                  "vp2o (sft, train, convert) export")
        from megatron_vp2o.config import Config, ConfigError, build

        try:
            build(Config, saved)
        except ConfigError as exc:
            raise ConversionError(f"--ckpt: the config saved in '{found}/vp2o.json' is unusable: {exc}") from None
    io.check_output_dir(args.out)


def run(args) -> int:
    from megatron_vp2o.config import ConfigError

    try:
        return run_import(args) if args.direction == "hf-to-mcore" else run_export(args)
    except (ConfigError, FileNotFoundError) as exc:  # ConversionError is a ConfigError
        print(f"vp2o convert {args.direction}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vp2o")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
