"""BatchNorm statistics after linearization: keep every channel at the original model's scale.

Removing a ReLU (or a ReLU6, whose clip at 6 also goes) changes the distribution every later
BatchNorm sees; its running statistics still describe the original network, so activations drift,
and in deep narrow nets (EfficientNet-Lite0 at 10 % of its ReLU6s) they compound to logits of 1e6.
:func:`recalibrate_batchnorm` re-estimates the running mean/variance *relative to the original*:
for each BatchNorm, in execution order and with every upstream correction already in effect, it
sets the statistics so that the normalised output has, per channel, the mean and variance the
original model's normalised output has on the same data. Where nothing upstream changed the
statistics are left exactly as they were, so the pass is a no-op on an unmodified model (unlike a
plain re-estimation, which would replace the pretrained statistics with those of a few batches).

:func:`freeze_batchnorm` puts BatchNorm layers in eval mode (use the running statistics, do not
update them): fine-tuning then trains the model that is evaluated, not a batch-statistics variant.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU
    >>> from surgeon.passes.relu.budget import relu_units
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3),
    ...                     nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)).eval()
    >>> x = 20 * torch.randn(32, 3, 10, 10)
    >>> s = surgeon.apply(net, LinearizeReLU(granularity="layer"), example_inputs=x[:2])
    >>> recalibrate_batchnorm(s.model, [x])              # masks at 1: nothing to correct
    {'1': 1.0, '4': 1.0, '7': 1.0}
    >>> for u in relu_units(s.model).values(): _ = u.mask.data.zero_()    # remove every ReLU6
    >>> before = s.model(x).std().item() / net(x).std().item()
    >>> ratio = recalibrate_batchnorm(s.model, [x])["4"]  # 2nd BN's input std / the original's
    >>> after = s.model(x).std().item() / net(x).std().item()
    >>> ratio > 3, before > 3, round(after, 2)          # output scale: 3.7x the original, then 1.0x
    (True, True, 1.0)
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from surgeon.core.errors import ConfigError
from surgeon.ops.activation import MaskedReLU

_BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> dict[str, _BN]:
    """BatchNorm layers that track running statistics, by module path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None}


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm in eval mode (running statistics used and kept); returns how many."""
    bns = batchnorms(model)
    for m in bns.values():
        m.eval()
    return len(bns)


def _inputs(data: Any, max_samples: int) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        data = [data]
    xs, n = [], 0
    for b in data:
        x = b if isinstance(b, torch.Tensor) else b[0]
        xs.append(x[: max_samples - n])
        n += xs[-1].shape[0]
        if n >= max_samples:
            break
    if not xs:
        raise ConfigError("recalibrate_batchnorm: no calibration data was given (pass a list of input batches)")
    return torch.cat(xs)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def original_of(model: nn.Module) -> nn.Module:
    """A copy of a linearized model with every ``MaskedReLU`` mask at 1: the original network."""
    units = [m for m in model.modules() if isinstance(m, MaskedReLU)]
    if not units:
        raise ConfigError("recalibrate_batchnorm: the model has no MaskedReLU units (apply LinearizeReLU first) "
                          "and no teacher was given; pass teacher=<the original model>")
    teacher = copy.deepcopy(model)
    for u in teacher.modules():
        if isinstance(u, MaskedReLU):
            u.gate = None
            u.mask.data = torch.ones_like(u.mask)
    return teacher.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable[Any] | torch.Tensor, teacher: nn.Module | None = None,
                          max_samples: int = 64, eps: float = 1e-12) -> dict[str, float]:
    """Match every BatchNorm's normalised output statistics to ``teacher``'s on ``data``; in place.

    ``teacher`` (default: ``model`` with every mask at 1, i.e. the original) must have BatchNorm
    layers at the same module paths. Up to ``max_samples`` inputs of ``data`` (tensors or
    (inputs, labels) batches) run as one batch, so that each layer is corrected with the ones before
    it already corrected. Returns per BatchNorm the input standard-deviation ratio model / teacher
    (mean over channels; 1.0 where nothing upstream changed).
    """
    bns = batchnorms(model)
    if not bns:
        raise ConfigError(f"recalibrate_batchnorm: {type(model).__name__} has no BatchNorm layer with running "
                          "statistics; nothing to recalibrate")
    teacher = original_of(model) if teacher is None else teacher
    ref = batchnorms(teacher)
    missing = sorted(set(bns) - set(ref))
    if missing:
        raise ConfigError(f"recalibrate_batchnorm: the teacher has no BatchNorm at {missing[:3]}; pass a teacher "
                          "with the model's module paths (e.g. the linearized model with every mask at 1)")
    x = _inputs(data, max_samples)
    target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, inp: tuple) -> None:  # a pre-hook's return value would replace the input
        target.setdefault(name, _channel_stats(inp[0]))

    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: record(n, inp)) for n, m in ref.items() if n in bns]
    was_t = teacher.training
    try:
        teacher.eval()
        teacher(x)
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_t)
    ratios: dict[str, float] = {}

    def correct(name: str, bn: _BN, inp: tuple) -> None:
        if name in ratios or name not in target:
            return
        mu_s, var_s = _channel_stats(inp[0])
        mu_t, var_t = target[name]
        r = ref[name]
        rv_t, rm_t = r.running_var.double(), r.running_mean.double()
        exact = torch.equal(mu_s, mu_t) and torch.equal(var_s, var_t)
        if exact:  # inputs unchanged: the original statistics, bit for bit
            bn.running_var.copy_(r.running_var)
            bn.running_mean.copy_(r.running_mean)
        else:  # (x_s − rm) / √(rv + ε) gets the mean and variance of (x_t − rm_t) / √(rv_t + ε)
            e = max(eps, float(bn.eps))  # a channel constant in the teacher: no scale blow-up
            q = (var_s + e) / (var_t + e)
            rv = (rv_t + bn.eps) * q - bn.eps
            rm = mu_s - (mu_t - rm_t) * torch.sqrt(q)
            bn.running_var.copy_(rv.to(bn.running_var.dtype))
            bn.running_mean.copy_(rm.to(bn.running_mean.dtype))
        ratios[name] = 1.0 if exact else float(torch.sqrt(q).mean())

    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: correct(n, mod, inp)) for n, m in bns.items()]
    was = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return ratios
