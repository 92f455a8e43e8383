"""``vp2o eval``: score megatron checkpoints (or responses made elsewhere) on benchmarks.

    vp2o eval --ckpt DIR [--ckpt DIR ...] --task NAME --data FILE [--task NAME --data FILE ...]
              [--samples N] [--seed S] [--engine megatron|vllm] [--out OUT] [--config C] [--template T]
              [overrides]
    vp2o eval --responses FILE --task NAME --data FILE [...] [--out OUT] [--config C]
    vp2o eval --compare BASELINE VP2O [--out OUT]

Tasks: math, multiple_choice, ifeval, code (eval/tasks.py for each benchmark's layout). The model,
tokenizer and sampling settings (``rl.sampling``; ``--samples`` defaults to ``rl.eval_samples``)
come from ``--config``, else from the config saved with the first checkpoint; dotted overrides
apply on top (``parallel.ep=2 rl.sampling.temperature=0.6``). Under ``torchrun`` the problems are
spread over the data-parallel ranks; the samples do not depend on the layout. Writes
``OUT/results.json``, ``OUT/results.md`` and ``OUT/responses/<checkpoint>/<benchmark>.jsonl`` (the
``--responses`` format: ``{"id": ..., "responses": [...]}`` per line, matched to the data by
``id``, else by line number). ``--engine vllm`` generates with vLLM (``rl.vllm.*`` settings; the
weights streamed from each loaded checkpoint, as training's refresh does; docs/vllm.md); without
vLLM installed, or with tp/pp > 1, it is refused before anything starts. Bad input: one line naming
the option or field, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

NEEDS_PLATFORM = False  # activated in run() only when generating


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate checkpoints on benchmarks (pass@k, Table-1 comparisons)")
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint root or iter_* dir (repeatable)")
    p.add_argument("--task", action="append", default=[], help="math | multiple_choice | ifeval | code (repeatable)")
    p.add_argument("--data", action="append", default=[], help="benchmark file for the --task at the same position")
    p.add_argument("--responses", action="append", default=[],
                   help="JSONL of {id, responses} for the --task at the same position (instead of --ckpt)")
    p.add_argument("--samples", type=int, default=None, help="samples per problem (default: rl.eval_samples)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: train.seed)")
    p.add_argument("--engine", choices=("megatron", "vllm"), default="megatron",
                   help="generating engine: our megatron engine, or vLLM loaded from the checkpoint (rl.vllm.*)")
    p.add_argument("--out", default=None, help="output directory (results.json, results.md, responses/)")
    p.add_argument("--config", default=None, help="YAML config (default: the first checkpoint's saved config)")
    p.add_argument("--template", action="append", default=[],
                   help="prompt template replacing the task's, e.g. '{problem}': once for all --task, or once "
                        "per --task ('' keeps that task's own)")
    p.add_argument("--compare", nargs=2, metavar=("BASELINE", "VP2O"), help="two results.json (or their dirs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.ep=2 rl.sampling.temperature=0.6")
    return p


def _fail(msg: str) -> int:
    print(f"vp2o eval: error: {msg}", file=sys.stderr)
    return 2


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args) -> int:
    from megatron_vp2o.config import ConfigError

    try:
        if args.compare:
            return run_compare(args)
        check_args(args)
        return run_responses(args) if args.responses else run_generate(args)
    except (ConfigError, FileNotFoundError) as exc:  # DataError is a ConfigError
        return _fail(str(exc))


def check_args(args) -> None:
    from megatron_vp2o.config import ConfigError

    if bool(args.ckpt) == bool(args.responses):
        raise ConfigError("give either --ckpt (generate with our engine) or --responses (score given texts)")
    if not args.task:
        raise ConfigError("--task and --data are required (e.g. --task math --data data/eval/math_aime_sample.jsonl)")
    if args.responses and len(args.responses) != len(args.task):
        raise ConfigError(f"--responses comes once per --task/--data pair ({len(args.task)}), "
                          f"got {len(args.responses)}")
    if len(args.template) not in (0, 1, len(args.task)):
        raise ConfigError(f"--template comes once, or once per --task ({len(args.task)}), got {len(args.template)}")
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    if args.out is None:
        raise ConfigError("--out is required (the directory for results.json and results.md)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out '{args.out}' exists and is not a directory")
    if "code" in args.task:
        from megatron_vp2o.cli.checks import check_sandbox

        check_sandbox("--task code")


def _config(args, ckpts):
    """--config, else the first checkpoint's saved config; overrides on top (None without either)."""
    from megatron_vp2o.config import Config, ConfigError, apply_overrides, build
    from megatron_vp2o.cli.checks import load_run_config

    if args.config:
        return load_run_config(args.config, args.overrides)
    if not ckpts:
        if args.overrides:
            raise ConfigError("overrides need --config (or --ckpt, whose saved config they modify)")
        return None
    from megatron_vp2o.checkpoint.meta import read_meta

    saved = read_meta(ckpts[0], "--ckpt").get("config")
    if not saved or "model" not in saved:
        raise ConfigError(f"--ckpt '{ckpts[0]}' saved no config; pass --config")
    # only what evaluation needs (older checkpoints may hold keys this version no longer has);
    # the layout is this run's (overrides), not the training run's
    rl = saved.get("rl", {})
    kept = {"model": saved["model"], "data": {"tokenizer": saved.get("data", {}).get("tokenizer", "builtin:char")},
            "train": {"seed": saved.get("train", {}).get("seed", 1234)},
            "rl": {k: rl[k] for k in ("sampling", "eval_samples", "reward_timeout_s", "vllm") if k in rl}}
    return build(Config, apply_overrides(kept, list(args.overrides)))


def _checkpoints(paths: list[str]) -> list[Path]:
    from megatron_vp2o.checkpoint.meta import latest_checkpoint  # no megatron import before the checks
    from megatron_vp2o.config import ConfigError

    out = []
    for path in paths:
        found = latest_checkpoint(path) if Path(path).is_dir() else None
        if found is None:
            raise ConfigError(f"--ckpt: no complete checkpoint at '{path}' (a megatron dist checkpoint written by "
                              "`vp2o train`, `vp2o sft` or `vp2o convert`)")
        out.append(found)
    return out


def _labels(ckpts: list[Path]) -> list[str]:
    labels = []
    for i, path in enumerate(ckpts):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent  # RUN/checkpoints/iter_*
        label = f"{run.name}-{path.name}"
        labels.append(label if label not in labels else f"{label}-{i}")
    return labels


def _settings(args, cfg, samples, seed) -> dict:
    sampling = None if cfg is None else {k: getattr(cfg.rl.sampling, k) for k in
                                         ("temperature", "top_p", "top_k", "max_new_tokens")}
    return {"samples": samples, "seed": seed, "sampling": sampling, "template": args.template,
            "tokenizer": None if cfg is None else cfg.data.tokenizer}


def run_generate(args) -> int:
    from megatron_vp2o import platform
    from megatron_vp2o.config import check_layout
    from megatron_vp2o.data.tokenizer import load_tokenizer
    from megatron_vp2o.distributed.init import shutdown, world_size_from_env
    from megatron_vp2o.eval import report
    from megatron_vp2o.eval.runner import evaluate_checkpoints, load_benchmarks

    from megatron_vp2o.checkpoint.meta import check_same_model
    from megatron_vp2o.cli.checks import check_vllm

    ckpts = _checkpoints(args.ckpt)
    cfg = _config(args, ckpts)
    for found in ckpts:  # the saved model config against ours, before any tensor is loaded
        check_same_model(found, cfg.model, "--ckpt")
    check_layout(cfg, world_size_from_env(), sft_batch=False)
    if args.engine == "vllm":  # before megatron-core is imported (eval.generate)
        check_vllm(cfg, "--engine vllm", world=world_size_from_env())
    from megatron_vp2o.eval.generate import encode_prompts  # megatron-core

    benchmarks = load_benchmarks(args.task, args.data, _templates(args))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    for bench in benchmarks:  # fail before any process group exists
        encode_prompts(tokenizer, [it.prompt for it in bench.items])
    samples = args.samples or cfg.rl.eval_samples
    seed = cfg.train.seed if args.seed is None else args.seed
    platform.activate()
    try:
        results = evaluate_checkpoints(cfg, ckpts, benchmarks, samples, seed, engine=args.engine)
    finally:
        shutdown()
    if _rank0():
        out = Path(args.out)
        for label, ck in zip(_labels(ckpts), results):
            ck["label"] = label
            for bench in benchmarks:
                report.write_responses(out, label, bench, ck["results"][bench.name]["responses"])
        _finish(out, report.build_results(_settings(args, cfg, samples, seed), benchmarks, results))
    return 0


def read_responses(path: str, items) -> list[list[str]]:
    """Responses per item from ``{"id", "responses"}`` lines (id: the record's, else the line number)."""
    from megatron_vp2o.eval.tasks import DataError, read_rows

    by_id = {}
    for index, (where, row) in enumerate(read_rows(path)):
        texts = row.get("responses") if isinstance(row, dict) else None
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: field 'responses' must be a non-empty list of strings")
        by_id[str(row["id"]) if row.get("id") is not None else str(index)] = texts
    missing = [it.id for it in items if it.id not in by_id]
    extra = sorted(set(by_id) - {it.id for it in items})
    if missing or extra:
        raise DataError(f"--responses '{path}': ids must match the data's; missing {missing[:5]}, unknown {extra[:5]}")
    texts = [by_id[it.id] for it in items]
    if len({len(t) for t in texts}) != 1:
        raise DataError(f"--responses '{path}': every problem needs the same number of responses (pass@k)")
    return texts


def run_responses(args) -> int:
    from megatron_vp2o.data.tokenizer import load_tokenizer
    from megatron_vp2o.eval import report
    from megatron_vp2o.eval.runner import token_counter, load_benchmarks
    from megatron_vp2o.eval.score import score_benchmark

    cfg = _config(args, [])
    benchmarks = load_benchmarks(args.task, args.data, _templates(args))
    texts = [read_responses(path, b.items) for path, b in zip(args.responses, benchmarks)]
    counter = None if cfg is None else token_counter(load_tokenizer(cfg.data.tokenizer))
    timeout = 10.0 if cfg is None else cfg.rl.reward_timeout_s
    results = {b.name: score_benchmark(b.items, t, counter, timeout) for b, t in zip(benchmarks, texts)}
    ck = {"label": "responses", "path": ",".join(args.responses), "step": None, "results": results}
    _finish(Path(args.out), report.build_results(_settings(args, cfg, len(texts[0][0]), None), benchmarks, [ck]))
    return 0


def _templates(args) -> list:
    """One template (or None: the task's own) per --task."""
    given = args.template * len(args.task) if len(args.template) == 1 else args.template or [None] * len(args.task)
    return [t or None for t in given]


def _finish(out: Path, results: dict) -> None:
    from megatron_vp2o.eval import report

    report.write_results(out, results)
    print(report.render_markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def run_compare(args) -> int:
    from megatron_vp2o.eval import report

    base, new = report.load_results(args.compare[0]), report.load_results(args.compare[1])
    rows = report.compare(base, new)
    if not rows:
        return _fail("--compare: the two results share no benchmark with common problem ids")
    table = report.render_compare(rows)
    print(table, end="")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        report.atomic_write(Path(args.out) / "compare.md", table)
    return 0
