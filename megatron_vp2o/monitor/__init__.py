"""Run monitoring: metrics.jsonl, rich progress bar, wandb and tensorboard (rank 0 only)."""

from megatron_vp2o.monitor.metrics import MetricsLogger, Progress

__all__ = ["MetricsLogger", "Progress"]
