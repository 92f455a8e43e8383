"""Benchmark evaluation of megatron checkpoints (``vp2o eval``; docs/evaluation.md).

tasks.py     readers of each benchmark's public layout -> EvalItem (prompt + reward meta)
generate.py  n samples per problem on our rollout engine, the same under every layout
score.py     scoring through the reward registry; per-problem and per-benchmark numbers
metrics.py   unbiased pass@k, avg@n, maj@k, token statistics, paired bootstrap
rating.py    Codeforces-style rating (Elo logistic model, maximum likelihood)
runner.py    checkpoints x benchmarks; the in-training hook (rl.eval)
report.py    results.json / results.md, the Table-1 comparison (--compare)

tasks, score, metrics, rating and report import no megatron (``--responses`` and ``--compare``
run without it); generate and runner do.
"""
