"""The distillation step of ``surgeon demo``: a budgeted two-stage run with perplexity before / after.

The teacher's perplexity comes from the linearized model itself in attention-transfer mode (each
layer then computes its original softmax attention), measured before any adapter is added.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from surgeon.distill.api import distill
from surgeon.distill.config import DistillConfig
from surgeon.distill.data import pack, pydoc_texts
from surgeon.distill.evaluate import perplexity_and_agreement
from surgeon.distill.transfer import set_transfer


def quick_distill(model: torch.nn.Module, tokenizer: Any, minutes: float = 8.0, out_dir: str | Path = "out/demo/distill",
                  context: int = 512, windows: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Distil ``model`` in place within ``minutes`` (training; evaluation adds ~1 min); return perplexities."""
    held = pack(pydoc_texts("held_out"), context, tokenizer, what="held-out pydoc text")[:windows]
    was = model.training
    model.eval()
    set_transfer(model, True)
    try:
        teacher, _ = perplexity_and_agreement(model, None, held)
    finally:
        set_transfer(model, False)
    before, _ = perplexity_and_agreement(model, None, held)
    log(f"held-out perplexity @{context}: teacher {teacher['student']:.2f}, linearized {before['student']:.2f}")
    start = time.perf_counter()
    config = DistillConfig(seq_len=256, transfer_steps=30, lora_steps=10_000, lora_lr=1e-3, warmup_steps=5,
                           max_minutes=None, output_dir=str(out_dir), progress=True)
    stage1 = DistillConfig(**{**config.to_dict(), "stages": ["transfer"], "max_minutes": minutes * 0.35})
    r1 = distill(model, data="pydoc", tokenizer=tokenizer, config=stage1)
    stage2 = DistillConfig(**{**config.to_dict(), "stages": ["lora"],
                              "max_minutes": max(0.5, minutes - (time.perf_counter() - start) / 60)})
    r2 = distill(model, data="pydoc", tokenizer=tokenizer, config=stage2)
    after, _ = perplexity_and_agreement(r2.model, None, held)
    model.train(was)
    result = {"context": context, "windows": windows, "teacher_ppl": teacher["student"],
              "before_ppl": before["student"], "after_ppl": after["student"],
              "ratio_before": before["student"] / teacher["student"], "ratio_after": after["student"] / teacher["student"],
              "tokens": {"transfer": r1.tokens.get("transfer"), "lora": r2.tokens.get("lora")},
              "seconds": round(time.perf_counter() - start, 1), "minutes_budget": minutes}
    log(f"after distillation ({result['seconds']:.0f} s): perplexity {after['student']:.2f} "
        f"(student/teacher {result['ratio_before']:.2f} -> {result['ratio_after']:.2f})")
    return result


__all__ = ["quick_distill"]
