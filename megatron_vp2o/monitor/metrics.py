"""Metrics sinks: ``<out>/metrics.jsonl`` (always), wandb and tensorboard (opt-in), a rich progress bar.

Only global rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step (``step``,
``loss``, ``lr``, ``grad_norm``, ``timing/*``, ...); it is appended to, so a resumed run continues
the same file (rows after the resume point are dropped first, so no step appears twice).
wandb runs with the project name from the config; set ``WANDB_MODE=offline`` on machines without
network (tests do).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, out_dir: str | Path, logging_cfg, run_config: dict | None = None, resume_step: int = 0):
        self.enabled = is_rank0()
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = self.tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if logging_cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=logging_cfg.wandb_project, config=run_config or {},
                                   dir=str(Path(out_dir)), resume="allow", id=os.environ.get("WANDB_RUN_ID"))
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A rich progress bar on rank 0 (a no-op elsewhere or when disabled)."""

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0):
        self.bar = None
        if not (enabled and is_rank0()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.task = self.bar.add_task(description, total=total, completed=start, info="")
        self.bar.start()

    def update(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
