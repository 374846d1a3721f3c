"""A failed verification names where the graph stops matching: first diverging module, ONNX node, changed weights."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import surgeon
import surgeon.export
from surgeon.core.errors import ExportError, VerificationError
from surgeon.export import locate_divergence
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from attention_models import tiny_gpt2, tiny_llama  # noqa: E402


class Block(nn.Module):
    """Residual MLP block with a plain Python scale (exported as a constant, not a weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.scale = nn.Linear(16, 16), nn.GELU(), 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.act(self.fc(x))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), Block(), Block(), nn.Linear(16, 3)).eval()


@pytest.fixture()
def exported(tmp_path):
    net = _net()
    surgeon.export.to_onnx(net, tmp_path, torch.randn(2, 8))
    return net, tmp_path


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_a_matching_export_has_no_divergence_at_new_shapes(exported):
    net, path = exported
    report = locate_divergence(path, net, (torch.randn(5, 8),))
    assert report.first is None and report.weights == []
    # every module's output was paired with its ONNX value: 0, 1.fc, 1.act, 1, 2.fc, 2.act, 2, 3
    assert [m.module for m in report.modules] == ["0", "1.fc", "1.act", "1", "2.fc", "2.act", "2", "3"]
    assert max(m.max_abs for m in report.modules) <= 1e-5
    assert "match" in report.summary()


def test_verify_names_the_edited_weight_and_the_first_diverging_module(exported):
    net, path = exported
    with torch.no_grad():
        net[2].fc.weight[0, 0] += 0.5               # edited after export
    before = _state(net)
    report = surgeon.export.verify(path, net, raise_on_failure=False)
    assert not report.passed
    where = report.divergence
    assert where["first"]["module"] == "2.fc" and where["first"]["onnx_op"] in {"Gemm", "MatMul"}
    assert where["first"]["max_abs"] > 1e-3
    assert [w["name"] for w in where["weights"]] == ["2.fc.weight"]
    assert abs(where["weights"][0]["max_abs"] - 0.5) < 1e-6
    assert all(not m["diverges"] for m in where["modules"][:3])         # 0, 1.fc, 1.act still match
    with pytest.raises(VerificationError, match=r"Where: .*'2\.fc\.weight'.*'2\.fc' \(Linear\)"):
        surgeon.export.verify(path, net)
    # diagnosis leaves the model as it was: same tensors, no hooks left behind
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())


def test_a_changed_constant_is_located_without_any_weight_change(exported):
    net, path = exported
    net[1].scale = 0.5                               # baked into the graph as a constant
    report = locate_divergence(path, net, (torch.randn(3, 8),))
    assert report.weights == []
    assert report.first.module == "1" and report.first.module_class == "Block"
    assert [m.diverges for m in report.modules[:3]] == [False, False, False]   # 0, 1.fc, 1.act


def test_wrong_inputs_are_a_clear_error(exported):
    net, path = exported
    with pytest.raises(ExportError, match=r"needs 1 inputs"):
        locate_divergence(path, net, (torch.randn(3, 8), torch.randn(3, 8)))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_causal_lm_verification_names_the_layer_whose_feature_map_changed(build, tmp_path):
    lm = surgeon.apply(build(num_hidden_layers=3) if build is tiny_llama else build(),
                       LinearizeAttention(feature_map="hedgehog", window=4)).model
    surgeon.export.to_onnx(lm, tmp_path)
    attn = [m for n, m in lm.named_modules() if n.endswith(("layers.1.self_attn", "h.1.attn"))][0]
    with torch.no_grad():
        attn.feature_q.weight.mul_(3.0)              # a distilled parameter changed after export
    report = surgeon.export.verify_causal_lm(tmp_path, lm, n_generate=8, raise_on_failure=False)
    assert not report.passed
    first = report.divergence["first"]["module"]
    assert first.endswith(("layers.1.self_attn.feature_q", "h.1.attn.feature_q")), first
    weights = report.divergence["weights"]
    assert len(weights) == 1 and weights[0]["name"].endswith(first + ".weight"), weights
    assert "where:" in report.to_markdown()
