"""The training loop of both distillation stages, on ``accelerate``.

One process on CPU here; under ``accelerate launch`` each process takes its own micro-batches (a
fixed interleaving of one seeded global order) and gradients are averaged across processes before
every optimizer step, so the same code runs DDP unchanged (or, with ``DistillConfig(shard="fsdp")``, a
phase with a ``shard_root`` runs on FSDP2-sharded parameters: :mod:`surgeon.distill.sharding`).
Gradient accumulation, bf16 autocast, gradient clipping, AdamW with constant / cosine / plateau
schedules, tqdm progress, loss curves, and checkpoints that resume *exactly*: trainable tensors,
optimizer and scheduler state, every RNG and the data position (a pure function of the step) are
saved, and a resumed run repeats the uninterrupted one bit for bit.

Example:
    >>> order = DataOrder(n_items=5, batch_size=2, seed=0)
    >>> [order.micro_batch(g) for g in range(3)]   # a seeded permutation per epoch, never a repeat within one
    [[4, 0], [1, 3], [2, 0]]
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from surgeon.distill.config import DistillConfig
from surgeon.core.errors import ConfigError, SurgeonError

CHECKPOINT_FORMAT = 1


class DistillError(SurgeonError):
    """Distillation stopped (non-finite loss or gradients); the message names the layer and the last checkpoint."""


# -- accelerate ---------------------------------------------------------------------------------
def make_accelerator(mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` (CPU when no GPU). In a single plain process a differently configured
    earlier Accelerator is reset first (accelerate keeps one global state per process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = not torch.cuda.is_available()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


# -- data order ----------------------------------------------------------------------------------
@dataclass
class DataOrder:
    """Which items make global micro-batch ``g`` on process ``rank``: a pure function of (seed, g), so the
    data position of a resumed run is just its step count."""

    n_items: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    _perms: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_items, generator=g).tolist()}
        return self._perms[epoch]

    def micro_batch(self, g: int) -> list[int]:
        first = (g * self.world + self.rank) * self.batch_size
        out = []
        for j in range(first, first + self.batch_size):
            out.append(self._perm(j // self.n_items)[j % self.n_items])
        return out


# -- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- optimizer / scheduler ---------------------------------------------------------------------------
def make_optimizer(params: list[nn.Parameter], lr: float, config: DistillConfig, total_steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    warm = config.warmup_steps
    if config.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=10, min_lr=lr * 1e-3)
    elif config.scheduler == "cosine":
        def f(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


# -- checkpoints ----------------------------------------------------------------------------------
def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class Checkpoints:
    """``ckpt-000123.pt`` files in one folder, written atomically; the newest ``keep`` are kept."""

    def __init__(self, directory: str | None, keep: int, identity: dict[str, Any], is_main: bool = True) -> None:
        self.dir = Path(directory) if directory else None
        self.keep = keep
        self.identity = identity
        self.is_main = is_main
        self.counter = 0
        self.last_path: Path | None = None
        if self.dir is not None and self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            existing = self.list()
            if existing:
                self.counter = int(existing[-1].stem.split("-")[1])
                self.last_path = existing[-1]

    def list(self) -> list[Path]:
        if self.dir is None or not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("ckpt-*.pt"))

    def save(self, payload: dict[str, Any]) -> Path | None:
        if self.dir is None or not self.is_main:
            return None
        self.counter += 1
        path = self.dir / f"ckpt-{self.counter:06d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"format": CHECKPOINT_FORMAT, **self.identity, **payload}, tmp)
        os.replace(tmp, path)
        self.last_path = path
        for old in self.list()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        files = self.list()
        if not files:
            return None
        data = torch.load(files[-1], weights_only=False)
        self.check(data, files[-1])
        return data

    def check(self, data: dict[str, Any], path: Path) -> None:
        if data.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not a surgeon distillation checkpoint (format {data.get('format')!r}); "
                              "point checkpoint_dir at a folder written by surgeon.distill")
        diffs = []
        mine, theirs = self.identity["config"], data.get("config", {})
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                diffs.append(f"{key}: checkpoint {theirs.get(key)!r} vs now {mine.get(key)!r}")
        for key, what in (("model", "model (linearized layers / new parameters)"), ("data", "training data")):
            if self.identity[key] != data.get(key):
                diffs.append(f"{what} differs (checkpoint {data.get(key)} vs now {self.identity[key]})")
        if diffs:
            raise ConfigError(f"cannot resume from {path}: it was written for a different configuration:\n  "
                              + "\n  ".join(diffs) + "\nresume with the same settings, or start fresh in another "
                              "checkpoint_dir (or with resume=False); nothing was changed")


# -- the loop ----------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One optimisation run: a stage-1 layer block, the joint stage 1, or stage 2."""

    stage: str                      # "transfer" | "lora"
    index: int                      # block index within the stage
    name: str                       # for progress / errors, e.g. "layers 3-5"
    params: list[nn.Parameter]
    n_items: int
    loss_fn: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
    lr: float
    steps: int
    tokens_per_item: int
    locate_nan: Callable[[dict[str, float]], str] | None = None
    stopping: "EarlyStopping | None" = None
    shard_root: nn.Module | None = None  # with DistillConfig(shard="fsdp"): the module sharded for this phase


@dataclass
class EarlyStopping:
    """Stop a phase when its held-out loss plateaus, and keep the best parameters seen.

    ``validate()`` returns the held-out loss (no gradients); it runs every ``every`` optimizer steps.
    The phase stops after ``patience`` checks without a relative improvement of ``min_delta``; the
    parameters of the best check are restored at the end whatever stopped the phase.

    Example:
        >>> stop = EarlyStopping(validate=lambda: 1.0, every=5, patience=2)
        >>> [stop.observe(v, []) for v in (1.0, 0.9, 0.899, 0.9)], stop.best
        ([False, False, False, True], 0.899)
    """

    validate: Callable[[], float]
    every: int = 10
    patience: int = 3
    min_delta: float = 0.01
    best: float = math.inf
    reference: float = math.inf      # the last value that improved by min_delta
    first: float | None = None
    checks: list[float] = field(default_factory=list)
    _stale: int = 0
    _best_params: list[torch.Tensor] | None = None

    def observe(self, value: float, params: list[nn.Parameter]) -> bool:
        """Record one held-out loss; True when the phase should stop (plateau)."""
        self.checks.append(value)
        if self.first is None:
            self.first = value
        if value < self.best:
            self.best = value
            self._best_params = [p.detach().clone() for p in params]
        if value < self.reference * (1 - self.min_delta) or self.reference == math.inf:
            self.reference, self._stale = value, 0
        else:
            self._stale += 1
        return self._stale >= self.patience

    def restore_best(self, params: list[nn.Parameter]) -> None:
        if self._best_params is not None:
            with torch.no_grad():
                for p, b in zip(params, self._best_params):
                    p.copy_(b)


@dataclass
class PhaseResult:
    steps_done: int
    stopped_early: bool          # at the deadline (time budget), before converging
    seconds: float
    tokens: int
    converged: bool = False      # the held-out loss plateaued (early stopping)
    heldout: list[float] = field(default_factory=list)


def run_phase(phase: Phase, config: DistillConfig, accelerator, ckpts: Checkpoints, history: list[dict[str, Any]],
              save_state: Callable[[], dict[str, Any]], resume: dict[str, Any] | None = None,
              deadline: float | None = None, callbacks: Iterable[Callable[[dict[str, Any]], None]] = ()
              ) -> PhaseResult:
    """Run ``phase.steps`` optimizer steps (or until ``deadline``), checkpointing and logging as configured.

    With ``config.shard == "fsdp"``, several processes and a ``phase.shard_root``, the phase runs on
    FSDP-sharded parameters (``surgeon.distill.sharding``); otherwise every process holds the whole model
    and gradients are all-reduced here."""
    args = (config, accelerator, ckpts, history, save_state, resume, deadline, callbacks)
    if getattr(config, "shard", None) != "fsdp" or phase.shard_root is None or accelerator.num_processes == 1:
        return _run_phase(phase, *args)
    from dataclasses import replace

    from surgeon.distill.sharding import ShardedParameters

    with ShardedParameters(phase.shard_root, phase.params, accelerator.device.type) as params:
        return _run_phase(replace(phase, params=params), *args, sharded=True)


def _run_phase(phase: Phase, config: DistillConfig, accelerator, ckpts: Checkpoints, history: list[dict[str, Any]],
               save_state: Callable[[], dict[str, Any]], resume: dict[str, Any] | None = None,
               deadline: float | None = None, callbacks: Iterable[Callable[[dict[str, Any]], None]] = (),
               sharded: bool = False) -> PhaseResult:
    start = time.perf_counter()
    order = DataOrder(phase.n_items, config.batch_size, config.seed + 7919 * phase.index,
                      accelerator.process_index, accelerator.num_processes)
    opt, sched = make_optimizer(phase.params, phase.lr, config, phase.steps)
    step = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        step = resume["step"]
    first_step = step
    accum = config.grad_accum
    tokens_per_step = phase.tokens_per_item * config.batch_size * accum * accelerator.num_processes
    bar = _progress(phase, config, accelerator, step, deadline)
    stopped = converged = False
    stopping = phase.stopping
    if stopping is not None and resume is None:
        stopping.observe(stopping.validate(), phase.params)

    def checkpoint() -> Path | None:
        if sharded:              # DistillConfig refuses checkpoint_dir with shard: nothing would be written
            return None
        return ckpts.save({**save_state(), "phase": (phase.stage, phase.index), "step": step,
                           "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                           "history": history})

    try:
        while step < phase.steps:
            if deadline is not None and time.perf_counter() > deadline:
                stopped = True
                break
            total = 0.0
            parts_sum: dict[str, float] = {}
            for micro in range(accum):
                items = order.micro_batch(step * accum + micro)
                with accelerator.autocast():
                    loss, parts = phase.loss_fn(items)
                if not torch.isfinite(loss.detach()).all():
                    _stop_non_finite(phase, step, parts, ckpts, "loss")
                accelerator.backward(loss / accum)
                total += float(loss.detach()) / accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / accum
            if accelerator.num_processes > 1:
                if not sharded:          # FSDP has already reduce-scattered (averaged) the sharded gradients
                    for p in phase.params:
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                total = float(accelerator.reduce(torch.tensor(total, device=accelerator.device), reduction="mean"))
            if sharded and all(p.grad is None for p in phase.params):
                raise DistillError(f"{phase.name}: with shard='fsdp' no gradient reached the sharded parameters "
                                   "(FSDP reduces gradients in hooks on its modules' outputs, so the loss must be "
                                   "computed from the model's output); run this phase with shard=None")
            bad = _non_finite_grads(phase.params, accelerator) if sharded else \
                [i for i, p in enumerate(phase.params) if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad:
                _stop_non_finite(phase, step, parts_sum, ckpts, "gradient", grad_param=bad[0])
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(phase.params, config.max_grad_norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(total)
            else:
                sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % config.log_every == 0 or step == phase.steps:
                history.append({"stage": phase.stage, "phase": phase.index, "step": step, "loss": total, "lr": lr,
                                "tokens": step * tokens_per_step, **{f"loss/{k}": v for k, v in parts_sum.items()}})
            if bar is not None:
                bar.update()
                if deadline is not None:
                    fit_total_to_budget(bar, step - first_step, time.perf_counter() - start, deadline, phase.steps)
                bar.set_postfix_str(f"loss {total:.4g}")
            info = {"stage": phase.stage, "phase": phase.index, "step": step, "loss": total}
            if step % config.checkpoint_every == 0 or step == phase.steps:
                checkpoint()
            for cb in callbacks:
                cb(info)
            if stopping is not None and step % stopping.every == 0:
                value = stopping.validate()
                history.append({"stage": phase.stage, "phase": phase.index, "step": step, "heldout": value})
                if bar is not None:
                    bar.set_postfix_str(f"loss {total:.4g}, held-out {value:.4g}")
                if stopping.observe(value, phase.params):
                    converged = True
                    break
    finally:
        if bar is not None:
            bar.close()
    if stopping is not None:
        if not converged and step % stopping.every:
            stopping.observe(stopping.validate(), phase.params)
        stopping.restore_best(phase.params)
    return PhaseResult(step, stopped, time.perf_counter() - start, step * tokens_per_step, converged,
                       list(stopping.checks) if stopping is not None else [])


def _non_finite_grads(params: list[nn.Parameter], accelerator) -> list[int]:
    """Indices of parameters with a non-finite gradient anywhere (each process checks its shards, all agree)."""
    flags = torch.tensor([0.0 if p.grad is None or torch.isfinite(p.grad.to_local()).all() else 1.0
                          for p in params], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    return [i for i, f in enumerate(flags.tolist()) if f > 0]


def nan_locator(model: nn.Module, ids_fn: Callable[[], torch.Tensor]) -> Callable[[dict], str | None]:
    """Re-run the failing batch with hooks; the first attention / decoder layer whose output is not finite."""
    def locate(_: dict) -> str | None:
        units = [n for n, m in model.named_modules() if n.endswith(("self_attn", "attn", "attention"))
                 or n.rpartition(".")[2].isdigit()]
        found: list[str] = []
        hooks = []
        mods = dict(model.named_modules())

        def hook_for(name):
            def hook(module, args, out):
                t = out[0] if isinstance(out, tuple) else out
                if not found and isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
                    found.append(name)
            return hook

        for n in units:
            hooks.append(mods[n].register_forward_hook(hook_for(n)))
        try:
            with torch.no_grad():
                model(input_ids=ids_fn(), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return found[0] if found else None

    return locate


def _progress(phase: Phase, config: DistillConfig, accelerator, initial: int, deadline: float | None = None):
    if not config.progress or not accelerator.is_main_process:
        return None
    from tqdm.auto import tqdm

    label = "attention transfer" if phase.stage == "transfer" else "KD (stage 2)"
    budget = "" if deadline is None else f", budget {max(deadline - time.perf_counter(), 0) / 60:.1f} min"
    cap = "≤ " if phase.stopping is not None or deadline is not None else ""
    return tqdm(total=phase.steps, initial=initial, desc=f"{label} ({phase.name}{budget}, {cap}{phase.steps} steps)",
                unit="step", leave=False)


def fit_total_to_budget(bar: Any, steps_taken: int, seconds: float, deadline: float, cap: int) -> None:
    """Under a time budget, the bar's total becomes the steps the budget allows at the pace measured so
    far (never above the step cap), so its count and time left show the budget, not the cap.

    Example:
        >>> from types import SimpleNamespace
        >>> bar = SimpleNamespace(n=10, total=10_000, refresh=lambda: None)
        >>> fit_total_to_budget(bar, 10, 5.0, time.perf_counter() + 5.0, 10_000)   # 0.5 s a step, 5 s left
        >>> bar.total
        20
    """
    if steps_taken < 1:
        return
    left = max(deadline - time.perf_counter(), 0.0)
    bar.total = max(bar.n, min(cap, bar.n + round(left * steps_taken / max(seconds, 1e-9))))
    bar.refresh()


def _stop_non_finite(phase: Phase, step: int, parts: dict[str, float], ckpts: Checkpoints, what: str,
                     grad_param: int | None = None) -> None:
    where = None
    bad = [k for k, v in parts.items() if not math.isfinite(v)]
    if bad:
        where = bad[0]
    elif phase.locate_nan is not None:
        where = phase.locate_nan(parts)
    if where is None and grad_param is not None:
        where = f"parameter #{grad_param} of {phase.name}"
    last = (f"the last good checkpoint is {ckpts.last_path}" if ckpts.last_path is not None else
            "no checkpoint was written yet (set checkpoint_dir to keep one)")
    for p in phase.params:
        p.grad = None
    raise DistillError(
        f"{'attention transfer' if phase.stage == 'transfer' else 'LoRA distillation'} ({phase.name}): {what} is "
        f"not finite at step {step + 1}{f' in {where}' if where else ''}. Training stopped before this step was "
        f"applied, so the model holds the parameters after step {step}; {last}. Lower the learning rate, use "
        "mixed_precision='no', or check that layer's inputs.")


def save_curves(history: list[dict[str, Any]], directory: str | Path, title: str = "surgeon distill") -> dict[str, str]:
    """Write ``loss_curves.json`` and ``loss_curves.png`` (one panel per stage) under ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_curves.json").write_text(json.dumps(history, indent=1))
    paths = {"json": str(out / "loss_curves.json")}
    stages = [s for s in ("transfer", "lora") if any(h["stage"] == s for h in history)]
    if not stages:
        return paths
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [h for h in history if h["stage"] == stage]
        if stage == "transfer":
            keys = sorted({k for h in rows for k in h if k.startswith("loss/")}, key=_layer_key)
            for k in keys:
                pts = [(h["step"], h[k]) for h in rows if k in h]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=k[5:])
            ax.set_yscale("log")
            ax.set_title("stage 1: attention-transfer MSE per layer")
            if len(keys) <= 12:
                ax.legend(fontsize=6)
        else:
            ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], lw=0.8)
            ax.set_title("stage 2: LoRA distillation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    paths["png"] = str(out / "loss_curves.png")
    return paths


def _layer_key(key: str) -> tuple[int, str]:
    digits = "".join(ch for ch in key if ch.isdigit())
    return (int(digits) if digits else -1, key)


@contextlib.contextmanager
def nullcontext():
    yield


__all__ = ["DistillError", "make_accelerator", "DataOrder", "Checkpoints", "Phase", "EarlyStopping", "run_phase",
           "nan_locator",
           "save_curves",
           "seed_everything", "rng_state", "set_rng_state"]
