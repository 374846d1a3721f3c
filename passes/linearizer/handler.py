"""``LinearizerSandwich``: replace layers or blocks by a Linearizer ``g_y⁻¹(A g_x(x))`` fitted to them.

Two kinds of site:

* **Exact sandwiches** (no data, no training): a ``Linear``/``Conv`` whose only user is a bijective
  activation φ (LeakyReLU, PReLU with positive slopes, ELU, tanh, sigmoid, softplus) *is* the
  Linearizer ``L{id, Bias(b)∘φ⁻¹, W}``. ``mode="exact"`` (or ``"auto"`` without targets) finds every
  such pair in the FX graph; a targeted module that is such a pair (``nn.Sequential(Linear, Tanh)``)
  is converted the same way.
* **Fitted sandwiches** (``targets`` = modules, ``calibration`` = batches): the module's inputs and
  outputs are recorded; ``g_x``/``g_y`` start as the exact per-feature standardisations (ActNorm)
  followed by identity couplings; ``A`` is the closed-form ridge least-squares fit in float64 in g
  coordinates and its held-out R² is the layer's linearity score. At ``R² ≥ threshold`` a plain
  linear map replaces the module (``nn.Linear`` with the affine parts folded in); below it the
  couplings are trained by distillation (output + latent loss) while ``A`` is re-solved in closed form
  every ``resolve_every`` steps (variable projection), and the fit error before/after is reported.

Replay (``surgeon.restore``) rebuilds the recorded structure without calibration data; the fitted
parameters come from the saved safetensors.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizerSandwich
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), nn.Softplus())
    >>> s = surgeon.apply(net, LinearizerSandwich(mode="exact"))
    >>> [(r["site"], r["kind"]) for r in s.report["LinearizerSandwich"].rows]
    [('0', 'exact:tanh'), ('2', 'exact:softplus')]
    >>> x = torch.randn(5, 4); bool((s.model(x) - net(x)).abs().max() < 1e-6)
    True
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.config import PassConfig
from surgeon.core.errors import ConfigError, PlanError
from surgeon.fx.tracing import finish_graph, get_submodule, set_submodule, trace
from surgeon.ops.linearizer import Linearizer
from surgeon.ops.invertible import ActNorm, Bias, InverseActivation, InvertibleSequential, coupling_stack
from surgeon.core.handler import PassContext, PassHandler, match_recorded, register_pass
from surgeon.core.report import Report
from surgeon.core.selectors import select_sites
from surgeon.core.sites import Plan, Site

Calibration = Callable | list | tuple | None


@dataclass(kw_only=True)
class LinearizerSandwich(PassConfig):
    """Replace layers by Linearizers ``g_y⁻¹(A g_x(x))``: exact where possible, else fitted to calibration data.

    Args:
        mode: ``auto`` (exact pairs in the graph when no ``targets``; targeted modules: exact if they are a
            Linear/Conv + bijective activation, else fitted), ``exact`` (pairs only), ``fit`` (always fit).
        threshold: held-out R² (in g coordinates) at or above which a plain linear map replaces the module.
        ridge: ridge λ relative to the mean eigenvalue of ``Zₓᵀ Zₓ`` (0 = plain least squares).
        couplings / hidden / clamp: coupling blocks per side, conditioner width, soft clamp of log-scales.
        steps / lr / batch_rows / latent_weight / resolve_every: distillation of the couplings.
        holdout: fraction of calibration rows held out for R² and the fit errors.
        max_rows: rows (tokens / pixels) kept per site; max_condition: warn above this condition number.
        rank: low-rank A (``None`` = full).
        feature_dim: the dim of a module's inputs/outputs that holds features (``-1``; ``1`` for NCHW).
        kernel_size: for 4-D (NCHW) sites, the kernel of a convolution A (1 = per pixel).
        calibration: batches (tensors, tuples of args, or dicts of kwargs) or a callable returning them;
            runtime-only (not saved in the recipe; replay loads the fitted weights instead).
    """

    mode: Literal["auto", "exact", "fit"] = "auto"
    threshold: float = 0.99
    ridge: float = 1e-6
    couplings: int = 2
    hidden: int = 64
    clamp: float = 2.0
    steps: int = 300
    lr: float = 3e-3
    batch_rows: int = 512
    latent_weight: float = 0.1
    resolve_every: int = 25
    holdout: float = 0.2
    max_rows: int = 20000
    max_condition: float = 1e10
    rank: int | None = None
    feature_dim: int = -1
    kernel_size: int = 1
    seed: int = 0
    calibration: Calibration = None
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    filter_fn: Callable | None = None
    leaf_modules: list[str] | tuple[str, ...] = ()
    leaf_fn: Callable | None = None

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 and self.threshold != float("inf"):
            raise ConfigError(f"LinearizerSandwich.threshold must be in [0, 1], got {self.threshold}")
        if self.ridge < 0:
            raise ConfigError(f"LinearizerSandwich.ridge must be >= 0, got {self.ridge}")
        if self.couplings < 0 or self.steps < 0 or self.hidden < 1:
            raise ConfigError("LinearizerSandwich couplings/steps must be >= 0 and hidden >= 1")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"LinearizerSandwich.holdout must be in (0, 1), got {self.holdout}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"LinearizerSandwich.rank must be >= 1, got {self.rank}")
        if self.feature_dim not in (-1, 1):
            raise ConfigError(f"LinearizerSandwich.feature_dim must be -1 (features last) or 1 (channels first), "
                              f"got {self.feature_dim}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"LinearizerSandwich.kernel_size must be odd and >= 1, got {self.kernel_size}")


# ----------------------------------------------------------------------------------------------
# exact sandwiches

_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACT_MODULES = {nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", nn.ELU: "elu", nn.Tanh: "tanh",
                nn.Sigmoid: "sigmoid", nn.Softplus: "softplus"}
_ACT_FUNCTIONS = {F.leaky_relu: "leaky_relu", F.elu: "elu", torch.tanh: "tanh", F.tanh: "tanh",
                  torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.softplus: "softplus", F.prelu: "prelu"}
_ACT_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid"}


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def activation_of(node: fx.Node, gm: fx.GraphModule) -> tuple[str, dict[str, Any]] | None:
    """``(kind, params)`` when ``node`` is a bijective activation call with constant parameters."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        kind = _ACT_MODULES.get(type(m))
        if kind is None:
            return None
        params = {"leaky_relu": lambda: {"slope": m.negative_slope}, "elu": lambda: {"alpha": m.alpha},
                  "softplus": lambda: {"beta": m.beta, "threshold": m.threshold},
                  "prelu": lambda: {"weight_of": str(node.target)}}.get(kind, dict)()
    elif node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        kind = _ACT_FUNCTIONS[node.target]
        if kind == "leaky_relu":
            params = {"slope": _arg(node, 1, "negative_slope", 0.01)}
        elif kind == "elu":
            params = {"alpha": _arg(node, 1, "alpha", 1.0)}
        elif kind == "softplus":
            params = {"beta": _arg(node, 1, "beta", 1.0), "threshold": _arg(node, 2, "threshold", 20.0)}
        elif kind == "prelu":
            w = _arg(node, 1, "weight", None)
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                return None
            params = {"weight_attr": str(w.target)}
        else:
            params = {}
    elif node.op == "call_method" and node.target in _ACT_METHODS:
        kind, params = _ACT_METHODS[str(node.target)], {}
    else:
        return None
    if any(isinstance(v, fx.Node) for v in params.values()):
        return None
    return kind, params


def _prelu_weight(root: nn.Module, params: dict[str, Any]) -> torch.Tensor | None:
    if "weight_of" in params:
        return get_submodule(root, params["weight_of"]).weight
    if "weight_attr" in params:
        owner, _, leaf = params["weight_attr"].rpartition(".")
        return getattr(get_submodule(root, owner), leaf)
    return None


def _bijective(kind: str, params: dict[str, Any], root: nn.Module) -> bool:
    if kind == "leaky_relu":
        return params["slope"] > 0
    if kind == "elu":
        return params["alpha"] > 0
    if kind == "softplus":
        return params["beta"] > 0
    if kind == "prelu":
        w = _prelu_weight(root, params)
        return w is not None and bool((w > 0).all())
    return True


def exact_linearizer(layer: nn.Module, kind: str, params: dict[str, Any], root: nn.Module) -> Linearizer:
    """The Linearizer that *is* ``φ(layer(x))``: ``L{id, Bias(b)∘φ⁻¹, W}`` (b absorbed into g_y)."""
    if not isinstance(layer, _LINEAR_TYPES):
        raise PlanError(f"{type(layer).__name__} is not a Linear/Conv layer")
    act_kw = {k: v for k, v in params.items() if k in ("slope", "alpha", "beta", "threshold")}
    weight = _prelu_weight(root, params) if kind == "prelu" else None
    dim = -1 if isinstance(layer, nn.Linear) else 1
    blocks: list[nn.Module] = [InverseActivation(kind, weight=weight, **act_kw)]
    if layer.bias is not None:
        blocks.append(Bias(layer.bias.detach(), dim=dim))
    g_y = InvertibleSequential(*blocks)
    if isinstance(layer, nn.Linear):
        return Linearizer(None, g_y, layer.weight.detach(), dim=dim)
    if layer.padding_mode != "zeros":
        raise PlanError(f"{type(layer).__name__} with padding_mode={layer.padding_mode!r} is not supported by exact "
                        f"sandwiches (only zero padding is a linear operator on g coordinates)")
    conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return Linearizer(None, g_y, layer.weight.detach(), dim=dim, conv=conv)


def exact_pairs(gm: fx.GraphModule) -> list[Site]:
    """Every ``Linear/Conv → bijective activation`` pair (the layer's only user is the activation)."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    sites = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), _LINEAR_TYPES):
            continue
        if calls[str(n.target)] != 1 or len(n.users) != 1:
            continue
        user = next(iter(n.users))
        act = activation_of(user, gm)
        if act is None or (user.args[:1] != (n,) and user.kwargs.get("input") is not n):
            continue
        kind, params = act
        if not _bijective(kind, params, gm):
            continue
        name = str(n.target)
        sites.append(Site(name=name, base=name, kind="fx", op=f"exact:{kind}",
                          scope=name.rpartition(".")[0], node=n.name,
                          data={"decision": "exact", "act": kind, "act_params": params, "act_node": user.name}))
    return sites


def module_exact_pattern(module: nn.Module) -> tuple[str, dict[str, Any], str] | None:
    """When a module's whole forward is ``act(layer(x))``: ``(kind, params, layer path)``."""
    try:
        gm = trace(module)
    except Exception:  # noqa: BLE001 - not traceable: not an exact pattern
        return None
    nodes = [n for n in gm.graph.nodes]
    if len(nodes) != 4 or [n.op for n in (nodes[0], nodes[3])] != ["placeholder", "output"]:
        return None
    lin, act_node = nodes[1], nodes[2]
    if lin.op != "call_module" or not isinstance(gm.get_submodule(str(lin.target)), _LINEAR_TYPES):
        return None
    act = activation_of(act_node, gm)
    if act is None or act_node.args[:1] != (lin,) or nodes[3].args[0] is not act_node:
        return None
    kind, params = act
    if not _bijective(kind, params, gm):
        return None
    return kind, params, str(lin.target)


# ----------------------------------------------------------------------------------------------
# calibration and closed-form fits


def iter_calibration(calibration: Calibration) -> Iterable[tuple[tuple, dict]]:
    data = calibration() if callable(calibration) else calibration
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield (batch,), {}
        elif isinstance(batch, dict):
            yield (), dict(batch)
        elif isinstance(batch, (tuple, list)):
            yield tuple(batch), {}
        else:
            raise ConfigError(f"calibration batches must be tensors, tuples or dicts, got {type(batch).__name__}")


def record_io(model: nn.Module, names: list[str], calibration: Calibration) -> dict[str, tuple[list, list]]:
    """Inputs and outputs of the named modules over the calibration batches (one model pass per batch)."""
    store: dict[str, tuple[list, list]] = {n: ([], []) for n in names}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            y = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise PlanError(f"site {name!r}: LinearizerSandwich needs a module that maps one tensor to one "
                                f"tensor (got input {type(x).__name__}, output {type(y).__name__})")
            store[name][0].append(x.detach().float().cpu())
            store[name][1].append(y.detach().float().cpu())

        return record

    handles = [get_submodule(model, n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for args, kwargs in iter_calibration(calibration):
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return store


def ridge_solve(sxx: torch.Tensor, sxy: torch.Tensor, ridge: float, max_condition: float,
                where: str) -> tuple[torch.Tensor, float, float]:
    """``(Sxx + λI)⁻¹ Sxy`` in float64 (λ = ridge · mean eigenvalue), by eigendecomposition.

    Returns ``(T, condition number, λ)``; warns when the system is ill-conditioned.
    """
    sxx, sxy = sxx.double(), sxy.double()
    evals, evecs = torch.linalg.eigh(sxx)
    lam = ridge * float(evals.clamp_min(0).mean())
    shifted = evals.clamp_min(0) + lam
    top = float(shifted.max())
    floor = top * sxx.shape[0] * torch.finfo(torch.float64).eps
    small = float(shifted.min())
    cond = top / small if small > 0 else float("inf")
    if cond > max_condition:
        warnings.warn(f"{where}: ill-conditioned least-squares fit, condition number {cond:.3g} with ridge "
                      f"λ={lam:.3g} (ridge={ridge} × mean eigenvalue); directions below {floor:.3g} are dropped. "
                      f"Increase ridge or use more/varied calibration data.", RuntimeWarning, stacklevel=3)
    inv = torch.where(shifted > floor, 1.0 / shifted, torch.zeros_like(shifted))
    return (evecs * inv) @ (evecs.t() @ sxy), cond, lam


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``1 − ‖pred − target‖² / ‖target − mean‖²`` over rows (float64)."""
    pred, target = pred.double(), target.double()
    sst = float(((target - target.mean(0)) ** 2).sum())
    return 1.0 - float(((pred - target) ** 2).sum()) / max(sst, 1e-300)


def rel_err(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred.double() - target.double()) ** 2).sum() / ((target.double()) ** 2).sum().clamp_min(1e-300))


class _Geometry:
    """How a site's tensors become rows: per-feature matrix A, or a 2-D convolution A (unfold)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, config: LinearizerSandwich, name: str) -> None:
        fd = config.feature_dim
        bad = x.dim() < 2 or y.dim() != x.dim()
        if not bad and fd == -1:
            bad = x.shape[:-1] != y.shape[:-1]
        elif not bad:
            bad = x.shape[0] != y.shape[0] or (x.dim() != 4 and x.shape[2:] != y.shape[2:])
        if bad:
            raise PlanError(f"site {name!r}: dimension mismatch, g acts on features on dim {fd} and needs the other "
                            f"dims kept, but the module maps {list(x.shape)} to {list(y.shape)}")
        self.dim = fd
        self.n, self.m = int(x.shape[fd]), int(y.shape[fd])
        self.k = config.kernel_size
        self.conv_fit = x.dim() == 4 and fd == 1 and (self.k > 1 or y.shape[2:] != x.shape[2:])
        if self.conv_fit:
            k = self.k
            pad = k // 2
            stride = max(1, round(x.shape[2] / max(y.shape[2], 1)))
            expect = [(s + 2 * pad - k) // stride + 1 for s in x.shape[2:]]
            if expect != list(y.shape[2:]):
                raise PlanError(f"site {name!r}: a {k}×{k} convolution (padding {pad}, stride {stride}) cannot map "
                                f"{list(x.shape)} to {list(y.shape)}; pick another kernel_size")
            self.conv = {"stride": stride, "padding": pad, "dilation": 1, "groups": 1}
        else:
            self.conv = None
        self.block_dim = fd

    def design(self, z: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return (z if self.dim == -1 else z.movedim(self.dim, -1)).reshape(-1, self.n)
        cols = F.unfold(z, self.k, padding=self.conv["padding"], stride=self.conv["stride"])
        return cols.transpose(1, 2).reshape(-1, self.n * self.k * self.k)

    def targets(self, z: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return (z if self.dim == -1 else z.movedim(self.dim, -1)).reshape(-1, self.m)
        return z.movedim(1, -1).reshape(-1, self.m)

    def kernel(self, T: torch.Tensor) -> torch.Tensor:
        """The solution of ``rows(Z_x) T ≈ rows(Z_y)`` as A (matrix or kernel)."""
        A = T.t().contiguous()
        return A if self.conv is None else A.reshape(self.m, self.n, self.k, self.k)


def _samples(x: torch.Tensor, y: torch.Tensor, geo: _Geometry, max_rows: int, seed: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (matrix sites) or whole examples (conv sites), randomly subsampled to ``max_rows`` rows."""
    g = torch.Generator().manual_seed(seed)
    if geo.conv is None:
        xr, yr = geo.design(x), geo.targets(y)
        if xr.shape[0] != yr.shape[0]:
            raise PlanError(f"the module maps {xr.shape[0]} feature rows to {yr.shape[0]}; it must keep the "
                            f"other dims (a per-token/per-pixel map)")
        idx = torch.randperm(xr.shape[0], generator=g)[:max_rows]
        return xr[idx], yr[idx]
    per = int(math.prod(y.shape[2:]))
    keep = max(2, max_rows // max(per, 1))
    idx = torch.randperm(x.shape[0], generator=g)[:keep]
    return x[idx], y[idx]


@dataclass
class FitResult:
    module: nn.Module
    decision: str
    r2: float
    r2_output: float
    err_before: float
    err_after: float
    r2_after: float | None
    condition: float
    ridge_used: float
    rows: int
    params: int


def _solve_A(lin: Linearizer, geo: _Geometry, x: torch.Tensor, y: torch.Tensor, config: LinearizerSandwich,
             where: str, rank: int | None) -> tuple[float, float]:
    with torch.no_grad():
        zx, zy = geo.design(lin.g_x(x)).double(), geo.targets(lin.g_y(y)).double()
        T, cond, lam = ridge_solve(zx.t() @ zx, zx.t() @ zy, config.ridge, config.max_condition, where)
        if rank is not None:
            U, S, Vh = torch.linalg.svd(zx @ T, full_matrices=False)  # reduced-rank regression
            V = Vh[:rank].t()
            T = T @ V @ V.t()
        lin.A.copy_(geo.kernel(T).to(lin.A.dtype))
    return cond, lam


def _latent_rows(lin: Linearizer, geo: _Geometry, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return geo.targets(lin.latent(x)), geo.targets(lin.g_y(y))


def fit_site(name: str, x: torch.Tensor, y: torch.Tensor, config: LinearizerSandwich) -> FitResult:
    """Fit a Linearizer (or a plain linear map) to one site's recorded inputs/outputs."""
    geo = _Geometry(x, y, config, name)
    full = min(geo.m, geo.n * geo.k * geo.k)
    if config.rank is not None and config.rank > full:
        raise ConfigError(f"site {name!r}: rank {config.rank} is larger than the dimension allows "
                          f"(A is {geo.m}×{geo.n * geo.k * geo.k}, rank ≤ {full})")
    xs, ys = _samples(x, y, geo, config.max_rows, config.seed)
    n_hold = max(1, int(round(xs.shape[0] * config.holdout)))
    if xs.shape[0] - n_hold < 2:
        raise PlanError(f"site {name!r}: only {xs.shape[0]} calibration rows/examples; give more calibration data")
    xt, yt, xv, yv = xs[n_hold:], ys[n_hold:], xs[:n_hold], ys[:n_hold]
    torch.manual_seed(config.seed)
    d = geo.block_dim
    an_x = ActNorm(geo.n, dim=d).initialize(xt)
    an_y = ActNorm(geo.m, dim=d).initialize(yt)
    A0 = torch.zeros(geo.m, geo.n, geo.k, geo.k) if geo.conv else torch.zeros(geo.m, geo.n)
    lin = Linearizer(InvertibleSequential(an_x), InvertibleSequential(an_y), A0, dim=geo.dim, conv=geo.conv)
    cond, lam = _solve_A(lin, geo, xt, yt, config, f"LinearizerSandwich site {name!r}", config.rank)
    lin.eval()
    with torch.no_grad():
        pz, tz = _latent_rows(lin, geo, xv, yv)
        r2 = r2_score(pz, tz)
        out_v = lin(xv)
        r2_out = r2_score(geo.targets(out_v), geo.targets(yv))
        err_before = rel_err(out_v, yv)
    rows = int(geo.targets(yt).shape[0])
    if r2 >= config.threshold or config.couplings == 0:
        module = _plain_linear(lin) if geo.conv is None else lin
        params = sum(p.numel() for p in module.parameters()) + (lin.A.numel() if module is lin else 0)
        return FitResult(module, "linear", r2, r2_out, err_before, err_before, None, cond, lam, rows, params)
    # sandwich: identity couplings (the model starts at the linear fit), then distil
    for g, width in ((lin.g_x, geo.n), (lin.g_y, geo.m)):
        if width < 2:
            continue
        for b in coupling_stack(width, config.couplings, config.hidden, dim=d, clamp=config.clamp, seed=config.seed):
            g.append(b)
    err_after, best = _train(lin, geo, xt, yt, xv, yv, config, name)
    with torch.no_grad():
        pz, tz = _latent_rows(lin, geo, xv, yv)
        r2_after = r2_score(pz, tz)
    params = sum(p.numel() for p in lin.parameters()) + lin.A.numel()
    return FitResult(lin, "sandwich", r2, r2_out, err_before, err_after, r2_after, cond, lam, rows, params)


def _plain_linear(lin: Linearizer) -> nn.Linear:
    """Fold the ActNorms of an affine-only Linearizer into one ``nn.Linear`` (float64 arithmetic)."""
    an_x, an_y = lin.g_x.blocks[0], lin.g_y.blocks[0]
    sx = torch.exp(an_x.log_scale.detach().double())
    sy = torch.exp(an_y.log_scale.detach().double())
    W = (lin.A.double() * sx[None, :]) / sy[:, None]
    b = an_y.shift.detach().double() - W @ an_x.shift.detach().double()
    layer = nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        layer.weight.copy_(W.float())
        layer.bias.copy_(b.float())
    return layer


def _train(lin: Linearizer, geo: _Geometry, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
           config: LinearizerSandwich, name: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Distil the couplings (output + latent loss), re-solving A in closed form (variable projection)."""
    params = [p for p in list(lin.g_x.parameters()) + list(lin.g_y.parameters())]
    opt = torch.optim.Adam(params, lr=config.lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    var_y = yt.double().var().clamp_min(1e-12).float()
    per = 1 if geo.conv is None else int(math.prod(yt.shape[2:]))
    bs = max(2, config.batch_rows // per)

    def evaluate() -> float:
        lin.eval()
        with torch.no_grad():
            return rel_err(lin(xv), yv)

    threads = torch.get_num_threads()
    if bs * per * max(geo.n, geo.m, config.hidden) < 2_000_000:
        torch.set_num_threads(1)  # small steps: thread hand-offs cost more than they save (much more on a busy box)
    try:
        return _train_loop(lin, geo, xt, yt, xv, yv, config, name, opt, params, g, var_y, bs, evaluate)
    finally:
        torch.set_num_threads(threads)


def _train_loop(lin, geo, xt, yt, xv, yv, config, name, opt, params, g, var_y, bs, evaluate):
    best_err, best = evaluate(), copy.deepcopy(lin.state_dict())
    where = f"LinearizerSandwich site {name!r}"
    for step in range(config.steps):
        lin.train()
        idx = torch.randint(0, xt.shape[0], (min(bs, xt.shape[0]),), generator=g)
        xb, yb = xt[idx], yt[idx]
        latent = lin.latent(xb)
        target_latent = lin.g_y(yb)
        out = lin.g_y.inverse(latent)
        loss = F.mse_loss(out, yb) / var_y
        loss = loss + config.latent_weight * F.mse_loss(latent, target_latent) / target_latent.detach().var().clamp_min(1e-12)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % config.resolve_every == 0 or step + 1 == config.steps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                _solve_A(lin, geo, xt, yt, config, where, config.rank)
            err = evaluate()
            if err < best_err:
                best_err, best = err, copy.deepcopy(lin.state_dict())
    lin.load_state_dict(best)
    lin.eval()
    return best_err, best


# ----------------------------------------------------------------------------------------------
# replay: rebuild the recorded structure without data


def _build_recorded(site: Site, config: LinearizerSandwich) -> nn.Module:
    d = site.data
    if d["decision"] == "linear" and d.get("conv") is None:
        return nn.Linear(d["in"], d["out"])
    conv = d.get("conv")
    A = torch.zeros(d["A_shape"])
    bd = d["block_dim"]
    g_x = InvertibleSequential(ActNorm(d["in"], dim=bd))
    g_y = InvertibleSequential(ActNorm(d["out"], dim=bd))
    if d["decision"] == "sandwich":
        for g, width in ((g_x, d["in"]), (g_y, d["out"])):
            if width >= 2:
                for b in coupling_stack(width, d["couplings"], d["hidden"], dim=bd, clamp=d["clamp"]):
                    g.append(b)
    lin = Linearizer(g_x, g_y, A, dim=d["dim"], conv=conv)
    return lin.eval()


# ----------------------------------------------------------------------------------------------


@register_pass(LinearizerSandwich)
class LinearizerSandwichHandler(PassHandler):
    def plan(self, model: nn.Module, config: LinearizerSandwich, ctx: PassContext) -> Plan:
        use_graph = config.mode == "exact" or (config.mode == "auto" and config.targets is None)
        if ctx.recorded_sites is not None:
            use_graph = bool(ctx.recorded_sites) and ctx.recorded_sites[0].kind == "fx"
        if use_graph:
            return self._plan_graph(model, config, ctx)
        return self._plan_modules(model, config, ctx)

    # -- FX path: exact pairs ----------------------------------------------------------------
    def _plan_graph(self, model: nn.Module, config: LinearizerSandwich, ctx: PassContext) -> Plan:
        gm = trace(model, config.leaf_modules, config.leaf_fn)
        found = exact_pairs(gm)
        if ctx.recorded_sites is not None:
            sites = match_recorded(found, ctx.recorded_sites, config.pass_name)
        else:
            if not found:
                raise PlanError(
                    f"LinearizerSandwich found no exact sandwich (Linear/Conv whose only user is a LeakyReLU, PReLU "
                    f"with positive slopes, ELU, tanh, sigmoid or softplus) in {type(model).__name__}; to fit other "
                    f"layers pass targets=[module names] and calibration=batches")
            sites = select_sites(found, config.targets, config.exclude, config.filter_fn,
                                 resolve_module=lambda s: get_submodule(gm, s.name), what="exact sandwich")
        built = {}
        for s in sites:
            built[s.name] = exact_linearizer(gm.get_submodule(s.name), s.data["act"], s.data["act_params"], gm)
        return Plan(sites, {"gm": gm, "built": built})

    # -- module path: targeted modules ---------------------------------------------------------
    def _plan_modules(self, model: nn.Module, config: LinearizerSandwich, ctx: PassContext) -> Plan:
        found = [Site(name=fqn, base=fqn, kind="module", op=type(m).__name__, scope=fqn.rpartition(".")[0])
                 for fqn, m in model.named_modules() if fqn]
        if ctx.recorded_sites is not None:
            sites = match_recorded(found, ctx.recorded_sites, config.pass_name)
            return Plan(sites, {"built": {s.name: self._replay_site(model, s, config) for s in sites}})
        if config.targets is None and config.filter_fn is None:
            raise ConfigError("LinearizerSandwich(mode='fit') needs targets=[module names] (the layers or blocks to "
                              "replace)")
        sites = select_sites(found, config.targets, config.exclude, config.filter_fn,
                             resolve_module=lambda s: get_submodule(model, s.name), what="module")
        names = {s.name for s in sites}
        # a module inside another selected module goes with it (suffix targets like "1" also match "1.1")
        sites = [s for s in sites if not any(s.name.startswith(o + ".") for o in names if o != s.name)]
        built: dict[str, nn.Module] = {}
        results: dict[str, FitResult] = {}
        to_fit = []
        for s in sites:
            module = get_submodule(model, s.name)
            pattern = module_exact_pattern(module) if config.mode != "fit" else None
            if pattern is not None:
                kind, params, layer_path = pattern
                root = module
                built[s.name] = exact_linearizer(get_submodule(module, layer_path), kind, params, root)
                s.data = {"decision": "exact", "act": kind, "act_params": params, "layer": layer_path}
            else:
                to_fit.append(s)
        if to_fit:
            if config.calibration is None:
                raise ConfigError(f"LinearizerSandwich needs calibration=batches to fit {[s.name for s in to_fit]} "
                                  f"(they are not exact Linear/Conv + bijective activation pairs)")
            io = record_io(model, [s.name for s in to_fit], config.calibration)
            for s in to_fit:
                xs, ys = io[s.name]
                if not xs:
                    raise PlanError(f"site {s.name!r} was never called on the calibration data")
                try:
                    x, y = torch.cat(xs), torch.cat(ys)
                except RuntimeError as e:
                    raise PlanError(f"site {s.name!r}: calibration batches give different shapes ({e})") from e
                res = fit_site(s.name, x, y, config)
                results[s.name] = res
                built[s.name] = res.module
                lin = res.module
                s.shape = list(y.shape)
                s.data = {"decision": res.decision, "in": int(getattr(lin, "in_features")),
                          "out": int(getattr(lin, "out_features"))}
                if isinstance(lin, Linearizer):
                    s.data.update({"A_shape": list(lin.A.shape), "conv": lin.conv, "dim": lin.dim,
                                   "block_dim": lin.g_x.blocks[0].dim, "couplings": config.couplings,
                                   "hidden": config.hidden, "clamp": config.clamp})
        return Plan(sites, {"built": built, "results": results})

    def _replay_site(self, model: nn.Module, s: Site, config: LinearizerSandwich) -> nn.Module:
        if s.data.get("decision") == "exact":
            module = get_submodule(model, s.name)
            return exact_linearizer(get_submodule(module, s.data["layer"]), s.data["act"], s.data["act_params"], module)
        return _build_recorded(s, config)

    def rewrite(self, model: nn.Module, config: LinearizerSandwich, plan: Plan, ctx: PassContext) -> nn.Module:
        built = plan.state["built"]
        if "gm" not in plan.state:
            for s in plan.sites:
                set_submodule(model, s.name, built[s.name])
            return model
        gm: fx.GraphModule = plan.state["gm"]
        nodes = {n.name: n for n in gm.graph.nodes}
        for s in plan.sites:
            set_submodule(gm, s.name, built[s.name])
            act = nodes[s.data["act_node"]]
            act.replace_all_uses_with(nodes[s.node])
            gm.graph.erase_node(act)
        return finish_graph(gm, ctx.example_inputs)

    def report(self, model: nn.Module, config: LinearizerSandwich, plan: Plan, ctx: PassContext) -> Report:
        results: dict[str, FitResult] = plan.state.get("results", {})
        rows = []
        for s in plan.sites:
            r = results.get(s.name)
            kind = f"exact:{s.data['act']}" if s.data.get("decision") == "exact" else s.data.get("decision")
            row = {"site": s.name, "kind": kind}
            if r is not None:
                row.update({"r2": r.r2, "r2_output": r.r2_output, "err_before": r.err_before,
                            "err_after": r.err_after, "r2_after": r.r2_after, "cond": r.condition,
                            "rows": r.rows, "params": r.params})
            rows.append(row)
        notes = ["r2: held-out R² of the closed-form A in g coordinates at the linear start (the linearity score); "
                 f"linear if r2 >= {config.threshold}, else couplings distilled (err: held-out relative MSE of the "
                 "output, before/after)"] if results else ["exact: Linear/Conv + bijective activation = L{id, "
                                                           "Bias∘φ⁻¹, W}, no data, no training"]
        cols = ["site", "kind"] + (["r2", "r2_output", "err_before", "err_after", "r2_after", "cond", "rows", "params"]
                                   if results else [])
        return Report("LinearizerSandwich", cols, rows, notes=notes)


__all__ = ["LinearizerSandwich", "exact_linearizer", "exact_pairs", "fit_site", "ridge_solve", "r2_score",
           "record_io", "FitResult"]
