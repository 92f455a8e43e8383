"""Contract: configs load strictly; bad keys, types and impossible layouts name the field and the fix."""

import pytest

from megatron_vp2o.config import ConfigError, check_layout, load_config

TINY = "examples/configs/tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_tiny_config_and_overrides():
    cfg = load_config(TINY, ["train.steps=7", "parallel.ep=2", "model.router.score_function=sigmoid", "train.lr=1e-3"])
    assert (cfg.train.steps, cfg.parallel.ep, cfg.model.router.score_function, cfg.train.lr) == (7, 2, "sigmoid", 1e-3)
    layout = check_layout(cfg, 2)
    assert (layout.dp, layout.edp, layout.ep, layout.num_micro_batches) == (2, 1, 2, 1)


@pytest.mark.parametrize("override, words", [
    (["model.hiden_size=3"], ["model.hiden_size", "hidden_size"]),
    (["bogus.x=1"], ["bogus"]),
    (["train.steps=abc"], ["train.steps", "integer"]),
    (["train.lr=-1"], ["train.lr", "> 0"]),
    (["model.dispatcher=nccl"], ["model.dispatcher", "allgather", "alltoall"]),
    (["parallel.tp"], ["parallel.tp", "section.field=value"]),
    (["vp2o.stein.repulsion_coef=-1"], ["vp2o.stein.repulsion_coef"]),
    (["model.moe_router_topk=9"], ["model.moe_router_topk", "num_experts"]),
    (["model.recompute_modules=[abc]"], ["model.recompute_modules", "core_attn", "'abc'"]),
    (["model.recompute_modules=[moe_act]"], ["model.recompute_modules", "te_grouped"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, override)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("override, world, words", [
    (["parallel.ep=3"], 3, ["model.num_experts=8", "parallel.ep=3", "[1, 2, 4, 8]"]),
    (["parallel.tp=2"], 3, ["world size 3", "parallel.tp"]),
    (["parallel.tp=2", "parallel.sequence_parallel=false"], 2, ["sequence_parallel"]),
    (["train.global_batch_size=20"], 2, ["train.global_batch_size", "micro_batch_size"]),
    (["parallel.pp=3"], 3, ["model.num_layers", "parallel.pp"]),
])
def test_impossible_layouts(override, world, words):
    cfg = load_config(TINY, override)
    with pytest.raises(ConfigError) as info:
        check_layout(cfg, world)
    for word in words:
        assert word in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_33b_config_loads_and_fits_an_h100_layout():
    cfg = load_config("examples/configs/vp2o_33b_a4b_h100.yaml")
    layout = check_layout(cfg, 64)
    assert layout.ep * layout.etp <= 64 and cfg.model.num_experts % cfg.parallel.ep == 0


def test_selective_recompute_modules_default_and_transformer_engine():
    import importlib.util

    from megatron_vp2o.config.validate import recompute_modules

    cfg = load_config(TINY, ["model.recompute=selective"])
    assert recompute_modules(cfg.model) == ["core_attn", "moe"]
    cfg = load_config(TINY, ["model.recompute=selective", "model.recompute_modules=[layernorm, core_attn]"])
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ConfigError, match="model.recompute_modules: layernorm need Transformer Engine"):
            recompute_modules(cfg.model)
    else:
        assert recompute_modules(cfg.model) == ["layernorm", "core_attn"]
    # Not selective: the list is not used, so nothing is refused.
    cfg = load_config(TINY, ["model.recompute=full", "model.recompute_modules=[layernorm]"])
    assert recompute_modules(cfg.model) == ["layernorm"]
