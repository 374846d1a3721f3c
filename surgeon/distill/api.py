"""``surgeon.distill``: attention transfer, then LoRA knowledge distillation, on accelerate.

Example (tiny random model; real runs use ``load_smollm2()`` and ``data="pydoc"``):
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> torch.manual_seed(0); model = transformers.LlamaForCausalLM(cfg)  # doctest: +ELLIPSIS
    <...>
    >>> s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=4))
    >>> data = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(0))
    >>> result = surgeon.distill(s.model, data=data, config=surgeon.DistillConfig(
    ...     seq_len=32, transfer_steps=3, lora_steps=2, progress=False))
    >>> [row["layer"] for row in result.layers], result.tokens["lora"]
    ([0, 1], 64)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from surgeon.distill import lora as L
from surgeon.distill.config import DistillConfig
from surgeon.distill.data import data_digest, resolve
from surgeon.distill.engine import Checkpoints, Phase, make_accelerator, run_phase, save_curves, seed_everything
from surgeon.distill.transfer import (
    LayerInputs,
    cache_bytes_per_pack,
    layer_errors,
    linear_units,
    load_stage1_state,
    new_parameters,
    pair_mse,
    require_units,
    restore_softmax,
    set_transfer,
    stage1_state,
)
from surgeon.core.errors import ConfigError
from surgeon.core.report import Report, ReportGroup


@dataclass
class DistillResult:
    """What ``surgeon.distill`` returns: the model (adapters merged unless ``merge=False``) and its records."""

    model: nn.Module
    config: DistillConfig
    layers: list[dict[str, Any]] = field(default_factory=list)      # stage-1 per-layer transfer error
    kept_softmax: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)     # loss curve points
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    stopped_early: dict[str, bool] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    resumed_from: str | None = None

    @property
    def report(self) -> ReportGroup:
        reports = []
        if self.layers:
            r = Report("attention transfer (stage 1): per-layer MSE, linear vs softmax output",
                       ["layer", "site", "mse_before", "mse_after", "reduction", "kept_softmax"], self.layers)
            reports.append(r)
        stages = [{"stage": s, "tokens": self.tokens.get(s, 0), "seconds": round(self.seconds.get(s, 0.0), 1),
                   "final_loss": self.final_loss(s), "stopped_early": self.stopped_early.get(s, False)}
                  for s in self.config.stages]
        reports.append(Report("distillation", ["stage", "tokens", "seconds", "final_loss", "stopped_early"], stages))
        return ReportGroup("surgeon distill", reports)

    def final_loss(self, stage: str) -> float | None:
        rows = [h["loss"] for h in self.history if h["stage"] == stage]
        return rows[-1] if rows else None

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "layers": self.layers, "kept_softmax": self.kept_softmax,
                "tokens": self.tokens, "seconds": self.seconds, "stopped_early": self.stopped_early,
                "final_loss": {s: self.final_loss(s) for s in self.config.stages}, "files": self.files,
                "resumed_from": self.resumed_from}

    def __str__(self) -> str:
        return str(self.report)


def _model_signature(model: nn.Module, units: list[tuple[str, nn.Module]]) -> str:
    parts = [type(model).__name__]
    for name, unit in units:
        parts.append(name + ":" + ",".join(f"{n}{tuple(p.shape)}" for n, p in sorted(new_parameters(unit).items())))
    q = getattr(units[0][1], units[0][1].layout.projection_names[0]).weight
    parts.append(hashlib.sha1(q.detach().float().cpu().numpy().tobytes()).hexdigest()[:12])
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _blocks(units: list[tuple[str, nn.Module]], config: DistillConfig) -> list[list[tuple[str, nn.Module]]]:
    if config.transfer_mode == "joint":
        return [units]
    k = config.block_size if config.transfer_mode == "block" else 1
    return [units[i:i + k] for i in range(0, len(units), k)]


def _block_name(block: list[tuple[str, nn.Module]]) -> str:
    ids = [u.layer_idx for _, u in block]
    return f"layer {ids[0]}" if len(ids) == 1 else f"layers {ids[0]}-{ids[-1]}"


def _nan_locator(model: nn.Module, ids_fn: Callable[[], torch.Tensor]) -> Callable[[dict], str | None]:
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


def distill(model: Any, data: Any = "pydoc", config: DistillConfig | None = None, *, tokenizer: Any = None,
            teacher: nn.Module | None = None, callbacks: Iterable[Callable[[dict[str, Any]], None]] = ()
            ) -> DistillResult:
    """Recover a linearized model's quality: stage 1 attention transfer, stage 2 LoRA + KD (see ``DistillConfig``).

    Args:
        model: a model with ``LinearAttention`` layers (``surgeon.apply(..., LinearizeAttention(...))``),
            or the ``Surgery`` itself (its ``.model`` is updated). Trained in place.
        data: texts, token-id lists, a ``(n, tokens)`` LongTensor, or a built-in source: ``"pydoc"`` (the
            training topics of CPython's pydoc prose), ``"teacher"`` (seeded teacher samples), ``"pydoc+teacher"``.
        tokenizer: needed for text data.
        teacher: optional separate teacher for stage 2 (same vocabulary); default: the model itself with
            adapters disabled and softmax attention teacher-forced.
        callbacks: called after every optimizer step with ``{"stage", "phase", "step", "loss"}``.
    """
    config = config or DistillConfig()
    config.validate()
    surgery = model if hasattr(model, "recipe") and hasattr(model, "model") else None
    if surgery is not None:
        model = surgery.model
    units = require_units(model)
    if teacher is not None:
        L.check_teacher(model, teacher)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and config.seq_len > limit:
        raise ConfigError(f"seq_len={config.seq_len} exceeds the model's {limit} positions; lower seq_len")
    packs = resolve(data, model, tokenizer, config.seq_len, config.seed)

    accelerator = make_accelerator(config.mixed_precision)
    device = accelerator.device
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)

    identity = {"config": config.fingerprint(), "model": _model_signature(model, units), "data": data_digest(packs)}
    ckpts = Checkpoints(config.checkpoint_dir, config.keep_checkpoints, identity, accelerator.is_main_process)
    ck = ckpts.latest() if config.resume else None
    result = DistillResult(model=model, config=config, resumed_from=str(ckpts.last_path) if ck else None)
    history = list(ck["history"]) if ck else []
    result.history = history
    seed_everything(config.seed)
    if ck:
        load_stage1_state(model, ck["stage1"])
    resume_at = (ck["phase"], ck["step"]) if ck else None
    order = {"transfer": 0, "lora": 1}

    def position(stage: str, index: int) -> str:
        """'done', 'resume' or 'todo' for a phase relative to the checkpoint."""
        if resume_at is None:
            return "todo"
        (cs, ci), _ = resume_at
        mine, theirs = (order[stage], index), (order[cs], ci)
        return "done" if mine < theirs else ("resume" if mine == theirs else "todo")

    state: dict[str, Any] = {"kept_softmax": list(ck.get("kept_softmax", [])) if ck else [],
                             "layers": list(ck.get("layers", [])) if ck else [],
                             "errors_before": dict(ck.get("errors_before", {})) if ck else {},
                             "tokens": dict(ck.get("tokens", {})) if ck else {},
                             "seconds": dict(ck.get("seconds", {})) if ck else {},
                             "peft": None}

    def save_state() -> dict[str, Any]:
        payload = {"stage1": stage1_state(model), "kept_softmax": state["kept_softmax"], "layers": state["layers"],
                   "errors_before": state["errors_before"], "tokens": state["tokens"], "seconds": state["seconds"]}
        if state["peft"] is not None:
            payload["lora"] = {n: p.detach().clone() for n, p in L.lora_parameters(state["peft"]).items()}
        return payload

    try:
        model.train()
        eval_packs = packs[: min(4, packs.shape[0])]
        # ---------------- stage 1 -------------------------------------------------------------------
        if "transfer" in config.stages:
            stage_pos = position("transfer", 10**9)
            if stage_pos != "done" or not state["layers"]:
                if not state["errors_before"]:
                    state["errors_before"] = layer_errors(model, eval_packs, config.batch_size)
                _stage1(model, units, packs, config, accelerator, ckpts, history, save_state, position, resume_at,
                        ck, state, callbacks, device)
                model.train()
                errors_after = layer_errors(model, eval_packs, config.batch_size)
                worst = sorted(errors_after, key=errors_after.get, reverse=True)[:config.keep_softmax]
                state["layers"] = [{"layer": u.layer_idx, "site": n, "mse_before": state["errors_before"][n],
                                    "mse_after": errors_after[n],
                                    "reduction": state["errors_before"][n] / max(errors_after[n], 1e-30),
                                    "kept_softmax": n in worst} for n, u in units]
                state["kept_softmax"] = worst
        if state["kept_softmax"]:
            present = {n for n, _ in linear_units(model)}
            restore_softmax(model, [n for n in state["kept_softmax"] if n in present])
            for p in model.parameters():
                p.requires_grad_(False)
        result.layers = state["layers"]
        result.kept_softmax = state["kept_softmax"]
        # ---------------- stage 2 -------------------------------------------------------------------
        if "lora" in config.stages:
            model = _stage2(model, packs, config, accelerator, ckpts, history, save_state, position, resume_at, ck,
                            state, callbacks, device, teacher)
            result.model = model
        result.tokens, result.seconds = state["tokens"], state["seconds"]
        result.stopped_early = dict(state.get("stopped", {}))
    finally:
        set_transfer(model, False)
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        model.train(was_training)
    if config.output_dir and accelerator.is_main_process:
        out = Path(config.output_dir)
        result.files.update(save_curves(history, out))
        (out / "distill.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
        result.files["json"] = str(out / "distill.json")
    if surgery is not None:
        surgery.model = result.model
        _drop_kept_sites(surgery, result.kept_softmax)
    return result


def _drop_kept_sites(surgery: Any, kept: list[str]) -> None:
    """Layers given back to softmax leave the recipe, so ``surgeon.save`` / ``restore`` replay the rest."""
    if not kept:
        return
    for entry in surgery.recipe.entries:
        if entry.pass_name == "LinearizeAttention":
            entry.sites = [site for site in entry.sites if site.name not in kept]


def _deadline(config: DistillConfig, start: float, remaining_blocks: int, now: float) -> float | None:
    if config.max_minutes is None:
        return None
    end = start + config.max_minutes * 60
    return now + max(0.0, end - now) / max(1, remaining_blocks)


def _stage1(model, units, packs, config, accelerator, ckpts, history, save_state, position, resume_at, ck, state,
            callbacks, device) -> None:
    start = time.perf_counter()
    blocks = _blocks(units, config)
    per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    stopped = False
    set_transfer(model, True)
    try:
        if config.transfer_mode == "joint":
            n_items = packs.shape[0]
            unit_list = units

            def loss_fn(items):
                model(input_ids=packs[items].to(device), use_cache=False)
                losses = {f"layer {u.layer_idx}": pair_mse(u) for _, u in unit_list}
                return config.mse_weight * torch.stack(list(losses.values())).mean(), \
                    {k: float(v.detach()) for k, v in losses.items()}

            pos = position("transfer", 0)
            if pos != "done":
                params = [p for _, u in units for p in new_parameters(u).values()]
                for p in params:
                    p.requires_grad_(True)
                phase = Phase("transfer", 0, f"all {len(units)} layers", params, n_items, loss_fn, config.transfer_lr,
                              config.transfer_steps, config.seq_len,
                              locate_nan=_nan_locator(model, lambda: packs[:1].to(device)))
                res = run_phase(phase, config, accelerator, ckpts, history, save_state,
                                resume=ck if pos == "resume" else None,
                                deadline=_deadline(config, start, 1, time.perf_counter()), callbacks=callbacks)
                for p in params:
                    p.requires_grad_(False)
                stopped = res.stopped_early
                state["tokens"]["transfer"] = res.tokens
        else:
            n_items = min(config.transfer_packs or config.transfer_steps * per_step, packs.shape[0])
            stage_packs = packs[:n_items]
            per_pack = cache_bytes_per_pack(model, config.seq_len)
            group = max(1, int(config.cache_gb * 2**30 // max(1, per_pack * n_items * 2)))  # ×2: q/k/v temporaries
            todo = [i for i in range(len(blocks)) if position("transfer", i) != "done"]
            inputs = LayerInputs()
            done_steps = 0
            while todo:
                # capture the inputs of as many upcoming blocks as fit in cache_gb
                chosen, count = [], 0
                for i in todo:
                    if chosen and count + len(blocks[i]) > group:
                        break
                    chosen.append(i)
                    count += len(blocks[i])
                inputs.clear()
                inputs.capture(model, [u for i in chosen for u in blocks[i]], stage_packs, max(config.batch_size, 4))
                set_transfer(model, True)
                for i in chosen:
                    block = blocks[i]
                    pos = position("transfer", i)

                    def loss_fn(items, block=block):
                        losses = {}
                        for name, unit in block:
                            args, kwargs = inputs.batch(name, items)
                            unit(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
                            losses[f"layer {unit.layer_idx}"] = pair_mse(unit)
                        return config.mse_weight * torch.stack(list(losses.values())).mean(), \
                            {k: float(v.detach()) for k, v in losses.items()}

                    params = [p for _, u in block for p in new_parameters(u).values()]
                    for p in params:
                        p.requires_grad_(True)
                    phase = Phase("transfer", i, _block_name(block), params, n_items, loss_fn, config.transfer_lr,
                                  config.transfer_steps, config.seq_len)
                    res = run_phase(phase, config, accelerator, ckpts, history, save_state,
                                    resume=ck if pos == "resume" else None,
                                    deadline=_deadline(config, start, len(todo), time.perf_counter()),
                                    callbacks=callbacks)
                    for p in params:
                        p.requires_grad_(False)
                    stopped = stopped or res.stopped_early
                    done_steps = max(done_steps, res.steps_done)
                    todo.remove(i)
            inputs.clear()
            state["tokens"]["transfer"] = n_items * config.seq_len
            if done_steps:
                state["tokens"]["transfer_per_layer"] = done_steps * per_step * config.seq_len
    finally:
        set_transfer(model, False)
    state["seconds"]["transfer"] = state["seconds"].get("transfer", 0.0) + time.perf_counter() - start
    state.setdefault("stopped", {})["transfer"] = stopped


def _stage2(model, packs, config, accelerator, ckpts, history, save_state, position, resume_at, ck, state, callbacks,
            device, teacher) -> nn.Module:
    start = time.perf_counter()
    pos = position("lora", 0)
    peft_model = L.add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, list(config.lora_targets),
                            config.seed)
    state["peft"] = peft_model
    if ck is not None and "lora" in ck and pos in ("resume", "done"):
        current = L.lora_parameters(peft_model)
        with torch.no_grad():
            for n, v in ck["lora"].items():
                current[n].copy_(v)
    params = list(L.lora_parameters(peft_model).values())
    if config.lora_train_feature_maps:
        params += L.unfreeze_feature_maps(peft_model)
    for p in params:
        p.requires_grad_(True)
    peft_model.train()

    def loss_fn(items):
        ids = packs[items].to(device)
        t = L.teacher_logits(peft_model, teacher, ids)
        s = peft_model(input_ids=ids, use_cache=False).logits
        parts = {}
        loss = torch.zeros((), device=device)
        if config.kd_weight > 0:
            kd = L.kd_loss(s, t, config.temperature)
            loss = loss + config.kd_weight * kd
            parts["kd"] = float(kd.detach())
        if config.ce_weight > 0:
            ce = L.next_token_ce(s, ids)
            loss = loss + config.ce_weight * ce
            parts["ce"] = float(ce.detach())
        return loss, parts

    stopped = False
    if pos != "done" or ck is None or ck["step"] < config.lora_steps:
        phase = Phase("lora", 0, f"r={config.lora_r} on {'/'.join(config.lora_targets)}", params, packs.shape[0],
                      loss_fn, config.lora_lr, config.lora_steps, config.seq_len,
                      locate_nan=_nan_locator(peft_model, lambda: packs[:1].to(device)))
        res = run_phase(phase, config, accelerator, ckpts, history, save_state,
                        resume=ck if pos == "resume" else None,
                        deadline=_deadline(config, start, 1, time.perf_counter()), callbacks=callbacks)
        stopped = res.stopped_early
        state["tokens"]["lora"] = res.tokens
    for p in params:
        p.requires_grad_(False)
    state["seconds"]["lora"] = state["seconds"].get("lora", 0.0) + time.perf_counter() - start
    state.setdefault("stopped", {})["lora"] = stopped
    state["peft"] = None
    return L.merge(peft_model) if config.merge else peft_model


__all__ = ["distill", "DistillResult"]
