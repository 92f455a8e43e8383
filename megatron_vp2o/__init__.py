"""megatron-vp2o: VP2O RL for Mixture-of-Experts language models on megatron-core."""

__version__ = "0.3.0"

