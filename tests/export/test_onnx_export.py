"""surgeon.export: ONNX export + onnxruntime verification, with real exports and real numbers."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon.export
from surgeon.core.errors import ExportError, VerificationError
from surgeon.export import flatten_outputs, load_manifest, to_onnx, verify


class SmallResNet(nn.Module):
    """Conv + BN + ReLU stem, one residual block, a strided conv, global mean, Linear head."""

    def __init__(self, classes: int = 10, return_dict: bool = False) -> None:
        super().__init__()
        self.return_dict = return_dict
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        feats = F.relu(self.down(x)).mean(dim=(2, 3))
        logits = self.head(feats)
        return {"logits": logits, "features": feats} if self.return_dict else logits


def make_cnn(seed: int = 0, **kw) -> SmallResNet:
    torch.manual_seed(seed)
    m = SmallResNet(**kw)
    with torch.no_grad():  # BN that is not the identity in eval mode
        for bn in (m.bn0, m.bn1, m.bn2):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    """The CNN exported once at batch 2 while in *training* mode (to_onnx must use eval)."""
    model = make_cnn()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("cnn") / "onnx"
    res = to_onnx(model, out, torch.randn(2, 3, 16, 16), recipe={"passes": [], "note": "test"})
    return model, res, state


def _onnx_input_dims(path: Path, name: str) -> list:
    proto = onnx.load(str(path), load_external_data=False)
    v = next(i for i in proto.graph.input if i.name == name)
    return [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]


def test_public_names():
    for name in ("to_onnx", "verify", "ExportResult", "VerifyReport", "load_manifest"):
        assert hasattr(surgeon.export, name)


def test_flatten_outputs_names_and_order():
    t = torch.ones(1)
    assert [n for n, _ in flatten_outputs(t)] == ["output"]
    assert [n for n, _ in flatten_outputs((t, t))] == ["output_0", "output_1"]
    nested = {"logits": t, "hidden": (t, None, t), "skip": None}
    assert [n for n, _ in flatten_outputs(nested)] == ["logits", "hidden.0", "hidden.2"]
    with pytest.raises(TypeError, match="cannot be an ONNX output"):
        flatten_outputs({"cache": object()})


def test_export_writes_graph_and_manifest(cnn_export):
    model, res, _ = cnn_export
    folder = res.onnx_path.parent
    assert res.onnx_path == folder / "model.onnx" and res.manifest_path == folder / "manifest.json"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx",
                                                         "model.onnx.data"]
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # staging removed
    g = res.manifest.graph("model")
    assert g.data_files == ["model.onnx.data"]
    assert (g.inputs[0].name, g.inputs[0].dtype) == ("x", "float32")
    assert g.inputs[0].shape == ["batch", 3, 16, 16]
    assert g.inputs[0].example_shape == [2, 3, 16, 16]
    assert (g.outputs[0].name, g.outputs[0].shape, g.outputs[0].example_shape) == (
        "output", ["batch", 10], [2, 10])
    assert g.opset == 20
    assert {"torch", "onnx", "onnxruntime"} <= set(res.manifest.versions)
    assert res.manifest.recipe == {"passes": [], "note": "test"}
    assert res.seconds > 0
    raw = json.loads(res.manifest_path.read_text())
    assert raw["format_version"] == 1 and list(raw["graphs"]) == ["model"]
    for where in (folder, res.onnx_path, res.manifest_path):  # every way of naming the export
        assert load_manifest(where) == res.manifest
    assert _onnx_input_dims(res.onnx_path, "x") == ["batch", 3, 16, 16]


def test_training_flag_and_buffers_unchanged_by_export(cnn_export):
    model, _, state = cnn_export
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # eval export: BN running stats not updated
        assert torch.equal(v, state[k]), k


def test_verify_parity_at_three_other_batch_sizes(cnn_export, tmp_path):
    model, res, _ = cnn_export
    rep = verify(res.onnx_path.parent, model)
    print(rep)
    assert rep.passed
    assert sorted(r.input_shapes["x"][0] for r in rep.rows) == [1, 3, 5]
    assert all(r.input_shapes["x"][1:] == [3, 16, 16] for r in rep.rows)
    for r in rep.rows:
        (o,) = r.outputs
        assert o.name == "output" and o.shape == [r.input_shapes["x"][0], 10]
        assert o.max_abs <= 1e-5 and o.n_bad == 0 and o.max_rel >= 0
        assert r.ort_ms > 0 and r.torch_ms > 0
    assert [(c.tensor, c.dim, c.found) for c in rep.dim_checks if c.kind == "input"] == [
        ("x", 0, "batch")]
    assert 0 < rep.max_abs <= 1e-5  # real numbers: not an accidental zero
    assert all(m.training for m in model.modules())  # verify restored the flags too
    text = str(rep)
    assert "PASSED" in text and "max_abs" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["passed"] is True and len(d["rows"]) == 3
    saved = json.loads(rep.save(tmp_path / "verify.json").read_text())
    assert saved["max_abs"] == pytest.approx(rep.max_abs)


def test_dynamic_spatial_axes_and_dict_outputs(tmp_path):
    model = make_cnn(seed=1, return_dict=True).eval()
    res = to_onnx(model, tmp_path / "hw", torch.randn(2, 3, 16, 16),
                  dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    g = res.manifest.graph()
    assert g.inputs[0].shape == ["batch", 3, "height", "width"]
    assert [o.name for o in g.outputs] == ["logits", "features"]
    assert _onnx_input_dims(res.onnx_path, "x") == ["batch", 3, "height", "width"]
    rep = verify(tmp_path / "hw", model)
    print(rep)
    assert rep.passed and len(rep.rows) == 3
    for r in rep.rows:
        _, _, h, w = r.input_shapes["x"]
        assert h != 16 and w != 16
        assert [o.name for o in r.outputs] == ["logits", "features"]
        assert all(o.max_abs <= 1e-5 for o in r.outputs)


def test_batch1_example_is_tiled_and_batch_stays_symbolic(tmp_path):
    model = make_cnn(seed=2).eval()
    res = to_onnx(model, tmp_path / "net.onnx", torch.randn(1, 3, 16, 16))
    assert res.onnx_path == tmp_path / "net.onnx"
    assert res.manifest_path == tmp_path / "net.manifest.json"
    assert (tmp_path / "net.onnx.data").is_file()
    g = res.manifest.graph()
    assert g.inputs[0].example_shape == [2, 3, 16, 16]
    assert any("tiled to 2" in n for n in g.notes)
    assert res.manifest.exporter["original_example_shapes"]["x"] == [1, 3, 16, 16]
    assert _onnx_input_dims(res.onnx_path, "x")[0] == "batch"
    rep = verify(tmp_path / "net.onnx", model)
    assert rep.passed and 1 in [r.input_shapes["x"][0] for r in rep.rows]
    assert rep.max_abs <= 1e-5


def test_dim_fixed_in_the_onnx_graph_is_named(cnn_export, tmp_path):
    model, res, _ = cnn_export
    edited = tmp_path / "edited"
    shutil.copytree(res.onnx_path.parent, edited)
    proto = onnx.load(str(edited / "model.onnx"), load_external_data=False)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    dim0.dim_value = 2  # hand-edit: batch frozen to the export size
    onnx.save(proto, str(edited / "model.onnx"))
    with pytest.raises(VerificationError) as exc:
        verify(edited, model)
    msg = str(exc.value)
    assert "input 'x' dim 0" in msg and "'batch'" in msg and "fixed to 2" in msg
    assert "dynamic_axes" in msg  # says what to do
    rep = exc.value.report
    assert not rep.passed and [c.found for c in rep.dim_checks if not c.passed] == [2]
    rep2 = verify(edited, model, raise_on_failure=False)
    assert not rep2.passed and "FAILED" in str(rep2)


def test_static_export_checks_export_shape_and_rejects_declared_dynamic(tmp_path):
    model = make_cnn(seed=3).eval()
    res = to_onnx(model, tmp_path / "static", torch.randn(2, 3, 16, 16), dynamic_axes={})
    g = res.manifest.graph()
    assert g.inputs[0].shape == [2, 3, 16, 16] and g.inputs[0].dynamic_dims == {}
    assert _onnx_input_dims(res.onnx_path, "x") == [2, 3, 16, 16]
    rep = verify(tmp_path / "static", model)  # nothing dynamic: only the export shape exists
    assert rep.passed and len(rep.rows) == 1 and "export shape only" in rep.notes[0]
    # Asked to run a batch the graph cannot take: a clear failure naming the shape.
    with pytest.raises(VerificationError, match=r"x=3x3x16x16: onnxruntime failed"):
        verify(tmp_path / "static", model, inputs=[(torch.randn(3, 3, 16, 16),)])
    # A manifest that declares the batch dynamic while the graph fixed it is caught up front.
    mpath = tmp_path / "static" / "manifest.json"
    data = json.loads(mpath.read_text())
    data["graphs"]["model"]["inputs"][0]["shape"][0] = "batch"
    mpath.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match=r"input 'x' dim 0 is declared dynamic \('batch'\)"
                                                r".* fixed to 2"):
        verify(tmp_path / "static", model)


def test_wrong_reference_model_is_caught(cnn_export):
    model, res, _ = cnn_export
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.weight.add_(0.01 * torch.randn_like(other.head.weight))
    with pytest.raises(VerificationError) as exc:
        verify(res.onnx_path.parent, other)
    msg = str(exc.value)
    assert "output 'output'" in msg and "max abs error" in msg and "SNR" in msg      # the criterion's reasons
    assert "elements beyond the element bound" in msg or "dB <" in msg
    assert "x=" in msg  # names the input shape
    rep = exc.value.report
    assert not rep.passed and rep.max_abs > 1e-3
    assert all(not o.passed for r in rep.rows for o in r.outputs)


def test_unwritable_destination_fails_before_export(tmp_path, monkeypatch):
    model = make_cnn().train()

    def must_not_run(*a, **k):
        raise AssertionError("torch.onnx.export ran although the destination is unusable")

    monkeypatch.setattr(torch.onnx, "export", must_not_run)
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    (tmp_path / "dir.onnx").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    for dest in (blocker / "onnx", blocker / "deeper" / "m.onnx", blocker, tmp_path / "dir.onnx"):
        with pytest.raises(ExportError) as exc:
            to_onnx(model, dest, torch.randn(2, 3, 16, 16))
        assert str(dest) in str(exc.value) and "Nothing was exported" in str(exc.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert blocker.read_text() == "a regular file"
    assert model.training


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python branch on a tensor value: not exportable
            return self.lin(x)
        return -self.lin(x)


def test_exporter_failure_is_wrapped_and_leaves_nothing(tmp_path):
    model = DataDependent().train()
    with pytest.raises(ExportError) as exc:
        to_onnx(model, tmp_path / "a" / "b", torch.randn(2, 4))
    msg = str(exc.value)
    assert "DataDependent" in msg and "torch.export could not capture" in msg
    assert "torch.where" in msg  # what to try
    assert len(msg) < 2500
    assert exc.value.__cause__ is not None  # the exporter's own error is chained
    assert list(tmp_path.iterdir()) == []  # created parents and staging removed
    assert model.training


class SpecialisesBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("offset", torch.randn(2, 4))  # only broadcasts at batch 2

    def forward(self, x):
        return self.lin(x) + self.offset


def test_dynamic_dim_specialised_by_the_model_is_refused(tmp_path):
    # torch.onnx.export itself silently "refines" the dynamic batch to 2 here (it applies
    # torch.export's suggested fix) and writes a fixed-shape graph; to_onnx must refuse it.
    model = SpecialisesBatch().eval()
    with pytest.raises(ExportError, match=r"input 'x' dim 0 \('batch'\) is fixed to 2") as exc:
        to_onnx(model, tmp_path / "spec", torch.randn(2, 4))
    assert "batch = 2" in str(exc.value)  # torch.export's own diagnosis is quoted
    assert list(tmp_path.iterdir()) == []


class _Spectrum(nn.Module):
    def forward(self, x):
        return torch.linalg.eigh(x @ x.transpose(-1, -2)).eigenvalues   # no ONNX translation


class _WithSpectrum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.spec = nn.Linear(4, 4), _Spectrum()

    def forward(self, x):
        return self.spec(self.lin(x))


def test_op_without_onnx_translation_names_the_op_and_the_module(tmp_path):
    with pytest.raises(ExportError) as exc:
        to_onnx(_WithSpectrum().eval(), tmp_path / "out", torch.randn(2, 3, 4))
    msg = str(exc.value)
    assert "linalg_eigh" in msg and "module 'spec'" in msg and "_Spectrum" in msg, msg
    assert "custom_translation_table" in msg and "test_onnx_export.py" in msg   # the calling source line
    assert list(tmp_path.iterdir()) == []
