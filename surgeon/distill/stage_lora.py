"""Stage 2, LoRA knowledge distillation: peft adapters on the attention projections, trained on the KL to the
teacher's next-token distribution at every position (plus optional next-token cross-entropy).

With ``lora_targets=[]`` and ``lora_train_feature_maps=True`` there are no adapters: the same KD loss trains
only the parameters stage 1 added (the linear branch), so the original weights stay exactly as they were.

The teacher is a separate model or, by default, the model itself with adapters disabled and softmax
attention teacher-forced, so no second copy of the weights is needed.

``surgeon.distill(model, config=DistillConfig(stages=["lora"], ...))`` runs it (example in
:mod:`surgeon.distill.api`).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn as nn

from surgeon.distill import lora as L
from surgeon.distill.config import DistillConfig
from surgeon.distill.engine import Phase, nan_locator, run_phase


def run_lora(model: nn.Module, packs: torch.Tensor, config: DistillConfig, accelerator, ckpts,
             history: list[dict[str, Any]], save_state: Callable[[], dict[str, Any]],
             position: Callable[[str, int], str], ck: dict[str, Any] | None, state: dict[str, Any], callbacks,
             device: torch.device, teacher: nn.Module | None) -> nn.Module:
    """Run stage 2; returns the merged model (or the peft model with ``merge=False``)."""
    start = time.perf_counter()
    pos = position("lora", 0)
    adapters = bool(config.lora_targets)
    peft_model = (L.add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, list(config.lora_targets),
                             config.seed) if adapters else model)
    state["peft"] = peft_model if adapters else None
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
        what = (f"r={config.lora_r} on {'/'.join(config.lora_targets)}" if adapters else "the linear branch only")
        phase = Phase("lora", 0, what, params, packs.shape[0],
                      loss_fn, config.lora_lr, config.lora_steps, config.seq_len,
                      locate_nan=nan_locator(peft_model, lambda: packs[:1].to(device)),
                      shard_root=peft_model.get_base_model() if adapters else peft_model)
        res = run_phase(phase, config, accelerator, ckpts, history, save_state,
                        resume=ck if pos == "resume" else None,
                        deadline=None if config.max_minutes is None else start + config.max_minutes * 60, callbacks=callbacks)
        stopped = res.stopped_early
        state["tokens"]["lora"] = res.tokens
    for p in params:
        p.requires_grad_(False)
    state["seconds"]["lora"] = state["seconds"].get("lora", 0.0) + time.perf_counter() - start
    state.setdefault("stopped", {})["lora"] = stopped
    state["peft"] = None
    return L.merge(peft_model) if config.merge and adapters else peft_model
