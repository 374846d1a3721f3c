"""Graph passes on the ``torch.export`` program, before ONNX conversion.

``to_onnx(model, dir, x, passes=[...])`` exports ``model`` with ``torch.export`` (same dynamic
shapes as the ONNX export), applies the passes to the program's graph (ATen ops; see
``surgeon.fx.patterns``) with ``surgeon.apply``, and converts the rewritten graph. The rewritten
module is returned in ``ExportResult.surgery.model``: it is the reference for ``surgeon.export.verify``.

Example:
    >>> import torch, torch.nn as nn
    >>> from surgeon.passes import LinearizeReLU
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    >>> s = export_program_passes(net, (torch.randn(2, 4),), None, [LinearizeReLU(granularity="layer", init=0.0)])
    >>> [r["site"] for r in s.report["LinearizeReLU"].rows]
    ['1']
    >>> x = torch.randn(2, 4); torch.allclose(s.model(x), net[2](net[0](x)))   # static shapes: batch 2
    True
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from surgeon.fx import patterns as graph_patterns
from surgeon.core.apply import Surgery, apply
from surgeon.core.config import PassConfig
from surgeon.core.errors import ExportError, SurgeonError


def export_program_passes(model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_shapes: Any,
                          passes: Sequence[PassConfig], decompose: bool = False) -> Surgery:
    """``torch.export`` ``model``, apply ``passes`` to the program's graph module, return the surgery.

    ``decompose=True`` runs ``run_decompositions()`` first (core ATen ops). ``model`` is not changed.
    """
    from surgeon.export.onnx_export import quiet_exporter

    try:
        with quiet_exporter():
            ep = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
            if decompose:
                ep = ep.run_decompositions()
    except Exception as e:
        raise ExportError(f"torch.export failed on {type(model).__name__} before the graph passes: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    gm = ep.module()
    gm.meta[graph_patterns.SOURCE_MODEL_META] = model   # passes may read units' attributes (FinalizeReLU)
    try:
        return apply(gm, *passes, example_inputs=inputs, inplace=True)
    except SurgeonError as e:
        raise type(e)(f"graph passes on the torch.export program of {type(model).__name__}: {e}") from e
