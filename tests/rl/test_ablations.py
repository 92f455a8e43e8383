"""Contract: each rl.ablate switch of the Stein transport removes exactly its term (docs/method.md §2.8):
the Stein hook's transport under the knobs the session derives (rl.session.vp2o_knobs) equals the
algo reference (algo.stein.stein_transport, dR/dW from algo.stein.repulsion_grad) with the other term
alone, on the co-active / inactive sets of the full method; rl.ablate.stein=false switches the
transport off (both terms, and the freeze of inactive experts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_vp2o.algo import coactivation, kernels, stein
from megatron_vp2o.algo.prototypes import normalize
from megatron_vp2o.config import load_config
from megatron_vp2o.distributed.stein_hook import _transport_blocks, layer_masks, layer_repulsion
from megatron_vp2o.rl.session import vp2o_knobs

TINY = "examples/configs/tiny_cpu.yaml"
E, D, F, P1, TOKENS, TOP_K = 8, 6, 5, 7, 64.0, 2


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


@pytest.fixture(scope="module")
def layer():
    """One layer's reduced counts (expert 5 inactive), prototypes, fc2 weight [E, D, F] and raw
    gradients (fc1 [E, P1], fc2 [E, D*F])."""
    gen = torch.Generator().manual_seed(11)
    counts_EE = torch.randint(0, 6, (E, E), generator=gen).float()
    counts_EE = counts_EE + counts_EE.T
    counts_EE[5] = counts_EE[:, 5] = 0.0
    return SimpleNamespace(counts_EE=counts_EE, protos_ED=normalize(torch.randn(E, D, generator=gen)),
                           weight_EDF=torch.randn(E, D, F, generator=gen), fc1_EP=torch.randn(E, P1, generator=gen),
                           fc2_EP=torch.randn(E, D * F, generator=gen))


def _hook(knobs, lay) -> dict:
    """What the learner does to one layer's gradients under ``knobs`` (rl.learner.vp2o: the hook runs
    only with vp2o.stein.enabled; distributed.stein_hook: masks, repulsion, transport of both blocks)."""
    if not knobs.enabled:
        return {"fc1": lay.fc1_EP, "fc2": lay.fc2_EP}
    active_E, _, inactive_EE, _, idx_EM1, w_EM1 = layer_masks(lay.counts_EE, lay.protos_ED, TOKENS, knobs, TOP_K)
    fake = SimpleNamespace(expert_offset=0, num_local_experts=E, accessor=SimpleNamespace(
        fc2_weight_XDF=lambda: lay.weight_EDF, fc2_transposed=False))
    rep, _ = layer_repulsion([fake], inactive_EE[None], lay.protos_ED[None], knobs, SimpleNamespace(expert_tp=None))
    rep = None if rep is None else (rep[0][0], rep[1][0])
    blocks = {"fc1": lay.fc1_EP.clone(), "fc2": lay.fc2_EP.clone()}
    outs, _, _ = _transport_blocks(blocks, {"all": idx_EM1, "rows": idx_EM1}, w_EM1, active_E, rep, knobs,
                                   torch.tensor(True), None, 1)
    return outs


def _reference(full, lay, attraction: bool, repulsion: bool) -> dict:
    """algo.stein.stein_transport on the full method's sets, with each term on or off."""
    m = full.resolved_topm(TOP_K)
    coactive_EE, inactive_EE = coactivation.neighbour_masks(coactivation.coactivation_matrix(lay.counts_EE, TOKENS), m)
    kernel_EE = kernels.prototype_kernel(lay.protos_ED, **full.kernel_args())
    active_E = coactivation.active_experts(lay.counts_EE)
    rep_EP = stein.repulsion_grad(lay.weight_EDF, lay.protos_ED, inactive_EE, full.kernel_tau0, full.kernel, 0,
                                  full.kernel_bandwidth, full.kernel_sharpness).reshape(E, -1)
    topm = m if attraction else 0  # 0: every row keeps its own gradient (weight 1)
    return {"fc1": stein.stein_transport(lay.fc1_EP, kernel_EE, coactive_EE, active_E, topm=topm),
            "fc2": stein.stein_transport(lay.fc2_EP, kernel_EE, coactive_EE, active_E, topm=topm, repulsion_EP=rep_EP,
                                         repulsion_coef=full.repulsion_coef if repulsion else 0.0)}


@pytest.mark.parametrize("ablate, attraction, repulsion", [
    ([], True, True),
    (["rl.ablate.attraction=false"], False, True),
    (["rl.ablate.repulsion=false"], True, False),
    (["rl.ablate.attraction=false", "rl.ablate.repulsion=false"], False, False),
])
def test_each_switch_removes_exactly_its_term(layer, ablate, attraction, repulsion):
    full = vp2o_knobs(load_config(TINY)).stein
    knobs = vp2o_knobs(load_config(TINY, ablate)).stein
    assert knobs.enabled and knobs.freeze_inactive  # the transport (and its freeze) still runs
    got, ref = _hook(knobs, layer), _reference(full, layer, attraction, repulsion)
    for block in ("fc1", "fc2"):
        assert torch.allclose(got[block], ref[block], rtol=1e-5, atol=1e-6), (block, got[block] - ref[block])
    # the term that stays is the full method's own: switching the other off changes what it should
    on = _hook(full, layer)
    assert torch.equal(got["fc1"], on["fc1"]) == attraction  # fc1 carries the attraction only
    assert (not torch.allclose(got["fc2"], on["fc2"])) == (not (attraction and repulsion))
    assert got["fc2"][5].abs().max() == 0  # the inactive expert: zero, as in every branch of the transport


def test_stein_off_is_both_terms_off_without_the_transport(layer):
    """rl.ablate.stein=false: no transport at all (vp2o.stein.enabled=false): the gradients are the raw
    ones, the inactive expert's included, and nothing freezes it (plain gradients, as GRPO's)."""
    knobs = vp2o_knobs(load_config(TINY, ["rl.ablate.stein=false"])).stein
    assert not knobs.enabled
    got = _hook(knobs, layer)
    assert torch.equal(got["fc1"], layer.fc1_EP) and torch.equal(got["fc2"], layer.fc2_EP)
    neither = load_config(TINY, ["rl.ablate.attraction=false", "rl.ablate.repulsion=false"])
    both = _hook(vp2o_knobs(neither).stein, layer)
    active_E = coactivation.active_experts(layer.counts_EE)
    assert torch.equal(both["fc2"], torch.where(active_E[:, None], layer.fc2_EP, 0.0))  # = raw on active experts


def test_switches_map_onto_config_values_only():
    """Each switch is a config value the hook already takes (no new branch on tensors); the other
    VP2O knobs are untouched."""
    base = vp2o_knobs(load_config(TINY))
    cases = {"attraction": {"attraction": False}, "repulsion": {"repulsion_coef": 0.0}, "stein": {"enabled": False}}
    for switch, changed in cases.items():
        knobs = vp2o_knobs(load_config(TINY, [f"rl.ablate.{switch}=false"]))
        assert {k: v for k, v in vars(knobs.stein).items() if vars(base.stein)[k] != v} == changed, switch
        assert knobs.trust_region == base.trust_region and knobs.specialization == base.specialization
    spec = vp2o_knobs(load_config(TINY, ["rl.ablate.specialization=false"])).specialization
    assert (spec.ortho_coef, spec.var_coef) == (0.0, 0.0)
