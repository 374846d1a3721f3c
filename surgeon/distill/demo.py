"""The distillation step of ``surgeon demo``: the benchmark's recipe within a small budget, measured.

Stage 1 (attention transfer, each layer until its held-out MSE plateaus) then stage 2 (KD at every
position against the original model, on the teacher's own chat answers mixed with prose). Stage 2
trains only the linear branch by default (``stage2="linear-branch"``: feature maps and λ, no
adapters), so every original weight stays as it was and prompts no longer than the window keep the
original's outputs exactly; ``stage2="lora"`` is the LoLCATs recipe (LoRA on q/k/v/o). Reports
held-out perplexity before / after against the original and the top-1 agreement with the original
on prompts shorter than the window.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from surgeon.distill.api import distill
from surgeon.distill.config import DistillConfig, stage2_fields
from surgeon.distill.data import chat_prompts, chat_texts, pack, pydoc_texts
from surgeon.distill.evaluate import perplexity_and_agreement


@torch.no_grad()
def short_prompt_agreement(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, max_tokens: int,
                           n: int = 24) -> float:
    """Teacher-forced top-1 agreement on held-out prompts shorter than ``max_tokens`` (prose and chat)."""
    prose = pack(pydoc_texts("held_out"), max_tokens, tokenizer, what="held-out pydoc text")[: n // 2]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p[:120]}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"][0][:max_tokens]
             for p in chat_prompts(n - n // 2, "held_out", seed=1)]
    same = total = 0
    for ids in list(prose) + chats:
        s = student(input_ids=ids[None], use_cache=False).logits.argmax(-1)
        t = teacher(input_ids=ids[None], use_cache=False).logits.argmax(-1)
        same += int((s == t).sum())
        total += s.numel()
    return same / total


def quick_distill(model: torch.nn.Module, tokenizer: Any, teacher: torch.nn.Module, minutes: float = 8.0,
                  out_dir: str | Path = "out/demo/distill", context: int = 512, windows: int = 2,
                  short_tokens: int = 48, chat_cache: str | Path | None = None,
                  log: Callable[[str], None] = print, stage2: str = "linear-branch",
                  stage2_lr: float = 1e-3) -> dict[str, Any]:
    """Distil ``model`` in place within ``minutes`` of training (evaluation adds ~1 min); return the measurements."""
    recipe = stage2_fields(stage2)          # validates before any work
    held = pack(pydoc_texts("held_out"), context, tokenizer, what="held-out pydoc text")[:windows]
    was = model.training
    model.eval()
    before, _ = perplexity_and_agreement(model, teacher, held)
    log(f"held-out perplexity @{context}: original {before['teacher']:.2f}, converted {before['student']:.2f}")
    start = time.perf_counter()
    r1 = distill(model, data="pydoc", tokenizer=tokenizer, config=DistillConfig(
        stages=["transfer"], seq_len=context, transfer_steps=300, transfer_packs=12, transfer_eval_every=10,
        max_minutes=minutes * 0.45, output_dir=str(out_dir), progress=True))
    chat = chat_texts(teacher, tokenizer, n=4, max_new_tokens=128, cache=chat_cache)
    prose = pydoc_texts("train")
    data = [t for pair in zip(chat, prose) for t in pair] + prose[len(chat):]
    left = max(0.5, minutes - (time.perf_counter() - start) / 60)
    r2 = distill(model, data=data, tokenizer=tokenizer, teacher=teacher, config=DistillConfig(
        stages=["lora"], seq_len=256, lora_steps=10_000, lora_lr=stage2_lr, warmup_steps=5, max_minutes=left,
        output_dir=str(out_dir), progress=True,
        **recipe))
    trained = r2.model.eval()
    after, agree = perplexity_and_agreement(trained, teacher, held)
    short = short_prompt_agreement(trained, teacher, tokenizer, short_tokens)
    model.train(was)
    result = {"context": context, "windows": windows, "teacher_ppl": after["teacher"],
              "before_ppl": before["student"], "after_ppl": after["student"],
              "ratio_before": before["ratio"], "ratio_after": after["ratio"], "top1_after": agree["top1"],
              "short_prompt_agreement": short, "short_prompt_tokens": short_tokens,
              "stage1_converged_layers": sum(bool(r.get("converged")) for r in r1.layers),
              "tokens": {"transfer_per_layer": r1.tokens.get("transfer_per_layer"), "lora": r2.tokens.get("lora")},
              "seconds": round(time.perf_counter() - start, 1), "minutes_budget": minutes,
              "stage2": {"trains": stage2, "lr": stage2_lr}}
    log(f"after distillation ({result['seconds']:.0f} s): perplexity {after['student']:.2f} "
        f"(converted/original {result['ratio_before']:.2f} -> {result['ratio_after']:.2f}); "
        f"top-1 agreement on prompts shorter than the window {short:.3f}")
    return result


__all__ = ["quick_distill", "short_prompt_agreement"]
