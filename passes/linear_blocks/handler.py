"""``ReplaceLinearBlocks``: measure how linear each transformer block is; replace the most linear ones.

**Measurement** ("Your Transformer is Secretly Linear", Razzhigaev et al. 2024): for block ``l`` with
input ``h_l`` and output ``h_{l+1}`` over calibration tokens, the R² of the best affine map
``h_l → h_{l+1}`` (with the residual) and ``h_l → h_{l+1} − h_l`` (the block's own update, without
the residual). Normal equations are accumulated in float64 and solved with a small ridge.

**Replacement** (ReplaceMe, Shopkhoev et al. 2025): a span of blocks ``[s, e)`` is removed and a
linear map ``T`` is folded into the output projection of block ``s−1`` (``mlp.down_proj``):
with ``u = `` that projection's output, the fit is ``h_e ≈ (h_s − u) + u T`` (least squares in
float64 over calibration tokens), and ``W ← Tᵀ W`` (bias ``b ← Tᵀ b``). No parameters are added; the
removed blocks become :class:`SkippedBlock` (identity, keeps layer indices and the KV cache layout).

Example:
    >>> import torch, surgeon, transformers
    >>> from surgeon.passes import ReplaceLinearBlocks
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> _ = torch.manual_seed(0); lm = transformers.LlamaForCausalLM(cfg).eval()
    >>> data = [torch.randint(0, 64, (4, 16)) for _ in range(4)]
    >>> s = surgeon.apply(lm, ReplaceLinearBlocks(k=1, calibration=data))
    >>> sum(r["replaced"] for r in s.report["ReplaceLinearBlocks"].rows)
    1
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from surgeon.core.config import PassConfig
from surgeon.core.errors import ConfigError, PlanError
from surgeon.core.modules import get_submodule, set_submodule
from surgeon.fx.tracing import SurgeonUnit
from surgeon.core.handler import PassContext, PassHandler, choose_sites, register_pass
from surgeon.passes.linearizer.config import Calibration
from surgeon.passes.linearizer.fit import iter_calibration, ridge_solve
from surgeon.core.report import Report
from surgeon.core.sites import Plan, Site

_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "encoder.layer",
                "bert.encoder.layer", "layers", "blocks", "h")
_OUT_PROJ = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "output.dense", "feed_forward.w2",
             "mlp.out_proj", "ffn.out_proj")


class SkippedBlock(SurgeonUnit):
    """A removed block: returns its hidden-state input unchanged (other arguments are ignored)."""

    def __init__(self, index: int | None = None) -> None:
        super().__init__()
        self.index = index

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"index={self.index}"


@dataclass(kw_only=True)
class ReplaceLinearBlocks(PassConfig):
    """Replace the ``k`` most linear blocks by a linear map folded into the previous block's output projection.

    Args:
        k: how many blocks to replace (ignored when ``blocks`` is given).
        blocks: explicit block indices to replace (contiguous indices form one span, one fold).
        score: rank blocks by R² with the residual (``r2``) or without it (``r2_no_residual``).
        ridge: ridge λ relative to the mean eigenvalue of the normal matrix (float64).
        layers: dotted path of the block list (auto: ``model.layers``, ``transformer.h``, ...).
        out_proj: path of the output projection inside a block (auto: ``mlp.down_proj``, ``mlp.c_proj``, ...).
        calibration: token-id batches (``(batch, seq)`` tensors, or dicts of model kwargs); runtime-only.
        plot: write a PNG of per-block linearity here (optional).
    """

    k: int = 1
    blocks: list[int] | None = None
    score: Literal["r2", "r2_no_residual"] = "r2"
    ridge: float = 1e-6
    layers: str | None = None
    out_proj: str | None = None
    max_condition: float = 1e12
    calibration: Calibration = None
    plot: str | None = None

    def check(self) -> None:
        if self.k < 1:
            raise ConfigError(f"ReplaceLinearBlocks.k must be >= 1, got {self.k}")
        if self.ridge < 0:
            raise ConfigError(f"ReplaceLinearBlocks.ridge must be >= 0, got {self.ridge}")
        if self.blocks is not None and (not self.blocks or len(set(self.blocks)) != len(self.blocks)):
            raise ConfigError(f"ReplaceLinearBlocks.blocks must be distinct indices, got {self.blocks}")


# ----------------------------------------------------------------------------------------------
# structure


def find_blocks(model: nn.Module, layers: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks and its path."""
    paths = [layers] if layers else list(_LAYER_PATHS)
    for p in paths:
        try:
            m = get_submodule(model, p)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return p, m
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if layers is None and lists:
        return max(lists, key=lambda nm: len(nm[1]))
    raise PlanError(f"no block list at {layers!r} in {type(model).__name__}" if layers else
                    f"{type(model).__name__} has no list of blocks (looked for {list(_LAYER_PATHS)}); pass layers=...")


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-style ``Conv1D``: ``y = x @ W + b`` with ``W`` stored as ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def folded_weights(layer: nn.Module, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``layer`` followed by ``u -> u @ T`` (``nn.Linear`` or ``Conv1D``), solved in float64.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> w, b = folded_weights(lin, 2 * torch.eye(2, dtype=torch.float64))
        >>> torch.allclose(w, 2 * lin.weight) and torch.allclose(b, 2 * lin.bias)
        True
    """
    w, b = layer.weight.detach().double(), None if layer.bias is None else layer.bias.detach().double()
    T = T.to(w.device, torch.float64)
    new_w = w @ T if _is_conv1d(layer) else T.t() @ w     # Conv1D: x W T; Linear: x (T^T W)^T
    return new_w.to(layer.weight.dtype), None if b is None else (b @ T).to(layer.bias.dtype)


def find_out_proj(block: nn.Module, where: str, out_proj: str | None = None) -> tuple[str, nn.Module]:
    """The output projection of a block's MLP (the layer a replacement is folded into)."""
    for p in ([out_proj] if out_proj else list(_OUT_PROJ)):
        try:
            m = get_submodule(block, p)
        except AttributeError:
            continue
        if not _is_projection(m):
            raise PlanError(f"{where}.{p} is a {type(m).__name__}, not nn.Linear or transformers' Conv1D: "
                            "cannot fold a linear map into it; pass out_proj= naming the block's output projection")
        return p, m
    names = [n for n, m in block.named_modules() if _is_projection(m)]
    raise PlanError(f"{where} has no output projection to fold into (looked for {[out_proj] if out_proj else list(_OUT_PROJ)}; "
                    f"its Linear layers are {names}); pass out_proj=...")


def spans_of(blocks: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[s, e)`` of sorted block indices."""
    out: list[list[int]] = []
    for b in sorted(blocks):
        if out and b == out[-1][1]:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return [(s, e) for s, e in out]


# ----------------------------------------------------------------------------------------------
# float64 statistics


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    r = t.detach().reshape(-1, t.shape[-1]).double()
    if mask is not None and mask.numel() * t.shape[-1] == t.numel():
        r = r[mask.reshape(-1).bool()]
    return r


@dataclass
class _Moments:
    """Running float64 sums for the least-squares map X → Y (and X → Y − X)."""

    d: int
    n: int = 0
    sx: torch.Tensor | None = None
    sy: torch.Tensor | None = None
    sxx: torch.Tensor | None = None
    sxy: torch.Tensor | None = None
    syy: float = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.sxx is None:
            kw = {"dtype": torch.float64, "device": x.device}
            self.sx, self.sy = torch.zeros(self.d, **kw), torch.zeros(y.shape[1], **kw)
            self.sxx = torch.zeros(self.d, self.d, **kw)
            self.sxy = torch.zeros(self.d, y.shape[1], **kw)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.t() @ x
        self.sxy += x.t() @ y
        self.syy += float((y * y).sum())


def affine_r2(mo: _Moments, ridge: float, residual: bool = True, max_condition: float = 1e12,
              where: str = "") -> float:
    """R² of the best affine map X → Y (``residual=False``: X → Y − X) from accumulated moments."""
    n = mo.n
    mx, my = mo.sx / n, mo.sy / n
    cxx = mo.sxx - n * torch.outer(mx, mx)
    cxy = mo.sxy - n * torch.outer(mx, my)
    tyy = mo.syy - n * float(my @ my)
    if not residual:  # Y' = Y − X
        cyy_tr = tyy - 2 * float(torch.trace(cxy)) + float(torch.trace(cxx))
        cxy = cxy - cxx
        tyy = cyy_tr
    T, _, _ = ridge_solve(cxx, cxy, ridge, max_condition, where)
    sse = tyy - 2 * float((T * cxy).sum()) + float((T * (cxx @ T)).sum())
    return 1.0 - sse / max(tyy, 1e-300)


def _capture(model: nn.Module, layers: str, blocks: nn.ModuleList, calibration: Calibration,
             on_batch: Callable[[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor],
                                 torch.Tensor | None], None], out_proj: str | None = None,
             need_proj: set[int] | None = None) -> None:
    """Run the calibration data; per batch call ``on_batch(inputs, outputs, proj_outputs, mask)`` by block index."""
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    projs: dict[int, torch.Tensor] = {}
    handles = []

    def pre(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            ins[i] = x.detach()
        return hook

    def post(i: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            y = out[0] if isinstance(out, (tuple, list)) else out
            outs[i] = y.detach()
        return hook

    def proj(i: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            projs[i] = out.detach()
        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post(i)))
    for i in sorted(need_proj or ()):
        _, p = find_out_proj(blocks[i], f"{layers}.{i}", out_proj)
        handles.append(p.register_forward_hook(proj(i)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for args, kwargs in iter_calibration(calibration):
                ins.clear(); outs.clear(); projs.clear()
                mask = kwargs.get("attention_mask")
                model(*args, **kwargs)
                on_batch(ins, outs, projs, mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def _check_shapes(i: int, layers: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise PlanError(f"block {layers}.{i} maps {list(x.shape)} to {list(y.shape)}: a folded linear replacement "
                        f"needs equal input and output shapes")


def block_linearity(model: nn.Module, calibration: Calibration, *, layers: str | None = None, ridge: float = 1e-6,
                    max_condition: float = 1e12) -> Report:
    """Per-block R² with and without the residual ("secretly linear"), as a report (one calibration pass)."""
    if calibration is None:
        raise ConfigError("block_linearity needs calibration batches")
    path, blocks = find_blocks(model, layers)
    moments: dict[int, _Moments] = {}

    def on_batch(ins, outs, projs, mask):
        for i in range(len(blocks)):
            if i not in ins or i not in outs:
                continue
            _check_shapes(i, path, ins[i], outs[i])
            x, y = _rows(ins[i], mask), _rows(outs[i], mask)
            moments.setdefault(i, _Moments(x.shape[1])).add(x, y)

    _capture(model, path, blocks, calibration, on_batch)
    rows = []
    for i in range(len(blocks)):
        mo = moments.get(i)
        if mo is None:
            rows.append({"block": i, "r2": None, "r2_no_residual": None, "tokens": 0})
            continue
        where = f"linearity of {path}.{i}"
        rows.append({"block": i, "r2": affine_r2(mo, ridge, True, max_condition, where),
                     "r2_no_residual": affine_r2(mo, ridge, False, max_condition, where), "tokens": mo.n})
    return Report("block linearity", ["block", "r2", "r2_no_residual", "tokens"], rows,
                  summary={"layers": path, "blocks": len(blocks)},
                  notes=["r2: R² of the best affine map h_l → h_{l+1}; r2_no_residual: h_l → h_{l+1} − h_l "
                         "(float64 normal equations, ridge relative to the mean eigenvalue)"])


def plot_linearity(report: Report, path: str | Path, title: str | None = None) -> Path:
    """Save a PNG of per-block R² (with / without residual) from a linearity or ReplaceLinearBlocks report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.get("r2") is not None]
    idx = [r["block"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(idx, [r["r2"] for r in rows], "o-", label="R² with residual")
    ax.plot(idx, [r["r2_no_residual"] for r in rows], "s-", label="R² without residual")
    replaced = [r["block"] for r in rows if r.get("replaced")]
    for b in replaced:
        ax.axvline(b, color="grey", alpha=0.3)
    ax.set_xlabel("block")
    ax.set_ylabel("R² of best linear map")
    ax.set_title(title or report.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------


@dataclass
class SpanFit:
    start: int
    end: int
    fold_into: str
    T: torch.Tensor
    r2: float
    condition: float
    tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


def fit_spans(model: nn.Module, path: str, blocks: nn.ModuleList, spans: list[tuple[int, int]],
              calibration: Calibration, config: ReplaceLinearBlocks) -> list[SpanFit]:
    """ReplaceMe least squares for each span: ``u T ≈ h_e − h_s + u`` with ``u`` = block s−1's projection output."""
    starts = {s - 1 for s, _ in spans}
    acc: dict[tuple[int, int], _Moments] = {}

    def on_batch(ins, outs, projs, mask):
        for s, e in spans:
            for i in range(s, e):
                _check_shapes(i, path, ins[i], outs[i])
            if s - 1 not in projs:
                raise PlanError(f"the output projection of {path}.{s - 1} was not called on the calibration data")
            u = projs[s - 1]
            if u.shape != ins[s].shape:
                raise PlanError(f"the output projection of {path}.{s - 1} gives {list(u.shape)} but the blocks carry "
                                f"{list(ins[s].shape)}: cannot fold a linear map into it")
            target = outs[e - 1] - ins[s] + u
            x, y = _rows(u, mask), _rows(target, mask)
            acc.setdefault((s, e), _Moments(x.shape[1])).add(x, y)

    _capture(model, path, blocks, calibration, on_batch, config.out_proj, starts)
    fits = []
    for s, e in spans:
        mo = acc[(s, e)]
        where = f"ReplaceLinearBlocks span {path}[{s}:{e}]"
        T, cond, _ = ridge_solve(mo.sxx, mo.sxy, config.ridge, config.max_condition, where)
        # R² of the (bias-free) map on the span's own target, centred
        my = mo.sy / mo.n
        tyy = mo.syy - mo.n * float(my @ my)
        sse = mo.syy - 2 * float((T * mo.sxy).sum()) + float((T * (mo.sxx @ T)).sum())
        proj_path, _ = find_out_proj(blocks[s - 1], f"{path}.{s - 1}", config.out_proj)
        fits.append(SpanFit(s, e, f"{path}.{s - 1}.{proj_path}", T, 1.0 - sse / max(tyy, 1e-300), cond, mo.n))
    return fits


@register_pass(ReplaceLinearBlocks)
class ReplaceLinearBlocksHandler(PassHandler):
    def plan(self, model: nn.Module, config: ReplaceLinearBlocks, ctx: PassContext) -> Plan:
        path, blocks = find_blocks(model, config.layers)
        n = len(blocks)
        if ctx.recorded_sites is not None:
            found = [Site(name=f"{path}.{i}", base=f"{path}.{i}", kind="module", op="span", scope=path) for i in range(n)]
            sites = choose_sites(found, config, ctx, resolve_module=lambda s: get_submodule(model, s.name),
                                 what="block")
            return Plan(sites, {"path": path, "replay": True})
        if config.calibration is None:
            raise ConfigError("ReplaceLinearBlocks needs calibration=batches of token ids (or a callable returning them)")
        linearity = None
        if config.blocks is not None:
            chosen = sorted(config.blocks)
            bad = [b for b in chosen if not 0 <= b < n]
            if bad:
                raise ConfigError(f"blocks {bad} do not exist: {path} has {n} blocks (0..{n - 1})")
            if chosen[0] == 0:
                raise ConfigError(f"block 0 has no previous block whose output projection could absorb the "
                                  f"replacement; choose blocks from 1..{n - 1}")
        else:
            if config.k > n - 1:
                raise ConfigError(f"k={config.k} but only {n - 1} of {path}'s {n} blocks can be replaced "
                                  f"(block 0 has no previous block to fold into)")
            linearity = block_linearity(model, config.calibration, layers=path, ridge=config.ridge,
                                        max_condition=config.max_condition)
            scored = [r for r in linearity.rows if r["block"] >= 1 and r["r2"] is not None]
            scored.sort(key=lambda r: -r[config.score])
            chosen = sorted(r["block"] for r in scored[: config.k])
        spans = spans_of(chosen)
        for s, _ in spans:
            find_out_proj(blocks[s - 1], f"{path}.{s - 1}", config.out_proj)  # fails early with the names
        fits = fit_spans(model, path, blocks, spans, config.calibration, config)
        sites = []
        for f in fits:
            sites.append(Site(name=f"{path}.{f.start}", base=f"{path}.{f.start}", kind="module", op="span", scope=path,
                              data={"blocks": list(range(f.start, f.end)), "fold_into": f.fold_into}))
        return Plan(sites, {"path": path, "fits": {f"{path}.{f.start}": f for f in fits}, "linearity": linearity})

    def rewrite(self, model: nn.Module, config: ReplaceLinearBlocks, plan: Plan, ctx: PassContext) -> nn.Module:
        path = plan.state["path"]
        fits: dict[str, SpanFit] = plan.state.get("fits", {})
        new_weights = {}
        for s in plan.sites:  # compute every folded weight first (float64), then swap
            layer = get_submodule(model, s.data["fold_into"])
            if not _is_projection(layer):
                raise PlanError(f"{s.data['fold_into']} is a {type(layer).__name__}, not nn.Linear or Conv1D")
            if s.name in fits:
                new_weights[s.name] = (layer, *folded_weights(layer, fits[s.name].T))
        for s in plan.sites:
            if s.name in new_weights:
                layer, w, b = new_weights[s.name]
                with torch.no_grad():
                    layer.weight.copy_(w)
                    if b is not None:
                        layer.bias.copy_(b)
            for i in s.data["blocks"]:
                set_submodule(model, f"{path}.{i}", SkippedBlock(i))
        return model

    def touched(self, model: nn.Module, config: ReplaceLinearBlocks, plan: Plan) -> list[str]:
        """The output projections the fitted maps are folded into (their weights change in place)."""
        return [s.data["fold_into"] for s in plan.sites if s.data.get("fold_into")]

    def report(self, model: nn.Module, config: ReplaceLinearBlocks, plan: Plan, ctx: PassContext) -> Report:
        path = plan.state["path"]
        linearity: Report | None = plan.state.get("linearity")
        fits: dict[str, SpanFit] = plan.state.get("fits", {})
        replaced = {i: s for s in plan.sites for i in s.data["blocks"]}
        rows = []
        n = len(get_submodule(model, path))
        lin_rows = {r["block"]: r for r in linearity.rows} if linearity else {}
        for i in range(n):
            site = replaced.get(i)
            fit = fits.get(site.name) if site is not None and site.data["blocks"][0] == i else None
            rows.append({"block": i, "r2": lin_rows.get(i, {}).get("r2"),
                         "r2_no_residual": lin_rows.get(i, {}).get("r2_no_residual"),
                         "replaced": site is not None, "fold_into": site.data["fold_into"] if fit else None,
                         "fit_r2": fit.r2 if fit else None, "cond": fit.condition if fit else None})
        report = Report("ReplaceLinearBlocks", ["block", "r2", "r2_no_residual", "replaced", "fold_into", "fit_r2", "cond"],
                        rows, summary={"replaced": sorted(replaced), "spans": len(plan.sites)},
                        notes=["fit_r2: R² of the ReplaceMe least-squares map u·T ≈ h_e − h_s + u folded into fold_into "
                               "(no parameters added; the replaced blocks are skipped)"])
        if config.plot and linearity is not None:
            plot_linearity(report, config.plot, "per-block linearity (grey: replaced)")
        return report


__all__ = ["ReplaceLinearBlocks", "SkippedBlock", "block_linearity", "plot_linearity", "find_blocks", "spans_of",
           "fit_spans", "affine_r2"]


def linearity_report_for(model_name: str, chunks: int = 16, seq_len: int = 128, plot: str | None = None) -> Report:
    """``surgeon report --linearity MODEL``: per-block linearity of a registry model on offline prose.

    SmolLM2 is calibrated on the train topics of CPython's pydoc text (its own tokenizer); other causal
    LMs on seeded random token ids (a structural check only; say so in the report).
    """
    from surgeon.models.registry import resolve

    spec = resolve(model_name)
    model = spec.build().eval()
    if model_name == "smollm2":
        from surgeon.models.smollm2 import load_smollm2_tokenizer
        from surgeon.data.text import token_chunks

        batches = token_chunks(load_smollm2_tokenizer(), "train", seq_len, chunks, batch_size=8)
        source = f"{chunks}×{seq_len} tokens of CPython pydoc prose (train topics)"
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise ConfigError(f"--linearity needs a language model with a block list; {model_name!r} has no config.vocab_size")
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, vocab, (min(8, chunks - i), seq_len), generator=g) for i in range(0, chunks, 8)]
        source = f"{chunks}×{seq_len} seeded random token ids (no tokenizer/text for this model)"
    report = block_linearity(model, batches)
    report.summary["model"] = model_name
    report.summary["calibration"] = source
    if plot:
        plot_linearity(report, plot, f"{model_name}: per-block linearity")
        report.notes.append(f"plot: {plot}")
    return report


__all__ += ["linearity_report_for"]
