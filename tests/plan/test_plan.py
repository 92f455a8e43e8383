"""Contract: `vp2o plan --check` on the tiny recipe compares every row a 1-rank run can measure with
the live objects after a learner step, for VP2O and GRPO, and fails (exit 1) on a wrong row; the
per-layer activation formula holds at another shape; the fits verdict follows peak vs usable
memory; bad input is one line, exit 2."""

import dataclasses

import pytest

from harness import run_world
from megatron_vp2o.cli.main import main
from megatron_vp2o.plan import plan_rank
from megatron_vp2o.plan.live import TOLERANCE, cpu_extra_bytes
from megatron_vp2o.plan.memory import layer_activation_bytes
from megatron_vp2o.recipes import paper_33b_a4b, qwen3_30b_a3b, tiny_cpu


@pytest.fixture(scope="module")
def world():
    """One 1-rank world: `vp2o plan --recipe tiny_cpu --check` as is and with a wrong plan row, and one
    MoE layer's saved-for-backward bytes (importing megatron once)."""
    return run_world(1, "plan.worlds_plan:check", {"model": LAYER_SHAPE, "tokens_BS": (4, 128)}, timeout_s=300)


LAYER_SHAPE = dict(hidden_size=256, moe_ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
                   moe_router_topk=2, seq_length=128)


def _verdicts(out: str) -> dict:
    """(row, algo) -> verdict of the live check's table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] in TOLERANCE and parts[1] in ("vp2o", "grpo"):
            rows[(parts[0], parts[1])] = parts[5]
    return rows


def test_plan_check_compares_every_measured_row_with_the_live_objects(world):
    rc, out = world["ok"]
    assert rc == 0, out
    verdicts = _verdicts(out)
    assert set(verdicts) == {(row, algo) for row in TOLERANCE for algo in ("vp2o", "grpo")}, out
    assert set(verdicts.values()) == {"ok"}, out
    assert "not measured: backtrack" in out and "host fits" in out


def test_a_wrong_plan_row_fails_the_check(world):
    rc, out = world["wrong"]
    assert rc == 1, out
    bad = {key for key, verdict in _verdicts(out).items() if verdict != "ok"}
    assert bad == {("prototypes", "vp2o"), ("prototypes", "grpo")}, out


def test_activation_formula_matches_saved_tensors_on_cpu(world):
    """One MoE layer's saved-for-backward bytes on the CPU path (fp32, sequential experts) equal the
    plan's per-layer formula plus what that path saves on top of the fused GPU kernels the formula
    assumes (live.cpu_extra_bytes, the term the live check adds), within 5%, at a wider and longer
    shape than the tiny recipe's."""
    cfg = tiny_cpu()
    batch, seq = 4, 128
    model = dataclasses.replace(cfg.model, num_layers=1, **LAYER_SHAPE)
    one = dataclasses.replace(cfg, model=model, rl=dataclasses.replace(cfg.rl, micro_batch_size=batch))
    formula = layer_activation_bytes(model, cfg.parallel, batch * seq, moe=True, a=4)
    extra = cpu_extra_bytes(one, "none")
    measured = world["per_layer"]
    assert abs(measured - (formula + extra)) <= 0.05 * measured, (measured, formula, extra)


def test_snapshot_follows_the_algorithm():
    cfg = tiny_cpu()
    vp2o = plan_rank(cfg, 1).bytes
    # main params (fp32: the parameters themselves) + optimizer state; never the model params again
    assert vp2o["tr_snapshot"] == vp2o["params"] + vp2o["optimizer"] and vp2o["backtrack"] == 0
    bf16 = plan_rank(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, params_dtype="bf16")), 1).bytes
    assert bf16["tr_snapshot"] == bf16["optimizer"]
    grpo = plan_rank(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, algo="grpo")), 1).bytes
    assert {grpo[k] for k in ("tr_snapshot", "stein", "prototypes", "routing", "routing_stats", "backtrack")} == {0}
    tr_off = dataclasses.replace(cfg.vp2o, trust_region=dataclasses.replace(cfg.vp2o.trust_region, enabled=False))
    freeze_only = plan_rank(dataclasses.replace(cfg, vp2o=tr_off), 1)
    assert 0 < freeze_only.bytes["tr_snapshot"] < vp2o["tr_snapshot"]  # expert parameters and their state only


def test_fits_is_peak_against_usable_memory():
    plan = plan_rank(paper_33b_a4b(8), 64)
    assert plan.peak_bytes(True) < plan.usable < plan.peak_bytes(False)
    assert plan.fits(True) and not plan.fits(False)
    one_node = plan_rank(qwen3_30b_a3b(1), 8)  # with Adam on the host: fits (issue 19)
    assert one_node.fits() and one_node.bytes["host_optimizer"] > 0 and one_node.host_fits()
    no_offload = dataclasses.replace(one_node.cfg, train=dataclasses.replace(one_node.cfg.train,
                                                                             optimizer_cpu_offload=False))
    assert not plan_rank(no_offload, 8).fits()


LAYOUTS = [("paper_33b_a4b", 8), ("paper_33b_a4b", 16), ("qwen3_30b_a3b", 1), ("qwen3_30b_a3b", 2),
           ("qwen3_30b_a3b", 4)]

def _vp2o_and_grpo(name, nodes):
    recipe = {"paper_33b_a4b": paper_33b_a4b, "qwen3_30b_a3b": qwen3_30b_a3b}[name](nodes)
    grpo = dataclasses.replace(recipe, rl=dataclasses.replace(recipe.rl, algo="grpo"))
    return plan_rank(recipe, nodes * 8), plan_rank(grpo, nodes * 8)


@pytest.mark.parametrize("name,nodes", LAYOUTS)
def test_recipes_fit(name, nodes):
    """Each recipe layout (with its recipes.models.MEMORY settings) fits an H100 80GB with 10% headroom,
    VP2O and GRPO, and the host rows fit the node."""
    vp2o, grpo = _vp2o_and_grpo(name, nodes)
    assert vp2o.fits() and vp2o.host_fits() and grpo.fits() and grpo.host_fits()


@pytest.mark.parametrize("name,nodes", LAYOUTS)
def test_vp2o_peak_within_ten_percent_of_grpo(name, nodes):
    """Issue 19's acceptance: VP2O's peak is at most 1.10 x GRPO's in the same layout and settings."""
    vp2o, grpo = _vp2o_and_grpo(name, nodes)
    assert vp2o.peak <= 1.10 * grpo.peak, (vp2o.peak / grpo.peak)


def test_plan_cli_table_and_errors(capsys):
    assert main(["plan", "--recipe", "qwen3_30b_a3b", "--nodes", "2,4", "rl.algo=grpo"]) == 0
    out = capsys.readouterr().out
    assert "rl.algo=grpo" in out and "[1] 32 GPUs" in out and "fits (full recompute)" in out
    assert main(["plan", "--recipe", "qwen3_30b_a3b", "--nodes", "two"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nodes must be" in err[0]
    assert main(["plan", "--config", "examples/configs/tiny_cpu.yaml", "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err


def test_vllm_engine_rows():
    """rl.engine=vllm (the GPU recipes' engine): weights = the model / rl.vllm.tp in the parameter dtype,
    KV cache = the rest of gpu_memory_utilization x the GPU, the sequences of full length it holds, host
    weights while asleep; the engine's phase enters the peak's max (asleep in the learner step) or its
    static sum (sleep off); a KV cache below one sequence does not fit; the megatron engine's KV row is
    then 0."""
    from megatron_vp2o.plan import GPUS, model_params

    cfg = qwen3_30b_a3b(1)
    assert cfg.rl.engine == "vllm" and cfg.rl.vllm.tp == 8
    plan = plan_rank(cfg, 8)
    b, m = plan.bytes, cfg.model
    weights = -(-model_params(m) // 8) * 2  # bf16
    assert b["vllm_weights"] == weights and b["host_vllm"] == weights and b["kv_cache"] == 0
    assert b["vllm_kv"] == int(0.3 * GPUS["h100-80gb"]) - weights
    per_token = 2 * m.num_layers * max(m.num_query_groups // 8, 1) * m.head_dim * 2
    assert plan.vllm_sequences == b["vllm_kv"] // (per_token * m.seq_length) > 1
    static = sum(b[k] for k in ("params", "grads", "optimizer", "tr_snapshot", "prototypes", "routing"))
    act = b["activations_recompute"] + b["routing_stats"]
    assert plan.peak_bytes(True) == static + max(act, b["stein"], weights + b["vllm_kv"])
    awake = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, vllm=dataclasses.replace(cfg.rl.vllm, sleep=False)))
    p_awake = plan_rank(awake, 8)
    assert p_awake.peak_bytes(True) == static + weights + b["vllm_kv"] + max(act, b["stein"])
    assert p_awake.bytes["host_vllm"] == 0
    starved = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, vllm=dataclasses.replace(
        cfg.rl.vllm, gpu_memory_utilization=0.09)))  # 7.2 GiB: under the 7.1 GiB weights + one sequence
    assert plan_rank(starved, 8).vllm_sequences == 0 and not plan_rank(starved, 8).fits()
    megatron = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, engine="megatron"))
    mp = plan_rank(megatron, 8)
    assert mp.vllm_sequences is None and mp.bytes["vllm_weights"] == mp.bytes["vllm_kv"] == 0 < mp.bytes["kv_cache"]
