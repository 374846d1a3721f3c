"""ReLU budgets: learn which ReLUs to keep (SNL- or AutoReP-style), then keep *exactly* ``budget``.

After ``LinearizeReLU`` every site is a ``MaskedReLU`` (``m ⊙ act(x) + (1 − m) ⊙ lin(x)``, with
``lin`` the identity or a fitted polynomial). :func:`search_relu_budget` runs one of

* ``"snl"``: continuous masks in [0, 1] trained jointly with the weights under
  ``KD + λ · Σ_e w_e·|m_e| / N`` (``w_e`` = ReLU elements per mask entry, ``N`` = all ReLUs); ``λ``
  grows by ``lambda_growth`` whenever the soft count ``Σ w·m`` stalls above the budget;
* ``"autorep"``: hard 0/1 masks ``m = [s > 0]`` with a straight-through estimator to the scores
  ``s`` and a hinge penalty ``μ · max(0, Σ w·m − B) / N`` toward the budget ``B``;
* ``"calibration"``: no training; scores are how often each entry's ReLU is *non*-linear on the data,

then an **exact global top-k** over the scores (:func:`select_top_k`, the kept ReLU count equals the
budget at every granularity), freezes the masks and fine-tunes the weights (and polynomial
coefficients) with distillation from the original model, optionally with the group-gap penalty of
the "Disparate Impact of linearization" mitigation (kept differentiable).

Counting convention: as in ``surgeon.ops.activation``: ReLU elements per example (batch excluded)
whose mask entry is kept; a ReLU6 counts as one. Budgets are counts of those elements (``int``) or a
fraction of the linearized sites' total (``float``).

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x = torch.randn(64, 4); y = torch.randint(0, 3, (64,))
    >>> s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=0.25), example_inputs=x[:2])
    >>> r = search_relu_budget(s, [(x, y)], method="autorep", config=BudgetSearchConfig(epochs=2, finetune_epochs=1))
    >>> r.kept, r.budget, kept_relus(s.model)
    (8, 8, 8)
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.errors import ConfigError, PlanError
from surgeon.ops.activation import MaskedReLU, activation
from surgeon.ops.losses import distillation_kl
from surgeon.passes.relu.batchnorm import batchnorms, freeze_batchnorm, recalibrate_batchnorm
from surgeon.passes.relu.calibration import linear_fraction
from surgeon.ops.poly_units import MaskedPolyReLU, least_squares_coef
from surgeon.core.report import Report

Method = Literal["snl", "autorep", "calibration"]


# ---------------------------------------------------------------------------------------------- budgets


def check_budget_value(budget: Any) -> None:
    """Type/sign checks that need no model: an int ≥ 1 or a float fraction in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"budget must be an int (ReLU count) or a float fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float) and not math.isfinite(budget):
        raise ConfigError(f"budget must be finite, got {budget!r}")
    if budget < 0:
        raise ConfigError(f"budget must be positive, got {budget!r}")
    if budget == 0:
        raise ConfigError(
            "budget=0 keeps no ReLU: the model would collapse into one affine (or polynomial) map. "
            "Keep at least one ReLU (budget=1) or zero the masks yourself if that is really wanted.")
    if isinstance(budget, float) and budget > 1.0:
        raise ConfigError(f"a float budget is a fraction in (0, 1]; got {budget!r} (pass an int for a count)")


def resolve_budget(budget: int | float, total: int) -> int:
    """The budget as a ReLU count for a model with ``total`` linearizable ReLUs."""
    check_budget_value(budget)
    if total <= 0:
        raise PlanError("the model has no ReLU elements to budget")
    if isinstance(budget, float):
        return max(1, int(round(budget * total)))
    if budget > total:
        raise ConfigError(f"budget={budget:,} ReLUs is more than the model has ({total:,} in the linearized sites)")
    return int(budget)


def relu_units(model: nn.Module) -> dict[str, MaskedReLU]:
    """Trainable-mask units by site name, in module order."""
    return {getattr(m, "site_name", n): m for n, m in model.named_modules() if isinstance(m, MaskedReLU)}


def _per_example_shape(name: str, unit: MaskedReLU) -> list[int]:
    shape = getattr(unit, "example_shape", None)
    if shape is None:
        raise ConfigError(f"site {name!r} has no recorded activation shape: apply LinearizeReLU with example_inputs")
    return list(shape)


def _entry_weight(unit: MaskedReLU, shape: Sequence[int]) -> int:
    return math.prod(shape) // max(unit.mask.numel(), 1)


def total_relus(model: nn.Module) -> int:
    """ReLU elements per example in all linearizable sites (every mask entry kept)."""
    return sum(math.prod(_per_example_shape(n, u)) for n, u in relu_units(model).items())


def kept_relus(model: nn.Module) -> int:
    """ReLU elements per example the current (binary or hard-gated) masks keep."""
    return sum(u.relu_count([1, *_per_example_shape(n, u)]) for n, u in relu_units(model).items())


def select_top_k(model: nn.Module, budget: int, scores: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Set every mask to 0/1 so that exactly ``budget`` ReLU elements per example are kept.

    Entries are taken in descending score order (ties: site order, then position) while they fit;
    entries too large for what is left are skipped, and smaller ones further down fill the rest. If
    elements are still left (a channel or layer entry larger than the remainder), the best skipped
    entry is kept *partially*: its site's mask becomes per-element and the first remaining elements
    of that entry (in memory order) keep their ReLU. Returns kept ReLUs per site.
    """
    units = relu_units(model)
    if scores is None:
        scores = {n: u.mask.detach() for n, u in units.items()}
    total = total_relus(model)
    if not 0 < budget <= total:
        raise ConfigError(f"budget {budget} must be in [1, {total}]")
    entries = []  # (score, site index, flat index, weight)
    for si, (name, unit) in enumerate(units.items()):
        w = _entry_weight(unit, _per_example_shape(name, unit))
        flat = scores[name].detach().float().reshape(-1)
        for j in range(flat.numel()):
            entries.append((-float(flat[j]), si, j, w))
    entries.sort()
    names = list(units)
    keep = {n: torch.zeros(units[n].mask.numel(), dtype=torch.bool) for n in names}
    left = budget
    skipped = None
    for neg, si, j, w in entries:
        if left == 0:
            break
        if w <= left:
            keep[names[si]][j] = True
            left -= w
        elif skipped is None:
            skipped = (si, j)
    with torch.no_grad():
        for name in names:
            unit = units[name]
            unit.mask.data = keep[name].reshape(unit.mask.shape).to(unit.mask.dtype)
        if left > 0:
            assert skipped is not None
            si, j = skipped
            name = names[si]
            unit = units[name]
            shape = _per_example_shape(name, unit)
            full = unit.mask.detach().expand(*([1] * (len(shape) - unit.mask.dim())), *unit.mask.shape)
            full = full.expand(*shape).clone()
            # elements belonging to entry j: those whose broadcast index maps to flat entry j
            ids = torch.arange(unit.mask.numel()).reshape(unit.mask.shape)
            ids = ids.expand(*([1] * (len(shape) - ids.dim())), *ids.shape).expand(*shape).reshape(-1)
            where = (ids == j).nonzero().reshape(-1)[:left]
            flat = full.reshape(-1)
            flat[where] = 1.0
            unit.mask = nn.Parameter(flat.reshape(shape), requires_grad=unit.mask.requires_grad)
            left = 0
    kept = {n: units[n].relu_count([1, *_per_example_shape(n, units[n])]) for n in names}
    assert sum(kept.values()) == budget, (sum(kept.values()), budget)
    return kept


# ---------------------------------------------------------------------------------------------- data


def _batches(data: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        data = [data]
    out = []
    for b in data:
        if isinstance(b, torch.Tensor):
            out.append((b, None))
        elif isinstance(b, (tuple, list)) and len(b) >= 1:
            out.append((b[0], b[1] if len(b) > 1 else None))
        else:
            raise ConfigError(f"data batches must be tensors or (inputs, labels) pairs, got {type(b).__name__}")
    if not out:
        raise ConfigError("no data batches were given")
    return out


# ---------------------------------------------------------------------------------------------- polynomials


def fit_polynomials(model: nn.Module, batches: Iterable[Any], clip: float | None = None) -> dict[str, float]:
    """Least-squares fit of every polynomial unit's per-channel ``c₂x² + c₁x + c₀`` to its activation.

    The fit uses the unit's input distribution on ``batches`` (with the model as it is now). Returns
    per site the mean squared error of the fit relative to the identity's error (< 1 is better).
    ``clip`` bounds every coefficient to [−clip, clip] (AutoReP clips to stay numerically stable).
    """
    units = {n: u for n, u in relu_units(model).items() if isinstance(u, MaskedPolyReLU)}
    if not units:
        raise ConfigError("the model has no polynomial units (use LinearizeReLU(units='poly'))")
    data = list(batches) if batches is not None else []
    if not data:
        raise ConfigError("polynomial units need calibration data: pass a non-empty list of input batches")
    sums: dict[str, list[torch.Tensor]] = {}

    def reduce(t: torch.Tensor, coef_shape: torch.Size) -> torch.Tensor:
        # sum over batch and the dims the coefficients broadcast over
        t = t.double().sum(0)
        dims = [d for d in range(t.dim()) if d >= t.dim() - len(coef_shape) and coef_shape[d - (t.dim() - len(coef_shape))] == 1]
        dims += list(range(t.dim() - len(coef_shape)))
        return t.sum(dim=sorted(set(dims)), keepdim=True).reshape(coef_shape) if dims else t.reshape(coef_shape)

    def hook(name: str):
        def record(unit: MaskedPolyReLU, inputs: tuple) -> None:
            x = inputs[0].detach()
            a = activation(unit.kind, x)
            cs = unit.coef.shape[1:]
            stats = [reduce(x ** k, cs) for k in range(5)] + [reduce(a * x ** k, cs) for k in range(3)]
            stats.append(reduce((a - x) ** 2, cs))
            prev = sums.get(name)
            sums[name] = stats if prev is None else [p + s for p, s in zip(prev, stats)]
        return record

    handles = [u.register_forward_pre_hook(hook(n)) for n, u in units.items()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for b in _batches(data):
                model(b[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    quality = {}
    with torch.no_grad():
        for name, unit in units.items():
            s = sums[name]
            moments, targets = torch.stack(s[:5]), torch.stack(s[5:8])
            coef = least_squares_coef(moments, targets)
            if clip is not None:
                coef = coef.clamp(-clip, clip)
            unit.coef.copy_(coef.to(unit.coef.dtype))
            unit.calibrated.fill_(True)
            c = coef.double()
            # Σ(p − a)² = Σ p² − 2 Σ p·a + Σ a², from the moments
            p2 = (c[0] ** 2 * moments[0] + 2 * c[0] * c[1] * moments[1] + (c[1] ** 2 + 2 * c[0] * c[2]) * moments[2]
                  + 2 * c[1] * c[2] * moments[3] + c[2] ** 2 * moments[4])
            pa = c[0] * targets[0] + c[1] * targets[1] + c[2] * targets[2]
            a2 = s[8] + 2 * targets[1] - moments[2]  # Σ a² = Σ (a−x)² + 2Σ a·x − Σ x²
            err = (p2 - 2 * pa + a2).sum().clamp_min(0)
            quality[name] = float(err / s[8].sum().clamp_min(1e-30))
    return quality


# ---------------------------------------------------------------------------------------------- training


@dataclass
class BudgetSearchConfig:
    """Knobs of :func:`search_relu_budget` (defaults suit small CNNs on CPU)."""

    epochs: int = 20                 # search epochs (upper bound; SNL/AutoReP stop once under budget)
    finetune_epochs: int = 20
    lr: float = 1e-3                 # weights, Adam
    mask_lr: float = 2e-2            # masks / scores, Adam
    finetune_lr: float = 1e-3
    weight_decay: float = 0.0
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9            # weight of distillation vs cross-entropy (labels optional)
    snl_lambda: float = 0.5          # initial λ (on the normalised L1)
    lambda_growth: float = 1.5
    lambda_patience: int = 2         # epochs without enough progress before λ grows
    hinge_weight: float = 5.0        # AutoReP hinge μ (on the normalised excess count)
    score_clip: float = 1.0          # AutoReP scores live in [−clip, clip]
    poly_clip: float | None = 10.0
    group_penalty: bool = False      # Disparate-Impact mitigation during fine-tuning
    group_mu: float = 0.05           # dual step for λ_g
    seed: int = 0
    #: BatchNorm during search and fine-tuning: ``"train"`` normalises with batch statistics and
    #: updates the running ones (right for a net trained on the same data); ``"frozen"`` uses and
    #: keeps the running statistics, so the model trained is the one evaluated (a pretrained net
    #: fine-tuned on a few images; see ``surgeon.passes.relu.batchnorm``)
    bn_mode: Literal["train", "frozen"] = "train"
    #: after the masks are frozen, re-estimate BatchNorm statistics relative to the original
    #: (:func:`surgeon.passes.relu.batchnorm.recalibrate_batchnorm`) before fine-tuning
    recalibrate_bn: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BudgetResult:
    """What a search did: the model (masks frozen at exactly ``budget``), history and a per-site report."""

    model: nn.Module
    method: str
    budget: int
    kept: int
    total: int
    history: list[dict[str, Any]] = field(default_factory=list)
    report: Report | None = None
    group_lambdas: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "budget": self.budget, "kept": self.kept, "total": self.total,
                "history": self.history, "report": self.report.to_dict() if self.report else None}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, temperature: float,
            alpha: float, reduction: str = "mean") -> torch.Tensor:
    """``α·T²·KL(teacher‖student) + (1 − α)·CE`` (per sample with ``reduction='none'``)."""
    kl = distillation_kl(student, teacher, temperature)
    loss = kl if labels is None else alpha * kl + (1 - alpha) * F.cross_entropy(student, labels, reduction="none")
    if labels is None and alpha < 1:
        loss = kl
    return loss.mean() if reduction == "mean" else loss


def _teacher_logits(teacher: nn.Module, batches: list, i: int, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """The (fixed, eval-mode) teacher's output for batch ``i``, computed once per training run."""
    if i not in cache:
        with torch.no_grad():
            cache[i] = teacher(batches[i][0])
    return cache[i]


def _teacher_of(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    for u in relu_units(teacher).values():
        u.gate = None
        with torch.no_grad():
            u.mask.data = torch.ones_like(u.mask)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _weights(model: nn.Module) -> list[nn.Parameter]:
    masks = {id(u.mask) for u in relu_units(model).values()}
    return [p for p in model.parameters() if id(p) not in masks and p.requires_grad]


def _soft_count(units: dict[str, MaskedReLU], hard: bool) -> torch.Tensor:
    total = torch.zeros(())
    for name, u in units.items():
        w = _entry_weight(u, _per_example_shape(name, u))
        m = u.mask_value(torch.float32) if hard else u.mask.clamp(0, 1)
        total = total + w * m.sum()
    return total


def _train_mode(model: nn.Module, config: BudgetSearchConfig) -> None:
    if config.bn_mode not in ("train", "frozen"):
        raise ConfigError(f"BudgetSearchConfig.bn_mode must be 'train' or 'frozen', got {config.bn_mode!r}")
    model.train()
    if config.bn_mode == "frozen":
        freeze_batchnorm(model)


def _group_ids(groups: Any, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if isinstance(groups, str) and groups == "labels":
        if y is None:
            raise ConfigError("groups='labels' needs labelled data")
        return y
    if callable(groups):
        return groups(x, y)
    raise ConfigError("groups must be 'labels' or a callable (inputs, labels) -> group ids")


def finetune(model: nn.Module, teacher: nn.Module, data: Any, config: BudgetSearchConfig,
             groups: Any = None, epochs: int | None = None) -> list[dict[str, Any]]:
    """Distil ``teacher`` into ``model`` with masks frozen; optional differentiable group-gap penalty.

    With ``config.group_penalty`` the loss is ``L̄ + Σ_g λ_g·|L_g − L̄|`` (``L`` = per-sample KD+CE,
    ``L_g`` its mean over group ``g`` in the batch); after each epoch ``λ_g += μ·Σ_batches |L_g − L̄|``.
    Returns one history row per epoch (``model.group_lambdas`` keeps the final λ).
    """
    batches = _batches(data)
    if config.group_penalty and groups is None:
        groups = "labels"
    epochs = config.finetune_epochs if epochs is None else epochs
    params = _weights(model)
    history: list[dict[str, Any]] = []
    if epochs <= 0 or not params:
        return history
    opt = torch.optim.Adam(params, lr=config.finetune_lr, weight_decay=config.weight_decay)
    steps = epochs * len(batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    lambdas: dict[int, float] = {}
    gen = torch.Generator().manual_seed(config.seed)
    cache: dict[int, torch.Tensor] = {}
    _train_mode(model, config)
    for epoch in range(epochs):
        gaps: dict[int, float] = {}
        total = 0.0
        for i in torch.randperm(len(batches), generator=gen).tolist():
            x, y = batches[i]
            t = _teacher_logits(teacher, batches, i, cache)
            per = kd_loss(model(x), t, y, config.kd_temperature, config.kd_alpha, reduction="none")
            mean = per.mean()
            loss = mean
            if config.group_penalty:
                g = _group_ids(groups, x, y)
                for gid in torch.unique(g).tolist():
                    gap = (per[g == gid].mean() - mean).abs()
                    loss = loss + lambdas.get(gid, 0.0) * gap
                    gaps[gid] = gaps.get(gid, 0.0) + float(gap.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(mean.detach())
        for gid, acc in gaps.items():
            lambdas[gid] = lambdas.get(gid, 0.0) + config.group_mu * acc
        history.append({"phase": "finetune", "epoch": epoch, "loss": total / len(batches),
                        "max_lambda": max(lambdas.values()) if lambdas else 0.0})
    model.eval()
    model.group_lambdas = lambdas  # type: ignore[attr-defined]
    return history


def _calibration_scores(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    names = {n: getattr(m, "site_name", n) for n, m in model.named_modules() if isinstance(m, MaskedReLU)}
    frac = linear_fraction(model, [b[0] for b in batches])
    return {names[k]: 1.0 - v for k, v in frac.items()}


def search_relu_budget(model: Any, data: Any, budget: int | float | None = None, method: Method = "snl",
                       config: BudgetSearchConfig | None = None, teacher: nn.Module | None = None,
                       groups: Any = None) -> BudgetResult:
    """Search masks for ``budget`` ReLUs, keep exactly that many, fine-tune; in place.

    Args:
        model: a ``Surgery`` (from ``surgeon.apply(..., LinearizeReLU(...))``) or its model.
        data: (inputs, labels) batches (a list or a re-iterable loader); labels may be ``None`` (KD only).
        budget: ReLU count (int) or fraction (float); default: the ``LinearizeReLU(budget=...)`` recorded.
        method: ``"snl"``, ``"autorep"`` or ``"calibration"`` (see the module doc).
        teacher: the model to distil from (default: a copy with every mask at 1, i.e. the original).
        groups: for ``config.group_penalty``: ``"labels"`` or ``fn(inputs, labels) -> group ids``.
    """
    config = config or BudgetSearchConfig()
    if config.bn_mode not in ("train", "frozen"):
        raise ConfigError(f"BudgetSearchConfig.bn_mode must be 'train' or 'frozen', got {config.bn_mode!r}")
    if method not in ("snl", "autorep", "calibration"):
        raise ConfigError(f"method must be 'snl', 'autorep' or 'calibration', got {method!r}")
    surgery = None
    if hasattr(model, "recipe") and hasattr(model, "model"):
        surgery, model = model, model.model
        if budget is None:
            for e in reversed(surgery.recipe.entries):
                if e.pass_name == "LinearizeReLU" and e.config.get("budget") is not None:
                    budget = e.config["budget"]
                    break
    if budget is None:
        raise ConfigError("no budget: pass budget=... or LinearizeReLU(budget=...)")
    units = relu_units(model)
    if not units:
        raise ConfigError("the model has no MaskedReLU units: apply LinearizeReLU first")
    total = total_relus(model)
    k = resolve_budget(budget, total)
    batches = _batches(data)
    polys = [u for u in units.values() if isinstance(u, MaskedPolyReLU)]
    torch.manual_seed(config.seed)
    teacher = teacher if teacher is not None else _teacher_of(model)
    teacher.eval()
    if config.recalibrate_bn:
        missing = sorted(set(batchnorms(model)) - set(batchnorms(teacher)))
        if not batchnorms(model) or missing:
            raise ConfigError("recalibrate_bn=True needs BatchNorm layers in the model, at the same module paths in "
                              f"the teacher ({'none in the model' if not batchnorms(model) else 'teacher lacks ' + str(missing[:3])}); "
                              "pass recalibrate_bn=False or teacher=None (the original)")
    if polys and not all(bool(u.calibrated) for u in polys):
        fit_polynomials(model, [b[0] for b in batches], clip=config.poly_clip)
    history: list[dict[str, Any]] = []
    tie = _calibration_scores(model, batches)  # breaks ties (e.g. masks clamped to 0) by non-linearity

    if method == "calibration":
        scores = tie
    else:
        scores = _train_masks(model, teacher, batches, k, total, method, config, history)
        scores = {n: scores[n].float() + 1e-4 * tie[n].reshape(scores[n].shape) for n in scores}
    for u in units.values():
        u.gate = None
    select_top_k(model, k, scores)
    for u in relu_units(model).values():
        u.mask.requires_grad_(False)
    if polys and config.recalibrate_bn:  # refit on activations at the original's scale, not run-away ones
        recalibrate_batchnorm(model, batches, teacher=teacher)
    if polys:
        for u in polys:
            u.calibrated.fill_(False)
        fit_polynomials(model, [b[0] for b in batches], clip=config.poly_clip)
    if config.recalibrate_bn:
        ratios = recalibrate_batchnorm(model, batches, teacher=teacher)
        history.append({"phase": "recalibrate_bn", "max_std_ratio": max(ratios.values(), default=1.0)})
    history += finetune(model, teacher, batches, config, groups=groups)
    kept = kept_relus(model)
    rows = []
    for name, u in relu_units(model).items():
        shape = _per_example_shape(name, u)
        n = math.prod(shape)
        r = u.relu_count([1, *shape])
        rows.append({"site": name, "relus": n, "kept": r, "density": r / n,
                     "poly": (n - r) if isinstance(u, MaskedPolyReLU) else 0})
    report = Report(f"ReLU budget ({method})", ["site", "relus", "kept", "density", "poly"], rows,
                    totals={"relus": total, "kept": kept, "density": kept / total,
                            "poly": sum(r["poly"] for r in rows)},
                    summary={"budget": k, "method": method})
    return BudgetResult(model, method, k, kept, total, history, report, getattr(model, "group_lambdas", {}))


def _train_masks(model: nn.Module, teacher: nn.Module, batches: list, k: int, total: int, method: str,
                 config: BudgetSearchConfig, history: list) -> dict[str, torch.Tensor]:
    units = relu_units(model)
    masks = [u.mask for u in units.values()]
    for m in masks:
        m.requires_grad_(True)
    if method == "autorep":
        for u in units.values():
            u.gate = "ste"
            with torch.no_grad():
                u.mask.clamp_(-config.score_clip, config.score_clip)
    opt = torch.optim.Adam([{"params": _weights(model), "lr": config.lr},
                            {"params": masks, "lr": config.mask_lr}], weight_decay=0.0)
    lam = config.snl_lambda
    gen = torch.Generator().manual_seed(config.seed)
    best_count, stall = float("inf"), 0
    cache: dict[int, torch.Tensor] = {}
    _train_mode(model, config)
    for epoch in range(config.epochs):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            x, y = batches[i]
            t = _teacher_logits(teacher, batches, i, cache)
            loss = kd_loss(model(x), t, y, config.kd_temperature, config.kd_alpha)
            if method == "snl":
                loss = loss + lam * _soft_count(units, hard=False) / total
            else:
                loss = loss + config.hinge_weight * F.relu(_soft_count(units, hard=True) - k) / total
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in masks:
                    if method == "snl":
                        m.clamp_(0.0, 1.0)
                    else:
                        m.clamp_(-config.score_clip, config.score_clip)
        with torch.no_grad():
            count = float(_soft_count(units, hard=(method == "autorep")))
        history.append({"phase": "search", "epoch": epoch, "count": count, "lambda": lam, "loss": float(loss.detach())})
        if count <= k:
            break
        if method == "snl":
            if count > best_count - 0.02 * (best_count - k if best_count != float("inf") else count):
                stall += 1
                if stall >= config.lambda_patience:
                    lam *= config.lambda_growth
                    stall = 0
            else:
                stall = 0
            best_count = min(best_count, count)
    model.eval()
    return {n: u.mask.detach().clone() for n, u in units.items()}
