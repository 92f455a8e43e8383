"""Evaluate megatron checkpoints on benchmarks: build the model once for this layout, load each
checkpoint (resharded from whatever layout saved it), generate n samples per problem
(eval/generate.py), score on rank 0 (eval/score.py).

Also the in-training hook: :func:`rl_evaluator` gives the RL loop a callable
``evaluate(model, tokenizer, prefix)`` that runs the ``rl.eval`` benchmarks through the same
generate-and-score path (:func:`evaluate_benchmarks`) on the trainer's own model and returns flat
``eval/<benchmark>/<metric>`` numbers for metrics.jsonl / wandb. The CLI builds it and hands it to
``rl.trainer.run_rl``: evaluation and the RL loop do not import each other. Reading the benchmark
files (:func:`rl_benchmarks`, also the CLI pre-flight check) does not import megatron-core.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from megatron_vp2o.eval.score import score_benchmark
from megatron_vp2o.eval.tasks import EvalItem, load_items

RL_EVAL_SEED = 1_000_003  # rl.eval samples with seed train.seed + this (`vp2o eval --seed` reproduces it)
FLAT_KEYS = ("pass@1", "prompt_strict", "prompt_loose", "inst_strict", "inst_loose", "rating", "tokens/median")


@dataclasses.dataclass
class Benchmark:
    name: str  # row label in the tables (default: the data file's stem)
    task: str
    path: str
    items: list[EvalItem]


def load_benchmarks(tasks: list[str], paths: list[str], templates: list | None = None,
                    names: list[str] | None = None) -> list[Benchmark]:
    """Read every (task, file) pair (``templates[i]``: None keeps the task's own); names default to
    the file stems and must be unique."""
    from megatron_vp2o.eval.tasks import DataError

    if len(tasks) != len(paths):
        raise DataError(f"--task and --data come in pairs: got {len(tasks)} --task and {len(paths)} --data")
    names = list(names or [Path(p).stem for p in paths])
    if len(set(names)) != len(names):
        raise DataError(f"benchmark names must be unique (file stems): {names}; rename a file")
    templates = list(templates or [None] * len(tasks))
    return [Benchmark(n, t, str(p), load_items(t, p, tp)) for n, t, p, tp in zip(names, tasks, paths, templates)]


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def evaluate_model(model, tokenizer, benchmarks: list[Benchmark], samples: int, sampling, seed: int,
                   timeout_s: float = 10.0) -> dict:
    """``{benchmark: {"summary", "problems", "responses"}}`` on rank 0 ({} elsewhere)."""
    from megatron_vp2o.eval.generate import EvalEngine, encode_prompts, generate_samples  # megatron-core

    engine = EvalEngine(model, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    out = {}
    for bench in benchmarks:
        ids = encode_prompts(tokenizer, [it.prompt for it in bench.items])
        texts = generate_samples(engine, tokenizer, ids, samples, sampling, seed)
        if _rank0():
            out[bench.name] = dict(score_benchmark(bench.items, texts, token_counter(tokenizer), timeout_s),
                                   responses=texts)
    return out


def token_counter(tokenizer):
    return lambda text: len(tokenizer.encode(text)) if text else 0


def evaluate_checkpoints(cfg, ckpts: list[str], benchmarks: list[Benchmark], samples: int, seed: int) -> list:
    """Per checkpoint ``{"path", "step", "results"}`` (results on rank 0). Call under the platform."""
    from megatron_vp2o.checkpoint import load_model
    from megatron_vp2o.data.tokenizer import load_tokenizer
    from megatron_vp2o.distributed.init import init_parallel
    from megatron_vp2o.model import build_gpt, transformer_config

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    init_parallel(cfg, sft_batch=False)  # evaluation reads no train.* batch
    model = build_gpt(cfg.model, transformer_config(cfg.model, cfg.parallel))
    out = []
    for path in ckpts:
        meta = load_model(path, [model])
        results = evaluate_model(model, tokenizer, benchmarks, samples, cfg.rl.sampling, seed, cfg.rl.reward_timeout_s)
        out.append({"path": str(path), "step": meta.get("step"), "results": results})
    return out


def evaluate_benchmarks(model, tokenizer, benchmarks: list[Benchmark], samples: int, sampling, seed: int,
                        timeout_s: float = 10.0, prefix: str = "eval") -> dict:
    """Flat ``{prefix}/{benchmark}/{metric}`` numbers (pass@k, avg@n, maj@k and FLAT_KEYS; rank 0,
    {} elsewhere) for training logs."""
    results = evaluate_model(model, tokenizer, benchmarks, samples, sampling, seed, timeout_s)
    flat = {}
    for name, res in results.items():
        for key, value in res["summary"].items():
            if (key in FLAT_KEYS or key.split("@")[0] in ("pass", "avg", "maj")) and isinstance(value, (int, float)):
                flat[f"{prefix}/{name}/{key}"] = float(value)
    return flat


def rl_benchmarks(entries) -> list[Benchmark]:
    """The ``rl.eval`` entries (task, data, template) read as benchmarks; errors name ``rl.eval[i]``."""
    from megatron_vp2o.eval.tasks import DataError

    out = []
    for i, entry in enumerate(entries):
        try:
            out += load_benchmarks([entry.task], [entry.data], [entry.template])
        except DataError as err:
            raise DataError(f"rl.eval[{i}]: {err}") from None
    if len({b.name for b in out}) != len(out):
        raise DataError(f"rl.eval: benchmark file stems must be unique, got {[b.name for b in out]}")
    return out


def rl_evaluator(cfg):
    """``evaluate(model, tokenizer, prefix) -> dict``: the ``rl.eval`` benchmarks (read once, here)
    on the trainer's current weights, the same generate-and-score path as ``vp2o eval``, with
    ``rl.eval_samples`` samples at ``rl.sampling`` and one fixed seed (``train.seed`` +
    ``RL_EVAL_SEED``), so successive evaluations differ only through the weights. {} without rl.eval."""
    rl = cfg.rl
    benchmarks = rl_benchmarks(rl.eval)
    seed = cfg.train.seed + RL_EVAL_SEED

    def evaluate(model, tokenizer, prefix: str = "eval") -> dict:
        if not benchmarks:
            return {}
        return evaluate_benchmarks(model, tokenizer, benchmarks, rl.eval_samples, rl.sampling, seed,
                                   rl.reward_timeout_s, prefix)

    return evaluate
