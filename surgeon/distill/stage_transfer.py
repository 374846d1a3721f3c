"""Stage 1, attention transfer: train each linearized layer's new parameters to reproduce its softmax output.

Layer (or block) mode trains on the layer inputs cached from the teacher-forced model, one block
at a time, and stops each block when its held-out transfer MSE plateaus (early stopping on a
held-out slice of the cached inputs, the best parameters kept). Time goes to layers by how far they
are from converged: the budget left is shared among the remaining blocks in proportion to their
transfer error before training, and what a block that converges early does not use goes to the
next ones. Joint mode trains every layer together from one model forward per step.

Example (how the budget left is shared: by transfer error before training, relative to the mean):
    >>> blocks = [[("a", None)], [("b", None)], [("c", None)]]
    >>> [round(w, 2) for w in block_weights(blocks, {"a": 1.0, "b": 3.0, "c": 0.0})]
    [0.75, 2.25, 0.25]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from surgeon.distill.config import DistillConfig
from surgeon.distill.engine import EarlyStopping, Phase, nan_locator, run_phase
from surgeon.distill.transfer import LayerInputs, cache_bytes_per_pack, new_parameters, pair_mse, set_transfer

Units = list[tuple[str, nn.Module]]


@dataclass
class TransferRun:
    """What stage 1 reports per block: steps, held-out curve, whether it converged or hit its budget."""

    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: int = 0
    tokens_per_layer: int = 0
    stopped_at_budget: bool = False


def blocks_of(units: Units, config: DistillConfig) -> list[Units]:
    """The training blocks: every unit together (joint), ``block_size`` layers, or one layer each."""
    if config.transfer_mode == "joint":
        return [units]
    k = config.block_size if config.transfer_mode == "block" else 1
    return [units[i:i + k] for i in range(0, len(units), k)]


def block_name(block: Units) -> str:
    ids = [u.layer_idx for _, u in block]
    return f"layer {ids[0]}" if len(ids) == 1 else f"layers {ids[0]}-{ids[-1]}"


def share_deadline(config: DistillConfig, start: float, weights: list[float], now: float) -> float | None:
    """The deadline of the next block: its weight's share of the budget left (``weights``: remaining blocks, next first)."""
    if config.max_minutes is None:
        return None
    left = max(0.0, start + config.max_minutes * 60 - now)
    return now + left * weights[0] / max(sum(weights), 1e-30)


def block_weights(blocks: list[Units], errors: dict[str, float]) -> list[float]:
    """How far each block is from converged: its transfer error before training, relative to the mean, in [¼, 4]."""
    raw = [sum(errors.get(n, 0.0) for n, _ in b) / len(b) for b in blocks]
    mean = sum(raw) / len(raw) if raw and sum(raw) > 0 else 1.0
    return [min(max(r / mean, 0.25), 4.0) for r in raw]


def run_transfer(model: nn.Module, units: Units, packs: torch.Tensor, config: DistillConfig, accelerator, ckpts,
                 history: list[dict[str, Any]], save_state: Callable[[], dict[str, Any]],
                 position: Callable[[str, int], str], ck: dict[str, Any] | None, errors_before: dict[str, float],
                 callbacks, device: torch.device) -> TransferRun:
    """Run stage 1 in the configured mode; the trained parameters stay in ``model``."""
    run = TransferRun()
    set_transfer(model, True)
    try:
        if config.transfer_mode == "joint":
            _joint(model, units, packs, config, accelerator, ckpts, history, save_state, position, ck, callbacks,
                   device, run)
        else:
            _layerwise(model, units, packs, config, accelerator, ckpts, history, save_state, position, ck,
                       errors_before, callbacks, device, run)
    finally:
        set_transfer(model, False)
    return run


def _joint(model, units, packs, config, accelerator, ckpts, history, save_state, position, ck, callbacks, device,
           run: TransferRun) -> None:
    start = time.perf_counter()

    def loss_fn(items):
        model(input_ids=packs[items].to(device), use_cache=False)
        losses = {f"layer {u.layer_idx}": pair_mse(u) for _, u in units}
        return config.mse_weight * torch.stack(list(losses.values())).mean(), \
            {k: float(v.detach()) for k, v in losses.items()}

    pos = position("transfer", 0)
    if pos == "done":
        return
    params = [p for _, u in units for p in new_parameters(u).values()]
    for p in params:
        p.requires_grad_(True)
    phase = Phase("transfer", 0, f"all {len(units)} layers", params, packs.shape[0], loss_fn, config.transfer_lr,
                  config.transfer_steps, config.seq_len, locate_nan=nan_locator(model, lambda: packs[:1].to(device)))
    res = run_phase(phase, config, accelerator, ckpts, history, save_state, resume=ck if pos == "resume" else None,
                    deadline=share_deadline(config, start, [1.0], time.perf_counter()), callbacks=callbacks)
    for p in params:
        p.requires_grad_(False)
    run.stopped_at_budget = res.stopped_early
    run.tokens = res.tokens


def _layerwise(model, units, packs, config, accelerator, ckpts, history, save_state, position, ck, errors_before,
               callbacks, device, run: TransferRun) -> None:
    start = time.perf_counter()
    blocks = blocks_of(units, config)
    per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    n_items = min(config.transfer_packs or config.transfer_steps * per_step, packs.shape[0])
    n_val = max(1, round(n_items * config.transfer_heldout)) if n_items >= 2 else 0
    train_ids = list(range(n_val, n_items))
    val_ids = list(range(n_val))
    stage_packs = packs[:n_items]
    per_pack = cache_bytes_per_pack(model, config.seq_len)
    group = max(1, int(config.cache_gb * 2**30 // max(1, per_pack * n_items * 2)))  # ×2: q/k/v temporaries
    todo = [i for i in range(len(blocks)) if position("transfer", i) != "done"]
    weights = dict(zip(range(len(blocks)), block_weights(blocks, errors_before)))
    inputs = LayerInputs()
    done_steps = 0
    captured = 0.0          # seconds spent capturing layer inputs: on top of the training budget
    while todo:
        chosen, count = [], 0           # capture the inputs of as many upcoming blocks as fit in cache_gb
        for i in todo:
            if chosen and count + len(blocks[i]) > group:
                break
            chosen.append(i)
            count += len(blocks[i])
        inputs.clear()
        began = time.perf_counter()
        inputs.capture(model, [u for i in chosen for u in blocks[i]], stage_packs, max(config.batch_size, 4))
        captured += time.perf_counter() - began
        set_transfer(model, True)
        for i in chosen:
            block = blocks[i]
            pos = position("transfer", i)

            def block_loss(ids, block=block):
                losses = {}
                for name, unit in block:
                    args, kwargs = inputs.batch(name, ids)
                    unit(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
                    losses[f"layer {unit.layer_idx}"] = pair_mse(unit)
                return config.mse_weight * torch.stack(list(losses.values())).mean(), \
                    {k: float(v.detach()) for k, v in losses.items()}

            @torch.no_grad()
            def heldout(block_loss=block_loss) -> float:
                return sum(float(block_loss([j])[0]) for j in val_ids) / len(val_ids)

            params = [p for _, u in block for p in new_parameters(u).values()]
            for p in params:
                p.requires_grad_(True)
            stopping = (EarlyStopping(heldout, config.transfer_eval_every, config.transfer_patience,
                                      config.transfer_min_delta) if val_ids else None)
            phase = Phase("transfer", i, block_name(block), params, len(train_ids) or n_items,
                          (lambda items, f=block_loss: f([train_ids[j] for j in items])) if train_ids else block_loss,
                          config.transfer_lr, config.transfer_steps, config.seq_len, stopping=stopping)
            res = run_phase(phase, config, accelerator, ckpts, history, save_state,
                            resume=ck if pos == "resume" else None,
                            deadline=share_deadline(config, start + captured, [weights[j] for j in todo],
                                                    time.perf_counter()),
                            callbacks=callbacks)
            for p in params:
                p.requires_grad_(False)
            run.blocks[block_name(block)] = {
                "steps": res.steps_done, "converged": res.converged, "stopped_at_budget": res.stopped_early,
                "seconds": round(res.seconds, 1), "heldout": res.heldout,
                "tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1)}
            run.stopped_at_budget = run.stopped_at_budget or res.stopped_early
            done_steps = max(done_steps, res.steps_done)
            todo.remove(i)
    inputs.clear()
    run.tokens = n_items * config.seq_len
    if done_steps:
        run.tokens_per_layer = done_steps * per_step * config.seq_len
