"""Private-inference cost model: ReLUs, polynomial units, MACs → estimated 2PC time, traffic, storage.

Per inference (batch 1), per site and in total::

    online  ≈ N_relu·t_relu + N_poly·t_mul + N_MAC·t_mac_online
    offline ≈ N_relu·t_garble + N_MAC·t_mac_offline
    traffic (online)  ≈ N_relu·b_relu + N_poly·b_mul
    client storage    ≈ N_relu·s_gc

Counting convention (``surgeon.ops.activation``): a site's ReLUs are the elements per example whose
nonlinearity is evaluated (ReLU6 counts as one); polynomial elements (``c₂x² + c₁x + c₀``) count
one secure multiplication each; identity elements cost nothing. MACs are those of convolutions,
linear layers and matrix products (``surgeon.costs.macs``).

Presets: ``"delphi"`` uses DELPHI's measured constants (ResNet18/CIFAR-10, server garbler:
18.3 µs online GC evaluation, 1,184 B online traffic, 30.5 µs offline garbling and 17.1 KB of
client GC storage per ReLU; 0.43 s of online linear layers over 557,056 ReLUs' network, which we
spread over its ~0.56 GMACs). ``"delphi-atom"`` is the single-thread Intel Atom client (345 µs
online per ReLU). Other protocols (CrypTFlow2, Cheetah): pass your own :class:`Protocol`.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    >>> r = private_costs(net, torch.randn(2, 3, 8, 8))
    >>> r.totals["relus"], r.totals["macs"]
    (512, 13824)
    >>> round(r.summary["online_ms"], 3)
    9.38
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.costs.macs import activation_sites, graph_macs
from surgeon.core.errors import ConfigError
from surgeon.fx.tracing import propagate_shapes, trace

from surgeon.core.report import Report


@dataclass(frozen=True)
class Protocol:
    """Per-operation costs of a 2PC protocol (seconds, bytes)."""

    name: str
    t_relu: float            # online seconds per ReLU
    b_relu: float            # online bytes per ReLU
    t_garble: float          # offline seconds per ReLU
    s_gc: float              # client storage bytes per ReLU
    t_mul: float             # online seconds per secure multiplication (polynomial element)
    b_mul: float             # online bytes per secure multiplication
    t_mac_online: float      # online seconds per MAC of linear layers
    t_mac_offline: float     # offline seconds per MAC of linear layers (HE)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# DELPHI ResNet18/CIFAR-10: 557,056 ReLUs, ≈ 0.56 GMACs; online linear 0.43 s, offline HE 286 s (1 thread).
_R18_MACS = 5.57e8
PRESETS: dict[str, Protocol] = {
    "delphi": Protocol("delphi", t_relu=18.3e-6, b_relu=1184.0, t_garble=30.5e-6, s_gc=17.1e3,
                       t_mul=0.5e-6, b_mul=16.0, t_mac_online=0.43 / _R18_MACS, t_mac_offline=286.0 / _R18_MACS),
    "delphi-atom": Protocol("delphi-atom", t_relu=345e-6, b_relu=1184.0, t_garble=681e-6, s_gc=17.1e3,
                            t_mul=0.5e-6, b_mul=16.0, t_mac_online=0.43 / _R18_MACS,
                            t_mac_offline=286.0 / _R18_MACS),
}


def _protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PRESETS[protocol]
    except KeyError:
        raise ConfigError(f"unknown protocol {protocol!r}; presets are {sorted(PRESETS)} or pass a Protocol(...)") from None


def private_costs(model: nn.Module, example_inputs: Any, protocol: str | Protocol = "delphi") -> Report:
    """Per-site and total private-inference costs of ``model`` (per example) under ``protocol``."""
    p = _protocol(protocol)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    propagate_shapes(gm, inputs)
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    rows = []
    macs = graph_macs(gm)
    for node, shape, unit in activation_sites(gm):
        per_example = math.prod(shape[1:])
        if unit is not None:
            relus = unit.relu_count(shape) if hasattr(unit, "relu_count") else 0
            poly = unit.poly_count(shape) if hasattr(unit, "poly_count") else 0
            name = getattr(unit, "site_name", node.name)
        else:
            relus, poly, name = per_example, 0, node.name
        rows.append({"site": name, "elements": per_example, "relus": relus, "poly": poly,
                     "density": relus / per_example if per_example else 0.0})
    macs //= max(batch, 1)
    for r in rows:
        r["online_ms"] = 1e3 * (r["relus"] * p.t_relu + r["poly"] * p.t_mul)
        r["offline_ms"] = 1e3 * r["relus"] * p.t_garble
        r["comm_MB"] = (r["relus"] * p.b_relu + r["poly"] * p.b_mul) / 1e6
        r["storage_MB"] = r["relus"] * p.s_gc / 1e6
    relus = sum(r["relus"] for r in rows)
    poly = sum(r["poly"] for r in rows)
    online = relus * p.t_relu + poly * p.t_mul + macs * p.t_mac_online
    offline = relus * p.t_garble + macs * p.t_mac_offline
    comm = relus * p.b_relu + poly * p.b_mul
    totals = {"elements": sum(r["elements"] for r in rows), "relus": relus, "poly": poly, "macs": macs,
              "online_ms": 1e3 * (relus * p.t_relu + poly * p.t_mul), "offline_ms": 1e3 * relus * p.t_garble,
              "comm_MB": comm / 1e6, "storage_MB": relus * p.s_gc / 1e6}
    summary = {"protocol": p.name, "relus": relus, "poly_units": poly, "he_depth_poly": sum(1 for r in rows if r["poly"]),
               "macs": macs, "online_ms": 1e3 * online, "offline_ms": 1e3 * offline,
               "online_linear_ms": 1e3 * macs * p.t_mac_online, "comm_MB": comm / 1e6,
               "client_storage_MB": relus * p.s_gc / 1e6}
    return Report(f"private inference costs ({p.name}, per example)",
                  ["site", "elements", "relus", "poly", "density", "online_ms", "offline_ms", "comm_MB", "storage_MB"],
                  rows, totals, summary,
                  notes=["relus: elements whose ReLU/ReLU6 is evaluated (garbled circuit); poly: elements through a "
                         "degree-2 unit (one secure multiplication each); site rows exclude linear layers, "
                         "summary online/offline include MACs"])
