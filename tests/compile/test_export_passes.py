"""to_onnx(passes=...): surgeon passes on the torch.export program, then ONNX, verified in onnxruntime."""
from __future__ import annotations

import onnx
import pytest
import torch

import surgeon
import surgeon.export
from surgeon.passes import FinalizeReLU, LinearizeReLU, masked_units

from compile_models import TinyResNet, seeded

torch.set_num_threads(1)


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_linearize_and_finalize_on_the_export_graph(tmp_path) -> None:
    model = seeded(TinyResNet())
    x = torch.randn(2, 3, 6, 6)
    passes = [LinearizeReLU(granularity="channel", init=0.0), FinalizeReLU()]
    res = surgeon.export.to_onnx(model, tmp_path / "lin", x, passes=passes)
    graph_passes = res.manifest.exporter["graph_passes"]
    assert [p["pass"] for p in graph_passes] == ["LinearizeReLU", "FinalizeReLU"]
    assert graph_passes[0]["sites"] == ["stem.2", "layer1.0.relu", "layer1.0.relu@1", "layer1.1.relu",
                                        "layer1.1.relu@1", "relu"]
    ops = _ops(res.onnx_path)
    assert not {"Relu", "Clip"} & set(ops), ops          # every activation folded away
    assert "Relu" in _ops(surgeon.export.to_onnx(model, tmp_path / "plain", x).onnx_path)
    # parity against the eager surgery, at batch sizes other than the export's
    eager = surgeon.apply(model, *passes, example_inputs=(x,)).model
    report = surgeon.export.verify(tmp_path / "lin", eager, inputs=[(torch.randn(3, 3, 6, 6),),
                                                                    (torch.randn(5, 3, 6, 6),)])
    assert report.passed and report.max_abs <= 1e-4
    assert model(x).sub(eager(x)).abs().max() > 1e-3     # the surgery changed the function


def test_zero_sites_on_export_graph_is_an_error_naming_the_pass(tmp_path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    with pytest.raises(surgeon.PlanError, match="LinearizeReLU found no ReLU"):
        surgeon.export.to_onnx(net, tmp_path / "none", torch.randn(2, 4), passes=[LinearizeReLU()])
    assert not (tmp_path / "none").exists()


def test_finalize_inlined_units_of_a_surgered_model(tmp_path) -> None:
    """torch.export inlines MaskedReLU units; FinalizeReLU finds them on the ATen graph and freezes them."""
    model = seeded(TinyResNet())
    x = torch.randn(2, 3, 6, 6)
    s = surgeon.apply(model, LinearizeReLU(granularity="channel"), example_inputs=(x,))
    units = masked_units(s.model)
    with torch.no_grad():
        units["stem.2"].mask.zero_()                 # identity
        units["layer1.0.relu@1"].mask[::2] = 0.0     # frozen binary mask
        units["relu"].mask.fill_(0.9)                # >= 0.5: plain ReLU
    eager = surgeon.apply(s, FinalizeReLU()).model
    res = surgeon.export.to_onnx(s.model, tmp_path / "fin", x, passes=[FinalizeReLU()])
    rows = {r["site"]: r["action"] for r in res.surgery.report["FinalizeReLU"].rows}
    assert rows == {"stem.2": "identity", "layer1.0.relu": "relu", "layer1.0.relu@1": "masked",
                    "layer1.1.relu": "relu", "layer1.1.relu@1": "relu", "relu": "relu"}
    ops = _ops(res.onnx_path)
    assert ops.count("Relu") == 5 and "Clip" not in ops and "Where" in ops, ops
    report = surgeon.export.verify(tmp_path / "fin", eager, inputs=[(torch.randn(3, 3, 6, 6),)])
    assert report.passed and report.max_abs <= 1e-4
    with torch.no_grad():
        assert (eager(x) - s.model(x)).abs().max() > 1e-3   # 0.9 masks -> ReLU: finalizing changed it
