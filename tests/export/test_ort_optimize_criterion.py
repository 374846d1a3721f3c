"""``optimize()`` judges each onnxruntime level by the criterion ``verify`` applies (not tolerances of its own):
a model that verify rejects is rejected at every level too, and explicit bounds are used exactly."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon.export
from surgeon.core.errors import VerificationError
from surgeon.export import DEFAULT_CRITERION, Criterion


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32)).eval()
    out = tmp_path_factory.mktemp("opt")
    surgeon.export.to_onnx(net, out, torch.randn(2, 16))
    return net, out


def test_levels_are_judged_by_the_default_criterion(exported):
    net, out = exported
    rep = surgeon.export.optimize(out, net, levels=["basic"], threads=1, repeats=1, record=False)
    assert rep.criterion == DEFAULT_CRITERION.describe() and rep.atol is None and rep.rtol is None
    assert all(r.passed for r in rep.results) and rep.best == {"model": "basic"}
    assert DEFAULT_CRITERION.describe() in str(rep)


def test_a_change_verify_rejects_is_rejected_at_every_level(exported):
    """A relative 3e-4 change of one weight matrix: within the old fixed atol 1e-4 + rtol 1e-3, but 70 dB SNR."""
    net, out = exported
    edited = copy.deepcopy(net)
    with torch.no_grad():
        edited[2].weight.mul_(1 + 3e-4)
    assert not surgeon.export.verify(out, edited, raise_on_failure=False).passed
    with pytest.raises(VerificationError, match="no onnxruntime optimization level keeps .* within the criterion"):
        surgeon.export.optimize(out, edited, levels=["basic"], threads=1, repeats=1, record=False)
    loose = Criterion(atol=1e-2, rtol=0.0, min_snr_db=None)            # a criterion of one's own: used as given
    rep = surgeon.export.optimize(out, edited, levels=["basic"], threads=1, repeats=1, record=False, criterion=loose)
    assert rep.atol == 1e-2 and rep.criterion == loose.describe() and rep.best == {"model": "basic"}
