"""Checkpoints: megatron dist-checkpoint save/load (reshardable across layouts), atomic on disk."""

from megatron_vp2o.checkpoint.dist import latest_checkpoint, load_checkpoint, load_model, save_checkpoint

__all__ = ["latest_checkpoint", "load_checkpoint", "load_model", "save_checkpoint"]
