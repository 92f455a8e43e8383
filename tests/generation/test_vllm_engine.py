"""Contract: the vLLM rollout engine samples from the learner's policy. Its sampled-token log-probs equal
megatron's teacher-forced log-probs of the same tokens (fp32, within 1e-3) for the exported tiny policy,
again after optimizer steps and a streamed refresh (and not without one, nor after a partial one); sampling
settings map one to one; a seeded call repeats exactly; the rollouts have the megatron engine's layout.
Runs in make test-vllm's venv (.venv-vllm); elsewhere it skips."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM not installed (make test-vllm installs it in .venv-vllm)")

from harness import run_world  # noqa: E402

TOL = 1e-3


@pytest.fixture(scope="module")
def res():
    out = run_world(1, "generation.worlds_vllm:checks", {}, timeout_s=600)
    print("\nvLLM vs megatron teacher-forced log-probs (max / mean |diff|, tokens):")
    for key in ("initial", "filtered", "greedy", "stop", "vocab", "stale_after_steps", "after_refresh", "partial",
                "expert_full"):
        print(f"  {key:18s} {out[key]['max']:.2e} / {out[key]['mean']:.2e}  ({out[key]['tokens']})")
    print(f"  refresh: {out['refresh']}; engine start {out['engine_start_s']:.1f} s")
    return out


def test_tiny_policy_head_dim_is_supported_by_cpu_attention(res):
    assert res["head_dim"] == 32


def test_exported_policy_logprobs_match_teacher_forced(res):
    assert res["initial"]["tokens"] > 500
    assert res["initial"]["max"] < TOL, res["initial"]
    assert res["initial_mismatch"]["rollout/mismatch_max_abs"] < TOL


def test_rollouts_have_the_megatron_layout(res):
    lay = res["layout"]
    b, p = lay["prompt_shape"]
    t = lay["response_shape"][1]
    assert lay["response_shape"][0] == b and lay["positions_shape"] == (b, p + t - 1)
    assert lay["routing_shape"][0] == 0 and lay["routing_shape"][1:3] == (b, p + t - 1)  # CPU: learner routing
    assert lay["lens_ok"] and lay["sequences_ok"] and lay["finish"] == ["length"]


def test_refresh_streams_every_tensor_in_buckets(res):
    s = res["sync"]
    assert s["rollout/weight_version"] == 1 and s["timing/weight_sync"] > 0
    assert s["rollout/weight_sync_mib"] > 1.0  # more than one 1 MiB bucket
    assert res["weight_version"] == 4  # initial, after steps, partial (counted, then refused), full


def test_after_steps_stale_engine_disagrees_and_refresh_restores_agreement(res):
    assert res["stale_after_steps"]["max"] > 20 * TOL, res["stale_after_steps"]
    assert res["after_refresh"]["max"] < TOL, res["after_refresh"]


def test_partial_refresh_raises_and_does_not_agree(res):
    assert res["partial_raised"]
    assert res["partial"]["max"] > 20 * TOL, res["partial"]
    assert res["expert_full"]["max"] < TOL, res["expert_full"]


def test_sampling_settings_map_one_to_one(res):
    assert res["filtered"]["max"] < TOL, res["filtered"]
    assert res["greedy"]["max"] < TOL and res["greedy_same_tokens"] > 0.95
    assert res["stop"]["rows_ok"] and res["stop"]["stopped"] > 0 and res["stop"]["max"] < TOL
    assert res["vocab"]["max_id"] < 100 and res["vocab"]["max"] < TOL


def test_seeded_generation_repeats_and_leaves_trainer_rng_alone(res):
    assert res["seed_repeats"] and res["seed_differs"] and res["rng_untouched"]
    assert res["start_keeps_rng_and_threads"]  # in-process start-up leaves the trainer's process as it was


def test_one_engine_per_data_parallel_rank():
    out = run_world(2, "generation.worlds_vllm:data_parallel", {}, timeout_s=600)
    assert out["dp_ranks"] == [0, 1] and out["samples_differ"]
    assert out["max_diff"] < TOL, out


def test_engine_over_two_ranks_serves_each_rank_its_own_prompts():
    """rl.vllm.tp=2: one engine tensor-parallel over both ranks (external_launcher on gloo)."""
    got = run_world(2, "generation.worlds_vllm:engine_group", {}, timeout_s=600)
    assert [g["engine_index"] for g in got] == [0, 0]  # one engine: one sampling stream
    for g in got:
        for case in ("greedy", "sampled", "refreshed"):
            r = g[case]
            assert r["own_prompts"] and r["rows"] == g["prompts"], (case, r)
            assert r["max"] < TOL and r["tokens"] > 0, (case, r)
        assert g["stale"]["max"] > 10 * TOL, g["stale"]  # the learner moved: without a refresh they differ


def test_synced_engine_takes_behaviour_from_the_learner(res):
    s = res["synced"]
    assert s["behaviour_is_learner"] == 0.0 and s["routing_layers"] == 4 and s["moe_layers"] == [1, 2, 3, 4]
    assert s["metrics"]["rollout/weight_version"] == 5 and s["metrics"]["timing/weight_sync"] > 0
    assert s["metrics"]["rollout/mismatch_max_abs"] < TOL and abs(s["metrics"]["rollout/mismatch_k3"]) < 1e-6
    assert s["max"] < TOL and 0.99 < s["is_weight_range"][0] <= s["is_weight_range"][1] < 1.01
