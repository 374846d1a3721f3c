"""``surgeon.apply``: plan every pass, then rewrite, transactionally, and record a recipe.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> surgery = surgeon.apply(net, LinearizeReLU(granularity="layer"))
    >>> [e.pass_name for e in surgery.recipe.entries]
    ['LinearizeReLU']
    >>> x = torch.randn(3, 4); torch.equal(surgery.model(x), net(x))
    True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from surgeon.core.config import PassConfig
from surgeon.costs.macs import ModelCosts, measure
from surgeon.core.errors import ConfigError, RewriteError, SurgeonError
from surgeon.core.handler import PassContext, handler_for
from surgeon.core.recipe import Recipe, RecipeEntry, describe_inputs, fingerprint
from surgeon.core.report import Report, ReportGroup
from surgeon.core.sites import Site
from surgeon.core.transaction import ModelSnapshot


@dataclass
class Surgery:
    """The result of ``surgeon.apply``: the rewritten model, what was done (recipe) and a report."""

    model: nn.Module
    recipe: Recipe
    report: ReportGroup
    example_inputs: tuple[Any, ...] | None = None
    costs_before: ModelCosts | None = None
    history: list[Report] = field(default_factory=list)


def _as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _expects(module: nn.Module) -> str:
    """What ``module`` takes, in words (the shape a wrongly shaped input should have had)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = ", ".join(["N", str(module.in_channels)] + ["*"] * len(module.kernel_size))
        return f"{module.in_channels} input channels: ({dims})"
    if isinstance(module, nn.Linear):
        return f"a last dimension of {module.in_features}: (..., {module.in_features})"
    if isinstance(module, nn.Embedding):
        return f"integer token ids in [0, {module.num_embeddings})"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"{module.num_features} channels: (N, {module.num_features}, ...)"
    if isinstance(module, nn.LayerNorm):
        return f"trailing dimensions {tuple(module.normalized_shape)}"
    return "inputs of another shape or dtype"


def _describe(inputs: tuple[Any, ...]) -> str:
    return ", ".join(f"input {i}: {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor)
                     else f"input {i}: {type(x).__name__}" for i, x in enumerate(inputs))


def _check_inputs(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, ``no_grad``; modes and buffers left as they were); if it
    fails, a :class:`ConfigError` names the module that refused them and what that module takes."""
    names = {m: n or type(model).__name__ for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    hooks = [h for m in names for h in (m.register_forward_pre_hook(lambda m, a: stack.append(m)),
                                        m.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))]
    modes = {m: m.training for m in names}
    buffers = _buffers(model)
    try:
        _set_training(model, False)
        with torch.no_grad():
            model(*inputs)
    except SurgeonError:
        raise
    except Exception as e:                       # the module that was running when it failed: stack[-1]
        where = stack[-1] if stack else model
        raise ConfigError(f"example_inputs do not fit the model ({_describe(inputs)}): module {names[where]!r} "
                           f"({type(where).__name__}) expects {_expects(where)} and raised {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]}. Pass example_inputs shaped as the model takes them; "
                           "the model was not changed") from e
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            _set_training(m, mode, recurse=False)
        _restore_buffers(model, buffers)


def _set_training(module: nn.Module, mode: bool, recurse: bool = True) -> None:
    """Set the ``training`` flag directly: graphs from ``torch.export`` refuse ``train()`` / ``eval()``
    (NotImplementedError), and the flag is all those calls change on the modules a check runs."""
    for m in (module.modules() if recurse else (module,)):
        m.training = mode


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back buffers (BatchNorm statistics) a failed forward in training mode may have updated."""
    with torch.no_grad():
        for k, v in model.named_buffers():
            if k in saved and v.shape == saved[k].shape:
                v.copy_(saved[k])


def _summary(before: ModelCosts, after: ModelCosts) -> Report:
    rows = []
    for key in ("params", "macs", "relu_count", "relu_sites"):
        b, a = getattr(before, key), getattr(after, key)
        rows.append({"metric": key, "before": b, "after": a,
                     "change": (a - b) if isinstance(a, int) and isinstance(b, int) else None})
    return Report("model (per example)", ["metric", "before", "after", "change"], rows)


def apply(
    model: nn.Module | Surgery,
    *passes: PassConfig,
    example_inputs: Any = None,
    inplace: bool = False,
    recorded: Sequence[Sequence[Site]] | None = None,
) -> Surgery:
    """Apply ``passes`` in order and return a :class:`Surgery`.

    Args:
        model: an ``nn.Module``, or a previous ``Surgery`` to continue (its recipe is extended).
        passes: pass configs (``LinearizeReLU(...)``, ...).
        example_inputs: a tensor or tuple; needed by passes that size things from shapes.
        inplace: rewrite ``model`` itself (rolled back exactly if any pass fails) instead of a copy.
        recorded: per pass, the sites a recipe recorded (used by ``surgeon.restore``).

    Nothing is changed if any pass fails: the error is raised and the model is as it was.
    """
    previous = model if isinstance(model, Surgery) else None
    if previous is not None:
        model = previous.model
        if example_inputs is None:
            example_inputs = previous.example_inputs
    if not isinstance(model, nn.Module):
        raise ConfigError(f"surgeon.apply needs a torch.nn.Module, got {type(model).__name__}")
    if not passes:
        raise ConfigError("surgeon.apply needs at least one pass, e.g. surgeon.apply(model, LinearizeReLU())")
    for p in passes:
        handler_for(p)
        p.validate()
    if recorded is not None and len(recorded) != len(passes):
        raise ConfigError(f"recorded sites given for {len(recorded)} passes but {len(passes)} passes")
    inputs = _as_inputs(example_inputs)

    recipe = copy.deepcopy(previous.recipe) if previous else Recipe(base=fingerprint(model))
    if recipe.example_inputs is None:
        recipe.example_inputs = describe_inputs(inputs)
    if inputs is not None and previous is None:
        _check_inputs(model, inputs)
    before = previous.costs_before if previous else measure(model, inputs)
    history = list(previous.history) if previous else []

    work = model if inplace else copy.deepcopy(model)
    snapshots: list[ModelSnapshot] = []  # in place: one per pass, values only of what it touches
    try:
        for i, p in enumerate(passes):
            handler = handler_for(p)
            ctx = PassContext(example_inputs=inputs,
                              recorded_sites=list(recorded[i]) if recorded is not None else None)
            if inplace:
                snapshots.append(ModelSnapshot(work, touched=[]))  # structure only: plan changes nothing
            plan = handler.plan(work, p, ctx)
            if inplace:
                snapshots[-1].copy_values(handler.touched(work, p, plan))
            work = handler.rewrite(work, p, plan, ctx)
            recipe.entries.append(RecipeEntry(p.pass_name, p.to_dict(), plan.sites))
            history.append(handler.report(work, p, plan, ctx))
    except BaseException as e:
        for snapshot in reversed(snapshots):
            snapshot.rollback()
        if isinstance(e, SurgeonError) or not isinstance(e, Exception):
            raise
        raise RewriteError(
            f"{type(p).__name__} failed while rewriting ({type(e).__name__}: {e}); "
            f"the model was left unchanged"
        ) from e
    after = measure(work, inputs)
    report = ReportGroup("surgery", history + [_summary(before, after)])
    return Surgery(work, recipe, report, inputs, before, history)

