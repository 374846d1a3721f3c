"""Private (2PC) inference costs of a decoder transformer per generated token: softmax vs linearized attention.

Counts, per token and per layer, the operations a 2PC protocol must run on secret-shared values, for a
token decoded with ``context`` tokens in the cache (itself included):

* nonlinear: ``exp`` and ``reciprocal`` (softmax), ``compare`` (the softmax max, ReLU, ELU), ``rsqrt``
  (RMSNorm / LayerNorm), ``sigmoid`` (SiLU = x·σ(x); GELU is costed as x·σ(1.702x)), ``log`` (gates);
* ``mul``: elementwise products of two secret values (softmax numerator × 1/denominator, SwiGLU's
  gate × up, norms' x × rsqrt, the polynomial terms of φ);
* ``macs_secret``: multiply-accumulates between two secret operands (q·Kᵀ, attention × V, the linear
  state's φ(k)vᵀ update and φ(q)·S readout); ``macs_weights``: activation × server weight (projections, MLP).

Costs come from the protocol's own algorithms. Preset ``"crypten"``: CrypTen (Knott et al., NeurIPS'21),
the 2PC backend of MPCFormer (ICLR'23), read from its code (facebookresearch/CrypTen @775868a,
``configs/default.yaml`` and ``crypten/common/functions/approximations.py``): 64-bit ring, Beaver
triples from a trusted dealer (offline), local truncation for two parties. Online, both parties together:
a product opens two masked ring elements per party (32 B, 1 round), a square one (16 B, 1 round);
``exp`` = 8 squarings of (1 + x/256); ``reciprocal`` = exp-based start + 10 Newton steps (square + mul);
``rsqrt`` = exp-based start + 3 Newton steps (square + 2 mul); a comparison = arithmetic→binary
conversion (a 64-bit parallel-prefix adder: 13 word ANDs over 7 rounds, 32 B each) + 1-bit binary→arithmetic
(16 B, 1 round); ``sigmoid`` = comparison + sign product + exp (9 squarings) + 3 Newton steps + select;
``max`` over n keys = n − 1 comparisons + selects in ⌈log₂ n⌉ levels; secret×secret matmul A·B opens
|A| + |B| elements (16 B each). Products with server weights (HE or weight-sharing in other protocols)
are reported as ``macs_weights`` and not converted to bytes here. Time = bytes / bandwidth + rounds · RTT
with ``bandwidth`` and ``rtt`` of the network you give (default LAN: 1 GB/s, 0.5 ms; assumptions, not measured).

Example:
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2, vocab_size=100)
    >>> r = transformer_private_costs(cfg, context=512)
    >>> r.summary["exp_per_token_per_layer"]   # heads × context: one exp per query head and key
    2048
    >>> lin = transformer_private_costs(cfg, context=512, attention={"window": 64, "sinks": 4, "feature_map": "elu1"})
    >>> lin.summary["comm_MB_per_token"] < r.summary["comm_MB_per_token"]
    True
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from surgeon.core.errors import ConfigError
from surgeon.core.report import Report

# decoder families whose block shape we know: (norm, mlp activation, gated mlp)
_FAMILIES: dict[str, tuple[str, str, bool]] = {
    "llama": ("rmsnorm", "silu", True), "mistral": ("rmsnorm", "silu", True), "qwen2": ("rmsnorm", "silu", True),
    "qwen3": ("rmsnorm", "silu", True), "gemma": ("rmsnorm", "gelu", True), "phi3": ("rmsnorm", "silu", True),
    "gpt2": ("layernorm", "gelu", False), "gpt_neox": ("layernorm", "gelu", False), "opt": ("layernorm", "relu", False),
}
_FEATURE_MAPS = ("elu1", "relu", "hedgehog", "taylor2")
_GATES = ("none", "liger", "learned")


@dataclass(frozen=True)
class MPCProtocol:
    """Online per-element costs of a 2PC protocol built from products, squares and comparisons.

    Bytes count both parties' messages. Defaults are CrypTen's (see the module docstring).
    """

    name: str = "crypten"
    bytes_mul: float = 32.0          # Beaver product: each party opens x−a and y−b (8 B each)
    bytes_square: float = 16.0       # Beaver square: each party opens x−r
    bytes_open: float = 16.0         # one opened element (both parties), used by secret×secret matmuls
    bytes_and: float = 32.0          # one 64-bit word AND (binary Beaver triple)
    ands_a2b: int = 13               # word ANDs of the 64-bit parallel-prefix adder (1 + 2·log₂ 64)
    rounds_a2b: int = 7              # its rounds (1 + log₂ 64)
    bytes_b2a_bit: float = 16.0      # 1-bit binary→arithmetic: open x ⊕ r
    exp_squarings: int = 8           # exp(x) = (1 + x/2^8)^(2^8)
    sigmoid_exp_squarings: int = 9   # CrypTen's sigmoid overrides exp to 9 iterations
    reciprocal_newton: int = 10
    sigmoid_newton: int = 3          # sigmoid's reciprocal: 3 Newton steps from 0.75 (no exp start)
    rsqrt_newton: int = 3
    log_iterations: int = 2          # Householder iterations of log (each: exp + mul + order-8 polynomial)
    log_order: int = 8
    bandwidth: float = 1e9           # bytes / s (network assumption)
    rtt: float = 5e-4                # seconds per round (network assumption)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ per-element (bytes, rounds)
    def mul(self) -> tuple[float, int]:
        return self.bytes_mul, 1

    def compare(self) -> tuple[float, int]:
        """x < 0 as a shared bit: A2B adder + 1-bit B2A."""
        return self.ands_a2b * self.bytes_and + self.bytes_b2a_bit, self.rounds_a2b + 1

    def exp(self) -> tuple[float, int]:
        return self.exp_squarings * self.bytes_square, self.exp_squarings

    def reciprocal(self) -> tuple[float, int]:
        b, r = self.exp()
        return b + self.reciprocal_newton * (self.bytes_square + self.bytes_mul), r + 2 * self.reciprocal_newton

    def rsqrt(self) -> tuple[float, int]:
        b, r = self.exp()
        return b + self.rsqrt_newton * (self.bytes_square + 2 * self.bytes_mul), r + 3 * self.rsqrt_newton

    def sigmoid(self) -> tuple[float, int]:
        cb, cr = self.compare()
        b = (cb + self.bytes_mul + self.sigmoid_exp_squarings * self.bytes_square
             + self.sigmoid_newton * (self.bytes_square + self.bytes_mul) + 2 * self.bytes_mul)
        return b, cr + 1 + self.sigmoid_exp_squarings + 2 * self.sigmoid_newton + 1

    def log(self) -> tuple[float, int]:
        eb, er = self.exp()
        step = eb + self.bytes_mul + (self.log_order - 1) * self.bytes_mul
        return eb + self.log_iterations * step, er + self.log_iterations * (er + 1 + (self.log_order - 1))


PRESETS: dict[str, MPCProtocol] = {"crypten": MPCProtocol()}
_NONLINEAR = ("exp", "reciprocal", "compare", "rsqrt", "sigmoid", "log")


@dataclass
class _Counts:
    exp: int = 0
    reciprocal: int = 0
    compare: int = 0
    rsqrt: int = 0
    sigmoid: int = 0
    log: int = 0
    mul: int = 0
    macs_secret: int = 0
    macs_weights: int = 0
    opened: int = 0           # elements opened by secret×secret matmuls
    rounds: int = 0           # sequential rounds of this layer (critical path, see _rounds)
    extra: dict[str, int] = field(default_factory=dict)

    def add(self, other: "_Counts") -> None:
        for k in ("exp", "reciprocal", "compare", "rsqrt", "sigmoid", "log", "mul", "macs_secret", "macs_weights",
                  "opened", "rounds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _shape(config: Any) -> dict[str, Any]:
    """Dimensions of a Hugging Face decoder config (or a model carrying ``.config``)."""
    config = getattr(config, "config", config)
    mt = getattr(config, "model_type", None)
    if mt not in _FAMILIES:
        raise ConfigError(f"transformer_private_costs: model_type {mt!r} is not a known decoder family; known: "
                          f"{sorted(_FAMILIES)}. Pass the config of a supported model (or add its family to "
                          "surgeon.costs.transformer_private._FAMILIES)")
    norm, act, gated = _FAMILIES[mt]
    act = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "swish": "silu"}.get(
        getattr(config, "hidden_act", None) or getattr(config, "activation_function", None) or act, act)
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not (d and heads and layers):
        raise ConfigError(f"transformer_private_costs: config of {mt!r} lacks hidden_size / num_attention_heads / "
                          "num_hidden_layers")
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    return {"model_type": mt, "hidden": d, "heads": heads, "kv_heads": kv, "head_dim": hd, "intermediate": inter,
            "layers": layers, "vocab": getattr(config, "vocab_size", 0), "norm": norm, "act": act, "gated": gated}


def _attention_cfg(attention: Any) -> dict[str, Any] | None:
    """Normalize a ``LinearizeAttention`` (or dict of its fields) into what the model needs; None = softmax."""
    if attention is None:
        return None
    get = attention.get if isinstance(attention, dict) else (lambda k, d=None: getattr(attention, k, d))
    a = {"window": get("window", 64), "sinks": get("sinks", 4), "memory": get("memory", 0),
         "feature_map": get("feature_map", "hedgehog"), "feature_dim": get("feature_dim", None),
         "gate": get("gate", "none"), "layers": get("layers", None), "local": get("local", False)}
    if a["feature_map"] not in _FEATURE_MAPS:
        raise ConfigError(f"transformer_private_costs: feature_map {a['feature_map']!r} is not one of {_FEATURE_MAPS}")
    if a["gate"] not in _GATES:
        raise ConfigError(f"transformer_private_costs: gate {a['gate']!r} is not one of {_GATES}")
    if a["local"]:
        raise ConfigError("transformer_private_costs: local (bidirectional) attention has no decode step; "
                          "the per-token model covers causal attention only")
    for k in ("window", "sinks"):
        if isinstance(a[k], bool) or not isinstance(a[k], int) or a[k] < 0:
            raise ConfigError(f"transformer_private_costs: attention {k} must be an int >= 0, got {a[k]!r}")
    return a


def _norm(d: int, kind: str) -> _Counts:
    # x² (squares count as mul here, costed as squares in _cost), one rsqrt, x·rsqrt; LayerNorm's mean is local
    return _Counts(rsqrt=1, mul=d, extra={"squares": d})


def _softmax_part(heads: int, keys: int, hd: int) -> _Counts:
    """Exact softmax of ``heads`` query rows over ``keys`` keys, with q·Kᵀ and attention × V."""
    c = _Counts(exp=heads * keys, reciprocal=heads, compare=heads * max(keys - 1, 0), mul=heads * keys,
                macs_secret=2 * heads * keys * hd, opened=heads * 2 * (hd + keys * hd))
    c.extra["select_mul"] = 2 * heads * max(keys - 1, 0)       # max's selects (2 products each)
    c.extra["max_levels"] = math.ceil(math.log2(keys)) if keys > 1 else 0
    return c


def _feature_map(kind: str, rows: int, hd: int, fdim: int | None) -> tuple[_Counts, int]:
    """Cost of φ on ``rows`` vectors of size hd, and the feature count F."""
    if kind == "elu1":   # 1 + elu(x) = x+1 if x>0 else exp(x): compare, exp, select
        return _Counts(compare=rows * hd, exp=rows * hd, extra={"select_mul": 2 * rows * hd}), hd
    if kind == "relu":
        return _Counts(compare=rows * hd, mul=rows * hd), hd
    if kind == "hedgehog":  # [softmax(xW), softmax(−xW)]: projection by a server weight, two softmaxes of f
        f = fdim or hd
        c = _Counts(exp=rows * 2 * f, reciprocal=rows * 2, compare=rows * 2 * (f - 1), mul=rows * 2 * f,
                    macs_weights=rows * hd * f, extra={"select_mul": 2 * rows * 2 * (f - 1)})
        return c, 2 * f
    f = 1 + hd + hd * (hd + 1) // 2   # taylor2: the pairwise products
    return _Counts(mul=rows * hd * (hd + 1) // 2), f


def _linear_part(heads: int, kv: int, hd: int, a: dict[str, Any]) -> _Counts:
    """Linear branch per token: φ(q), φ(k), state update φ(k)vᵀ, readout φ(q)·S and φ(q)·z, optional gate."""
    cq, f = _feature_map(a["feature_map"], heads, hd, a["feature_dim"])
    ck, _ = _feature_map(a["feature_map"], kv, hd, a["feature_dim"])
    c = _Counts()
    c.add(cq)
    c.add(ck)
    for src in (cq, ck):
        for k, v in src.extra.items():
            c.extra[k] = c.extra.get(k, 0) + v
    # update S (F×hd per kv head) += φ(k) vᵀ: outer product opens F + hd; readout φ(q)·[S | z] opens F + F·(hd+1)
    c.macs_secret += kv * f * hd + heads * f * (hd + 1)
    c.opened += kv * (f + hd) + heads * (f + f * (hd + 1))
    if a["gate"] != "none":  # per kv head decay α (σ and log of the key, exp back), S ← α·S
        c.sigmoid += kv * hd
        c.log += kv
        c.exp += kv
        c.mul += kv * f * (hd + 1)
    c.extra["features"] = f
    return c


def _layer(s: dict[str, Any], context: int, a: dict[str, Any] | None) -> _Counts:
    d, h, kv, hd, inter = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"]
    c = _Counts(macs_weights=d * h * hd + 2 * d * kv * hd + h * hd * d + (3 if s["gated"] else 2) * d * inter)
    extra: dict[str, int] = {}
    for part in (_norm(d, s["norm"]), _norm(d, s["norm"])):
        c.add(part)
        extra["squares"] = extra.get("squares", 0) + part.extra["squares"]
    if a is None:
        att = _softmax_part(h, context, hd)
    else:
        beyond = max(context - a["window"], 0)
        sinks = min(a["sinks"], beyond)
        mem = min(a["memory"] if isinstance(a["memory"], int) else max(a["memory"]), beyond - sinks)
        keys = min(context, a["window"]) + sinks + mem
        att = _softmax_part(h, keys, hd) if keys else _Counts(reciprocal=h)
        if beyond or a["window"] == 0:
            lin = _linear_part(h, kv, hd, a)
            att.add(lin)
            for k, v in lin.extra.items():
                att.extra[k] = att.extra.get(k, 0) + v
            att.mul += h * (hd + 1) if keys else 0    # the shared normaliser rescales the linear terms
        att.extra["softmax_keys"] = keys
    c.add(att)
    for k, v in att.extra.items():
        extra[k] = extra.get(k, 0) + v
    if s["act"] == "relu":
        c.compare += inter
        c.mul += inter
    else:
        c.sigmoid += inter
        c.mul += inter            # x·σ(x)
    if s["gated"]:
        c.mul += inter            # gate × up
    c.extra = extra
    return c


def _cost(c: _Counts, p: MPCProtocol) -> tuple[float, int]:
    """Online bytes and critical-path rounds of one layer."""
    squares = c.extra.get("squares", 0)
    sel = c.extra.get("select_mul", 0)
    b = (c.exp * p.exp()[0] + c.reciprocal * p.reciprocal()[0] + c.compare * p.compare()[0]
         + c.rsqrt * p.rsqrt()[0] + c.sigmoid * p.sigmoid()[0] + c.log * p.log()[0]
         + (c.mul + sel) * p.bytes_mul + squares * p.bytes_square + c.opened * p.bytes_open)
    levels = c.extra.get("max_levels", 0)
    rounds = (2 * (1 + p.rsqrt()[1] + 1)                                   # two norms
              + 1                                                          # q·Kᵀ / φ products
              + (levels * (p.compare()[1] + 1) if c.compare else 0)        # softmax max
              + (p.exp()[1] if c.exp else 0) + (p.reciprocal()[1] if c.reciprocal else 0) + 1 + 1
              + (p.log()[1] + p.exp()[1] if c.log else 0)
              + (p.sigmoid()[1] + 1 if c.sigmoid else p.compare()[1] + 1) + 1)
    return b, rounds


def transformer_private_costs(config: Any, context: int, attention: Any = None,
                              protocol: str | MPCProtocol = "crypten") -> Report:
    """Online 2PC cost of decoding one token with ``context`` tokens cached, per layer and in total.

    Args:
        config: a Hugging Face decoder config (Llama/Mistral/Qwen2/GPT-2 families) or a model with ``.config``.
        context: tokens the new token attends to (itself included), ≥ 1.
        attention: None for the original softmax model, or the attention pass config
            (``LinearizeAttention`` or a dict of its fields: window, sinks, memory, feature_map, feature_dim,
            gate, layers) for the linearized one; layers it does not list keep softmax.
        protocol: ``"crypten"`` or an :class:`MPCProtocol`.

    Returns:
        A :class:`~surgeon.core.report.Report` with one row per layer (operation counts, MB, rounds) and a
        summary: per-token totals (``comm_MB_per_token``, ``rounds_per_token``, ``time_s_per_token``) and
        ``*_per_token_per_layer`` counts of the first layer.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ConfigError(f"transformer_private_costs: context must be an int >= 1, got {context!r}")
    if isinstance(protocol, str):
        if protocol not in PRESETS:
            raise ConfigError(f"unknown protocol {protocol!r}; presets are {sorted(PRESETS)} or pass an MPCProtocol")
        protocol = PRESETS[protocol]
    s = _shape(config)
    a = _attention_cfg(attention)
    converted = set(range(s["layers"])) if a is None or a["layers"] is None else set(a["layers"])
    if a is not None and not converted <= set(range(s["layers"])):
        raise ConfigError(f"transformer_private_costs: attention layers {sorted(converted)} exceed the model's "
                          f"{s['layers']} layers")
    rows, total, comm, rounds = [], _Counts(), 0.0, 0
    for i in range(s["layers"]):
        c = _layer(s, context, a if (a is not None and i in converted) else None)
        b, r = _cost(c, protocol)
        comm, rounds = comm + b, rounds + r
        total.add(c)
        rows.append({"layer": i, "attention": "softmax" if a is None or i not in converted else "linearized",
                     "softmax_keys": c.extra.get("softmax_keys", context) if a is not None and i in converted
                     else context, **{k: getattr(c, k) for k in (*_NONLINEAR, "mul", "macs_secret", "macs_weights")},
                     "comm_MB": b / 1e6, "rounds": r})
    head = _norm(s["hidden"], s["norm"])   # final norm; lm_head is a weight product
    hb = head.rsqrt * protocol.rsqrt()[0] + head.mul * protocol.bytes_mul + head.extra["squares"] * protocol.bytes_square
    comm += hb
    rounds += protocol.rsqrt()[1] + 2
    total.rsqrt += 1
    total.mul += s["hidden"]
    total.macs_weights += s["hidden"] * s["vocab"]
    first = rows[0]
    summary = {"protocol": protocol.name, "model_type": s["model_type"], "context": context,
               "attention": "softmax" if a is None else f"linearized ({a['feature_map']}, window {a['window']}, "
                                                         f"sinks {a['sinks']}, memory {a['memory']}, gate {a['gate']})",
               "layers": s["layers"], "converted_layers": 0 if a is None else len(converted),
               **{f"{k}_per_token_per_layer": first[k] for k in (*_NONLINEAR, "mul", "macs_secret")},
               **{f"{k}_per_token": getattr(total, k) for k in (*_NONLINEAR, "mul", "macs_secret", "macs_weights")},
               "comm_MB_per_token": comm / 1e6, "rounds_per_token": rounds,
               "time_s_per_token": comm / protocol.bandwidth + rounds * protocol.rtt,
               "network": {"bandwidth_B_per_s": protocol.bandwidth, "rtt_s": protocol.rtt}}
    totals = {k: sum(r[k] for r in rows) for k in (*_NONLINEAR, "mul", "macs_secret", "macs_weights", "comm_MB",
                                                    "rounds")}
    return Report(f"private inference per decoded token ({protocol.name}, context {context}, {summary['attention']})",
                  ["layer", "attention", "softmax_keys", *_NONLINEAR, "mul", "macs_secret", "macs_weights", "comm_MB",
                   "rounds"], rows, totals, summary,
                  notes=["online costs of one token decoded with `context` cached tokens; activation × weight products "
                         "(macs_weights) are counted, not converted to bytes (HE or weight-sharing dependent); "
                         "time = bytes / bandwidth + rounds · RTT on the assumed network",
                         "constants: CrypTen (Knott et al., NeurIPS'21; MPCFormer's 2PC backend), read from its code "
                         "@775868a: exp 8 squarings, reciprocal 10 Newton steps, rsqrt 3, 64-bit A2B adder 13 ANDs"])


def _saved_config(directory: Any, source: dict[str, Any] | None) -> Any:
    """The HF config of a saved surgery's base model: ``config.json`` beside it, or the built-in model's cache."""
    from pathlib import Path

    from transformers import AutoConfig

    candidates = [Path(directory)]
    if (source or {}).get("model") == "smollm2":
        from surgeon.models.smollm2 import cache_dir  # noqa: PLC0415 - only for the built-in model

        candidates.append(cache_dir())
    for folder in candidates:
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder)
    return None


def attention_costs_for_surgery(directory: Any, contexts: tuple[int, ...] = (256, 1024, 4096)) -> Report | None:
    """``surgeon report`` section: per-token 2PC cost, original vs linearized, for a saved attention surgery.

    None when the surgery has no ``LinearizeAttention`` pass or its base model's config cannot be found.
    """
    from surgeon.core.persist import load_recipe  # noqa: PLC0415 - keeps this module importable alone

    recipe = load_recipe(directory)
    passes = [e.config for e in recipe.entries if e.pass_name == "LinearizeAttention"]
    if not passes:
        return None
    config = _saved_config(directory, recipe.source)
    if config is None:
        return None
    rows = []
    for n in contexts:
        orig = transformer_private_costs(config, n).summary
        lin = transformer_private_costs(config, n, attention=passes[-1]).summary
        rows.append({"context": n, "original_MB": orig["comm_MB_per_token"], "linearized_MB": lin["comm_MB_per_token"],
                     "original_exp": orig["exp_per_token"], "linearized_exp": lin["exp_per_token"],
                     "original_s": orig["time_s_per_token"], "linearized_s": lin["time_s_per_token"],
                     "ratio": orig["comm_MB_per_token"] / lin["comm_MB_per_token"]})
    return Report("private inference per decoded token (2PC, CrypTen constants): original vs linearized",
                  ["context", "original_MB", "linearized_MB", "ratio", "original_exp", "linearized_exp",
                   "original_s", "linearized_s"], rows,
                  notes=["surgeon.costs.transformer_private: online bytes and rounds of CrypTen's algorithms; "
                         "time assumes 1 GB/s and 0.5 ms per round"])
