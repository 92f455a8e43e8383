"""Contract: algo.loss_grads.loss_grad_norms turns summed squared gradient norms into RMS-over-ranks
norms in the step's units (/ N) and the ortho/pg, var/pg ratios; NaN (a term not measured) stays NaN;
it traces under torch.compile(fullgraph=True)."""

import math

import torch

from megatron_vp2o.algo.loss_grads import loss_grad_norms


def test_norms_and_ratios_by_hand():
    sq = torch.tensor([[16.0, 4.0, 64.0], [float("nan"), 1.0, 4.0]]) * 2  # two ranks' squares summed
    got = loss_grad_norms(sq, normalizer=2.0, ranks=2)
    assert torch.allclose(got["ortho"][:1], torch.tensor([2.0]))
    assert torch.allclose(got["var"], torch.tensor([1.0, 0.5]))
    assert torch.allclose(got["pg"], torch.tensor([4.0, 1.0]))
    assert torch.allclose(got["ratio_var"], torch.tensor([0.25, 0.5]))
    assert got["ratio_ortho"][0] == 0.5 and math.isnan(float(got["ratio_ortho"][1]))


def test_fullgraph():
    sq = torch.rand(3, 3)
    compiled = torch.compile(loss_grad_norms, fullgraph=True, backend="eager")
    ref, out = loss_grad_norms(sq, 7.0, 4), compiled(sq, 7.0, 4)
    assert all(torch.allclose(ref[k], out[k]) for k in ref)
