"""Contract: the recipes are what they claim -- Qwen3-30B-A3B's model section is what `vp2o convert
hf-to-mcore` makes of its HF config, the shipped YAMLs load to exactly the recipes, and megatron's
model built on the meta device as rank 0 of every recipe layout has the plan's parameter count."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vp2o.config import ConfigError, load_config, to_dict
from megatron_vp2o.plan import model_params
from megatron_vp2o.recipes import NODES, paper_33b_a4b, qwen3_30b_a3b, tiny_cpu

ROOT = Path(__file__).resolve().parents[2]

# Qwen/Qwen3-30B-A3B config.json (architecture fields, as published on the Hugging Face hub)
QWEN3_30B_A3B_HF = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_qwen3_model_is_what_convert_produces():
    from megatron_vp2o.checkpoint.hf.archs import model_config_from_hf

    _, converted = model_config_from_hf(QWEN3_30B_A3B_HF, expert_impl="te_grouped")
    recipe = qwen3_30b_a3b(2).model
    # the run-time choices the recipe documents: RL context length instead of the RoPE limit, and
    # activation recompute (recipes.models.MEMORY: what makes the layout fit)
    assert (converted.seq_length, recipe.seq_length) == (40960, 4096)
    assert dataclasses.replace(recipe, seq_length=converted.seq_length, recompute="none") == converted
    assert 30.4e9 < model_params(recipe) < 30.6e9  # "30.5B total"


def test_paper_model_size():
    assert 33.4e9 < model_params(paper_33b_a4b(8).model) < 33.7e9


@pytest.mark.parametrize("name,nodes,path", [
    ("qwen3_30b_a3b", 1, "qwen3_30b_a3b_h100_1node.yaml"), ("qwen3_30b_a3b", 2, "qwen3_30b_a3b_h100_2node.yaml"),
    ("qwen3_30b_a3b", 4, "qwen3_30b_a3b_h100_4node.yaml"), ("paper_33b_a4b", 8, "vp2o_33b_a4b_h100.yaml")])
def test_yaml_loads_to_the_recipe(name, nodes, path):
    recipe = {"qwen3_30b_a3b": qwen3_30b_a3b, "paper_33b_a4b": paper_33b_a4b}[name](nodes)
    assert to_dict(load_config(ROOT / "examples" / "configs" / path)) == to_dict(recipe)


def test_recipe_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"nodes=3; choose nodes among \[1, 2, 4\]"):
        qwen3_30b_a3b(3)
    assert tiny_cpu(ranks=2, ep=2).parallel.ep == 2


def test_meta_build_matches_plan_for_every_layout():
    """`vp2o plan --check`: rank 0 of each GPU layout built on meta (fake process group) == plan; tiny_cpu live."""
    code = ("import sys; from megatron_vp2o.cli.main import main; "
            "sys.exit(max(main(['plan', '--recipe', r, '--check']) for r in ('tiny_cpu', 'qwen3_30b_a3b', 'paper_33b_a4b')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checks = [line for line in out.stdout.splitlines() if line.startswith("meta check")]
    assert len(checks) == len(NODES["qwen3_30b_a3b"]) + len(NODES["paper_33b_a4b"])
    assert all(line.endswith(": ok") for line in checks), checks
    # the tiny recipe fits this machine, so it is measured live instead (tests/plan checks the rows)
    assert sum(line.startswith("live check tiny_cpu") for line in out.stdout.splitlines()) == 1, out.stdout[-3000:]


def test_shipped_yamls_are_generated_from_the_recipes_and_plan():
    """examples/configs/{qwen3_30b_a3b_h100_*node,vp2o_33b_a4b_h100}.yaml == `python tools/recipe_yamls.py`
    (config and the plan numbers in the header)."""
    out = subprocess.run([sys.executable, "tools/recipe_yamls.py", "--check"], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
