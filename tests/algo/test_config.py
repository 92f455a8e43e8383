"""Contract: algorithm configs default to method §3, reject bad values with a ValueError that
names the field and the allowed range, and document every field in one line."""

import ast
import dataclasses
import pathlib

import pytest

from megatron_vp2o.algo import config as cfg


def test_defaults_follow_spec_section_3():
    stein, tr = cfg.SteinConfig(), cfg.TrustRegionConfig()
    spec, pol = cfg.SpecializationConfig(), cfg.PolicyLossConfig()
    assert (stein.kernel, stein.kernel_tau0, stein.repulsion_coef) == ("sq_cos", 1.0, 0.01)
    assert (stein.power_iters, stein.init_power_iters, stein.freeze_inactive) == (2, 30, True)
    assert stein.coact_topm is None and stein.resolved_topm(top_k=6) == 6
    assert cfg.SteinConfig(coact_topm=0).resolved_topm(top_k=6) == 0
    assert (tr.anchor_delta, tr.drift_delta, tr.ess_min, tr.max_steps_per_refresh) == (
        0.1, 0.02, 0.5, 8)
    assert tr.on_violation == "backtrack" and tr.backtrack_scales == (0.5, 0.25, 0.125)
    assert tr.resolved_ess_temper() == 0.25
    assert cfg.TrustRegionConfig(ess_level="token").resolved_ess_temper() == 1.0
    assert (spec.ortho_coef, spec.var_coef) == (1e-4, 1e-3)
    assert (pol.kl_coef, pol.group_size) == (0.0, 8) and not hasattr(pol, "clip_eps")  # per algorithm
    assert (pol.advantage, pol.policy_loss, pol.aggregation) == ("grpo", "vp2o",
                                                                 "seq_mean_token_mean")
    assert cfg.GRPOConfig is cfg.PolicyLossConfig


@pytest.mark.parametrize(
    "cls, field, value, message",
    [
        (cfg.SteinConfig, "repulsion_coef", -1, r"stein\.repulsion_coef must be >= 0 \(got -1\)"),
        (cfg.SteinConfig, "kernel", "rbf", r"stein\.kernel must be one of \{cos, sq_cos\}"),
        (cfg.SteinConfig, "kernel_tau0", 0.0, r"stein\.kernel_tau0 must be > 0"),
        (cfg.SteinConfig, "coact_topm", -2, r"stein\.coact_topm must be None or an int >= 0"),
        (cfg.SteinConfig, "power_iters", 0, r"stein\.power_iters must be an int >= 1"),
        (cfg.SteinConfig, "init_power_iters", 2.5, r"stein\.init_power_iters must be an int"),
        (cfg.SteinConfig, "freeze_inactive", "yes", r"stein\.freeze_inactive must be a bool"),
        (cfg.TrustRegionConfig, "anchor_delta", 3.0,
         r"trust_region\.anchor_delta must be in \(0, 2\] \(got 3\.0\)"),
        (cfg.TrustRegionConfig, "on_violation", "retry",
         r"trust_region\.on_violation must be one of \{backtrack, reject, refresh\}"),
        (cfg.TrustRegionConfig, "backtrack_scales", (0.5, 1.5),
         r"trust_region\.backtrack_scales must be a list of numbers in \(0, 1\)"),
        (cfg.TrustRegionConfig, "drift_delta", -0.1, r"trust_region\.drift_delta must be > 0"),
        (cfg.TrustRegionConfig, "ess_min", 1.5, r"trust_region\.ess_min must be in \[0, 1\]"),
        (cfg.TrustRegionConfig, "ess_temper", 0, r"trust_region\.ess_temper must be None or > 0"),
        (cfg.TrustRegionConfig, "ess_level", "batch", r"trust_region\.ess_level must be one of"),
        (cfg.TrustRegionConfig, "max_steps_per_refresh", 0,
         r"trust_region\.max_steps_per_refresh must be an int >= 1"),
        (cfg.SpecializationConfig, "ortho_coef", -1e-4, r"specialization\.ortho_coef must be >= 0"),
        (cfg.SpecializationConfig, "var_coef", "x", r"specialization\.var_coef must be >= 0"),
        (cfg.PolicyLossConfig, "advantage", "ppo", r"policy_loss\.advantage must be one of"),
        (cfg.PolicyLossConfig, "policy_loss", "ppo", r"policy_loss\.policy_loss must be one of"),
        (cfg.PolicyLossConfig, "kl_coef", -1.0, r"policy_loss\.kl_coef must be >= 0"),
        (cfg.PolicyLossConfig, "group_size", 1, r"policy_loss\.group_size must be an int >= 2"),
        (cfg.PolicyLossConfig, "aggregation", "sum", r"policy_loss\.aggregation must be one of"),
        (cfg.PolicyLossConfig, "adv_eps", 0, r"policy_loss\.adv_eps must be > 0"),
    ],
)
def test_bad_value_names_field_and_range(cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})


def test_every_field_has_a_one_line_doc_comment():
    source = pathlib.Path(cfg.__file__).read_text().splitlines()
    tree = ast.parse("\n".join(source))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for cls in (cfg.SteinConfig, cfg.TrustRegionConfig, cfg.SpecializationConfig,
                cfg.PolicyLossConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        documented = set()
        for stmt in classes[cls.__name__].body:
            if isinstance(stmt, ast.AnnAssign) and stmt.target.id in fields:
                above = source[stmt.lineno - 2].strip()
                if above.startswith("#: ") and len(above) > 10:
                    documented.add(stmt.target.id)
        assert documented == fields, f"{cls.__name__}: undocumented {fields - documented}"
