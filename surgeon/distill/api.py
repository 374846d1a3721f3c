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
from surgeon.distill.engine import Checkpoints, make_accelerator, save_curves, seed_everything
from surgeon.distill.stage_lora import run_lora
from surgeon.distill.stage_transfer import block_name, run_transfer
from surgeon.distill.transfer import (
    layer_errors,
    linear_units,
    load_stage1_state,
    new_parameters,
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
        rows = [h["loss"] for h in self.history if h["stage"] == stage and "loss" in h]   # not held-out checks
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
                started = time.perf_counter()
                run = run_transfer(model, units, packs, config, accelerator, ckpts, history, save_state, position,
                                   ck, state["errors_before"], callbacks, device)
                seconds = time.perf_counter() - started
                state["seconds"]["transfer"] = state["seconds"].get("transfer", 0.0) + seconds
                state["tokens"]["transfer"] = run.tokens
                if run.tokens_per_layer:
                    state["tokens"]["transfer_per_layer"] = run.tokens_per_layer
                state.setdefault("stopped", {})["transfer"] = run.stopped_at_budget
                model.train()
                errors_after = layer_errors(model, eval_packs, config.batch_size)
                worst = sorted(errors_after, key=errors_after.get, reverse=True)[:config.keep_softmax]
                state["layers"] = [_layer_row(n, u, state["errors_before"][n], errors_after[n], n in worst,
                                              run.blocks.get(block_name([(n, u)]), {})) for n, u in units]
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
            model = run_lora(model, packs, config, accelerator, ckpts, history, save_state, position, ck, state,
                             callbacks, device, teacher)
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


def _layer_row(site: str, unit: nn.Module, before: float, after: float, kept: bool, block: dict[str, Any]
               ) -> dict[str, Any]:
    """One row of the stage-1 report: transfer MSE before / after, held-out curve ends, how the layer stopped."""
    heldout = block.get("heldout") or []
    row = {"layer": unit.layer_idx, "site": site, "mse_before": before, "mse_after": after,
           "reduction": before / max(after, 1e-30), "kept_softmax": kept}
    if heldout:
        row.update(heldout_before=heldout[0], heldout_after=min(heldout), steps=block["steps"],
                   converged=block["converged"], tokens_per_s=block["tokens_per_s"])
    return row


def _drop_kept_sites(surgery: Any, kept: list[str]) -> None:
    """Layers given back to softmax leave the recipe, so ``surgeon.save`` / ``restore`` replay the rest."""
    if not kept:
        return
    for entry in surgery.recipe.entries:
        if entry.pass_name == "LinearizeAttention":
            entry.sites = [site for site in entry.sites if site.name not in kept]


__all__ = ["distill", "DistillResult"]
