"""Fitted sandwiches: record a module's inputs/outputs, fit ``A`` in closed form, distil the couplings.

Example:
    >>> import torch
    >>> x = torch.randn(64, 3, dtype=torch.float64); w = torch.randn(3, 2, dtype=torch.float64)
    >>> A, cond, _ = ridge_solve(x.T @ x, x.T @ (x @ w), 1e-9, 1e12, "doc")
    >>> bool(torch.allclose(A, w, atol=1e-6))
    True
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.errors import ConfigError, PlanError
from surgeon.core.modules import get_submodule
from surgeon.core.sites import Site
from surgeon.ops.invertible import ActNorm, InvertibleSequential, coupling_stack
from surgeon.ops.linearizer import Linearizer
from surgeon.passes.linearizer.config import Calibration, LinearizerSandwich

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


def build_recorded(site: Site, config: LinearizerSandwich) -> nn.Module:
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
