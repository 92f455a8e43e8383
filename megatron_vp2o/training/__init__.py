"""Training on megatron-core: model + DDP + optimizer set-up, the SFT step and loop."""
