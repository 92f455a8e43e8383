"""megatron-vp2o: VP2O RL for Mixture-of-Experts language models on megatron-core."""

__version__ = "0.1.0"

# Config sections that live outside megatron_vp2o/config register themselves on import (config
# stays a leaf package; see megatron_vp2o/config/sections.py).
from megatron_vp2o.rl import config as _rl_config  # noqa: E402,F401
