"""``vp2o sft``: supervised fine-tuning of the MoE GPT on a JSONL dataset.

The loop reads top to bottom: load inputs -> start the parallel state -> build the trainable
stack -> (load weights) -> for each step: this rank's micro-batches, ``train_step``, log,
checkpoint -> final checkpoint and summary. Every input is checked before anything is written, by
the `vp2o sft` pre-flight (``cli/checks.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

from megatron.core import parallel_state as ps

from megatron_vp2o.checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from megatron_vp2o.config import to_dict
from megatron_vp2o.data.sft import SFTDataset, read_jsonl
from megatron_vp2o.data.tokenizer import load_tokenizer
from megatron_vp2o.distributed.init import init_parallel
from megatron_vp2o.monitor import MetricsLogger, Progress
from megatron_vp2o.training.setup import build_trainable
from megatron_vp2o.training.step import train_step


def load_inputs(cfg):
    """The tokenizer and the SFT rows. The inputs were checked by the `vp2o sft` pre-flight
    (``cli/checks.py``, once); the process-group start-up re-validates the layout as part of its work."""
    return load_tokenizer(cfg.data.tokenizer), read_jsonl(cfg.data.path)


def run_sft(cfg, out_dir: str | Path, resume: bool = False) -> dict:
    """Train; returns a summary dict (first/last loss, steps, seconds).

    ``resume``: continue from the newest complete checkpoint under the checkpoint directory
    (weights, optimizer, schedule, RNG; the data position is the step), exactly.
    """
    out_dir = Path(out_dir)
    tok, rows = load_inputs(cfg)
    ckpt_root = Path(cfg.checkpoint.dir or out_dir / "checkpoints")
    resume_from = latest_checkpoint(ckpt_root) if resume and ckpt_root.exists() else None
    layout = init_parallel(cfg)
    trainable = build_trainable(cfg)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, trainable)["step"]
    elif cfg.checkpoint.load:
        load_model(cfg.checkpoint.load, trainable.models)
        trainable.optimizer.reload_model_params()
    data = SFTDataset(rows, tok, cfg.model.seq_length, cfg.data.loss_on_prompt)
    meta = {"config": to_dict(cfg), "kind": "sft", "world_size": layout.world}
    logger = MetricsLogger(out_dir, cfg.logging, to_dict(cfg), resume_step=start)
    bar = Progress(cfg.train.steps, "sft", cfg.logging.progress, start=start)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    losses, t_start = [float("nan")], time.perf_counter()
    for step in range(start + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        batches = data.micro_batches(step - 1, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                     dp_rank, dp_size, cfg.train.seed)
        metrics = train_step(trainable, batches)
        metrics["timing/step"] = time.perf_counter() - t0
        losses.append(metrics["loss"])
        if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
            logger.log(step, metrics)
        bar.update(f"loss {metrics['loss']:.4f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != cfg.train.steps:
            save_checkpoint(ckpt_root, step, trainable, meta)
    bar.close()
    if cfg.checkpoint.save_final:
        save_checkpoint(ckpt_root, cfg.train.steps, trainable, meta, with_optimizer=cfg.checkpoint.save_optimizer)
    logger.close()
    losses = losses[1:] or [float("nan")]
    return {"steps": cfg.train.steps, "resumed_from": start, "first_loss": losses[0], "last_loss": losses[-1],
            "min_loss": min(losses), "seconds": time.perf_counter() - t_start,
            "parameters": sum(p.numel() for p in trainable.module.parameters()),
            "layout": f"dp={layout.dp} tp={layout.tp} pp={layout.pp} ep={layout.ep}", "checkpoint": str(ckpt_root)}
