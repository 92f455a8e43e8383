"""Checkpoints: megatron dist-checkpoint save/load (reshardable across layouts), atomic on disk.

``checkpoint.meta`` (finding checkpoints, reading and checking their metadata) imports no
megatron-core, so the CLI validates checkpoints before the platform layer starts; the dist
checkpoint functions below load megatron-core on first use.
"""

from megatron_vp2o.checkpoint.meta import latest_checkpoint

__all__ = ["latest_checkpoint", "load_checkpoint", "load_model", "save_checkpoint"]


def __getattr__(name):
    if name in ("load_checkpoint", "load_model", "save_checkpoint"):
        from megatron_vp2o.checkpoint import dist

        return getattr(dist, name)
    raise AttributeError(name)
