"""Recipes (typed configs with a layout per node count) and their nemo-run launch helpers.

:mod:`.models` holds the recipes; :mod:`.nemo` turns a recipe plus overrides into a nemo-run
``run.Script`` for ``vp2o train`` and builds local / slurm executors and sweeps.
"""

from megatron_vp2o.recipes.models import NODES, RECIPES, get_recipe, paper_33b_a4b, qwen3_30b_a3b, tiny_cpu

__all__ = ["NODES", "RECIPES", "get_recipe", "paper_33b_a4b", "qwen3_30b_a3b", "tiny_cpu"]
