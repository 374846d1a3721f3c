"""surgeon.export: ONNX export with a manifest, and onnxruntime verification.

Example:
    >>> import torch, surgeon.export
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> res = surgeon.export.to_onnx(net, "/tmp/doc_pkg", torch.randn(2, 4))
    >>> surgeon.export.verify(res.onnx_path.parent, net).passed
    True
"""
from surgeon.export.causal_lm import export_causal_lm
from surgeon.export.criterion import DEFAULT_CRITERION, Criterion
from surgeon.export.divergence import DivergenceReport, locate_divergence, weight_mismatches
from surgeon.export.generator import OnnxGenerator
from surgeon.export.genai import to_genai
from surgeon.export.hf_folder import to_hf
from surgeon.export.manifest import GraphSpec, Manifest, TensorSpec, load_manifest
from surgeon.export.onnx_export import ExportResult, flatten_outputs, to_onnx
from surgeon.export.ort_optimize import OptimizeReport, optimize
from surgeon.export.verify import VerifyReport, verify
from surgeon.export.verify_lm import LMVerifyReport, verify_causal_lm
from surgeon.export.weights import WeightUpdate, update_weights
from surgeon.export.background import BackgroundExport

__all__ = [
    "to_onnx", "verify", "export_causal_lm", "OnnxGenerator", "verify_causal_lm", "LMVerifyReport", "ExportResult", "VerifyReport", "load_manifest",
    "Manifest", "GraphSpec", "TensorSpec", "flatten_outputs", "optimize", "OptimizeReport",
    "locate_divergence", "DivergenceReport", "weight_mismatches", "Criterion", "DEFAULT_CRITERION",
    "to_hf", "to_genai", "update_weights", "WeightUpdate", "BackgroundExport",
]
