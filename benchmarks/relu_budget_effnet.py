"""EfficientNet-Lite0 at 10 % of its ReLU6s, scored on views never used for calibration, search or fine-tuning.

Data split (scikit-image sample photos, the only real photos offline):

* **training images** (``TRAIN_IMAGES``): every view used for the mask search, BatchNorm recalibration
  and KD fine-tuning is an augmented view of one of them (random resized crop, horizontal flip,
  brightness / contrast / saturation jitter), generated with a fixed seed;
* **held-out images** (``HELD_OUT_IMAGES``: chelsea, coffee, the motorcycle, camera, coins): never
  seen before scoring; 18 fixed views each (centre crop and its flip, four corner crops at two
  scales and their flips);
* **new crops of the training images**: augmented views with another seed (same photos, crops not
  used in training): reported separately, because they share content with the training views.

Scores are against the original model: top-1 agreement, whether the original's top-1 is in the
student's top-5, the mean KL(original ‖ student) and the largest logit.

    python benchmarks/relu_budget.py --only-efficientnet      # writes relu_budget_efficientnet.json
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TRAIN_IMAGES = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo",
                "moon", "page", "text", "clock", "brick", "grass", "gravel", "cell")
HELD_OUT_IMAGES = ("chelsea", "coffee", "stereo_motorcycle", "camera", "coins")


# ------------------------------------------------------------------------------------------- views


def photo(name: str) -> torch.Tensor:
    """A scikit-image sample image as float (3, H, W) in [0, 1] (grey replicated, alpha dropped)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity): the left view only
        image = image[0]
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    if x.dim() == 2:
        x = x[..., None].expand(*x.shape, 3)
    return x[..., :3].permute(2, 0, 1).contiguous()


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5  # the TF normalisation EfficientNet-Lite was trained with (imagenet_batch's default)


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]


def augmented_views(names: Sequence[str], n: int, seed: int, size: int = 224) -> torch.Tensor:
    """``n`` augmented views (round robin over ``names``): random resized crop (area 20-100 %, aspect 3/4-4/3),
    flip with p = 0.5, brightness / contrast / saturation × U(0.8, 1.2); deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    photos = [photo(p) for p in names]
    u = lambda a, b: a + (b - a) * float(torch.rand((), generator=g))  # noqa: E731
    out = []
    for i in range(n):
        x = photos[i % len(photos)]
        h, w = x.shape[1:]
        for _ in range(10):
            area, ratio = u(0.2, 1.0) * h * w, math.exp(u(math.log(3 / 4), math.log(4 / 3)))
            ch, cw = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
            if ch <= h and cw <= w:
                break
        else:
            ch = cw = min(h, w)
        top, left = int(torch.randint(0, h - ch + 1, (), generator=g)), int(torch.randint(0, w - cw + 1, (), generator=g))
        v = _resize(x[:, top:top + ch, left:left + cw], (size, size))
        if float(torch.rand((), generator=g)) < 0.5:
            v = v.flip(-1)
        v = v * u(0.8, 1.2)
        mean = v.mean()
        v = (v - mean) * u(0.8, 1.2) + mean
        grey = v.mean(0, keepdim=True)
        v = (v - grey) * u(0.8, 1.2) + grey
        out.append(_norm(v.clamp(0, 1)))
    return torch.stack(out)


def fixed_views(names: Sequence[str], size: int = 224, shorts: Sequence[int] = (288, 320)) -> tuple[torch.Tensor, list[str]]:
    """Per image: the evaluation centre crop (shorter side 256) and its flip, then the four corner crops at each
    shorter side in ``shorts`` and their flips (2 + 8·len(shorts) views)."""
    out, labels = [], []
    for name in names:
        x = photo(name)
        h, w = x.shape[1:]
        for short in (round(size * 256 / 224), *shorts):
            s = short / min(h, w)
            hs, ws = max(size, round(h * s)), max(size, round(w * s))
            r = _resize(x, (hs, ws))
            if short == round(size * 256 / 224):
                where = {"center": ((hs - size) // 2, (ws - size) // 2)}
            else:
                where = {"top-left": (0, 0), "top-right": (0, ws - size), "bottom-left": (hs - size, 0),
                         "bottom-right": (hs - size, ws - size)}
            for flip in (False, True):
                for corner, (top, left) in where.items():
                    crop = _norm(r[:, top:top + size, left:left + size])
                    out.append(crop.flip(-1) if flip else crop)
                    labels.append(f"{name}/{short}/{corner}" + ("/flip" if flip else ""))
    return torch.stack(out), labels


# ------------------------------------------------------------------------------------------- scores


@torch.no_grad()
def logits_of(model: nn.Module, views: torch.Tensor, batch: int = 32) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(views[i:i + batch]) for i in range(0, len(views), batch)])
    model.train(was)
    return out


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, original top-1 within the student's top-5, mean KL(original ‖ student), max |logit|."""
    t1 = teacher.argmax(-1)
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return {"top1": float((student.argmax(-1) == t1).float().mean()),
            "top1_in_top5": float((student.topk(5, -1).indices == t1[:, None]).any(-1).float().mean()),
            "kl": float(kl), "logit_max_abs": float(student.abs().max()), "n": int(len(t1))}


@torch.no_grad()
def relu6_clip_report(model: nn.Module, views: torch.Tensor) -> dict[str, Any]:
    """How much of ReLU6's work is the upper clip: per site, the fraction of inputs above 6 and below 0 (original)."""
    from surgeon.ops.activation import MaskedReLU

    stats: dict[str, list[float]] = {}

    def rec(n: str, mod: MaskedReLU, x: torch.Tensor) -> None:
        stats.setdefault(n, [float((x > 6).float().mean()), float((x < 0).float().mean()), float(x.abs().max())])

    run_with_unit_inputs(model, views, rec)
    above = [v[0] for v in stats.values()]
    return {"sites": len(stats), "mean_fraction_above_6": float(np.mean(above)),
            "max_fraction_above_6": float(np.max(above)), "sites_with_over_1pct_above_6": int(sum(a > 0.01 for a in above)),
            "mean_fraction_below_0": float(np.mean([v[1] for v in stats.values()])),
            "per_site": {n: {"above_6": v[0], "below_0": v[1], "max_abs_input": v[2]} for n, v in stats.items()}}


@torch.no_grad()
def identity_input_scale(model: nn.Module, views: torch.Tensor) -> dict[str, float]:
    """Largest |input| reaching any identity (mask 0) element, by site (how far activations run away)."""
    from surgeon.ops.activation import MaskedReLU

    out: dict[str, float] = {}

    def rec(n: str, mod: MaskedReLU, x: torch.Tensor) -> None:
        off = (mod.mask_value(x.dtype) <= 0).expand_as(x[0])
        if bool(off.any()):
            out[n] = float(x.abs()[:, off].max())

    run_with_unit_inputs(model, views, rec)
    return out


def run_with_unit_inputs(model: nn.Module, views: torch.Tensor, record) -> None:
    """Run ``model`` on ``views`` calling ``record(name, unit, input)`` before every ReLU unit."""
    from surgeon.ops.activation import MaskedReLU

    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: record(n, mod, inp[0]))
             for n, m in model.named_modules() if isinstance(m, MaskedReLU)]
    try:
        logits_of(model, views)
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------------- the run


def _batches(views: torch.Tensor, size: int) -> list[tuple[torch.Tensor, None]]:
    return [(views[i:i + size], None) for i in range(0, len(views), size)]  # labels None: KD from the original only


def _scores(model: nn.Module, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, float]]:
    return {name: agreement(logits_of(model, v), t) for name, (v, t) in sets.items()}


def run_recipe(net: nn.Module, train: torch.Tensor, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
               budget: float = 0.1, method: str = "autorep", search_epochs: int = 2, finetune_steps: int = 300,
               batch: int = 16, lr: float = 1e-4, search_lr: float = 1e-5, mask_lr: float = 0.05,
               search_bn: str = "train", finetune_bn: str = "frozen", recalibrate: bool = True,
               temperature: float = 4.0, units: str = "identity", log: Any = print) -> dict[str, Any]:
    """Linearize to ``budget`` of the ReLU6s (channel masks), search on ``train``, recalibrate BN, KD fine-tune.

    ``sets``: named (views, original logits) to score after the search and after fine-tuning.
    Returns the scores, the recipe, timings and the linearized surgery (``"surgery"``, not JSON).
    """
    import surgeon
    from surgeon.passes import BudgetSearchConfig, LinearizeReLU, search_relu_budget
    from surgeon.passes.relu.budget import finetune

    t0 = time.perf_counter()
    recipe = {k: v for k, v in locals().items() if k in (
        "budget", "method", "search_epochs", "finetune_steps", "batch", "lr", "search_lr", "mask_lr", "search_bn",
        "finetune_bn", "recalibrate", "temperature", "units")}
    s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=budget, units=units), example_inputs=train[:2])
    batches = _batches(train, batch)
    cfg = BudgetSearchConfig(epochs=search_epochs, finetune_epochs=0, lr=search_lr, mask_lr=mask_lr, kd_alpha=1.0,
                             kd_temperature=temperature, bn_mode=search_bn, recalibrate_bn=recalibrate)
    r = search_relu_budget(s, batches, method=method, config=cfg)
    t_search = time.perf_counter() - t0
    searched = _scores(s.model, sets)
    log(f"  after search ({t_search:.0f} s): " + ", ".join(f"{k} top-1 {v['top1']:.3f}" for k, v in searched.items()))
    epochs = max(1, math.ceil(finetune_steps / len(batches))) if finetune_steps > 0 else 0
    ft_cfg = BudgetSearchConfig(finetune_epochs=epochs, finetune_lr=lr, kd_alpha=1.0, kd_temperature=temperature,
                                bn_mode=finetune_bn)
    t1 = time.perf_counter()
    teacher = copy.deepcopy(net).eval()
    hist = finetune(s.model, teacher, batches, ft_cfg) if epochs else []
    t_ft = time.perf_counter() - t1
    tuned = _scores(s.model, sets)
    log(f"  after fine-tuning ({t_ft:.0f} s, {epochs * len(batches)} steps): "
        + ", ".join(f"{k} top-1 {v['top1']:.3f}" for k, v in tuned.items()))
    return {"recipe": recipe, "kept": r.kept, "total": r.total, "budget": r.budget,
            "after_search": searched, "after_finetune": tuned, "finetune_steps": epochs * len(batches),
            "finetune_loss": [round(h["loss"], 4) for h in hist],
            "bn_recalibrated": [h for h in r.history if h["phase"] == "recalibrate_bn"],
            "search_seconds": t_search, "finetune_seconds": t_ft, "surgery": s}
