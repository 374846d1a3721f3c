"""The default demo: SmolLM2-135M-Instruct with every attention layer linearized (hedgehog + window 64).

load → generate before → LinearizeAttention on all 30 layers → report (attention FLOPs and decode
state vs. the softmax KV cache at 1 K / 8 K / 32 K) → generate after → save the surgery. Quality
comes back with distillation (``surgeon distill``); this step only proves the rewritten model runs,
decodes through transformers' cache and generates.

Example:
    >>> from surgeon.demo_llm import run_llm_demo
    >>> result = run_llm_demo("/tmp/surgeon_llm_demo", show=False)   # doctest: +SKIP
    >>> result["layers_converted"]                                    # doctest: +SKIP
    30
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import surgeon
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes import LinearizeAttention

PROMPT = "What is the capital of France?"


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.strip(), seconds


def run_llm_demo(out_dir: str | Path = "out/demo", window: int = 64, feature_map: str = "hedgehog",
                 max_new_tokens: int = 24, show: bool = True, distill_minutes: float = 0.0) -> dict[str, Any]:
    """Run the LLM pipeline, write ``demo.json`` + the saved surgery under ``out_dir``, return a summary."""
    out = Path(out_dir)
    log = (lambda msg: tqdm.write(msg)) if show else (lambda msg: None)
    steps = tqdm(total=5, desc="surgeon demo (SmolLM2-135M)", unit="step", disable=not show)

    steps.set_postfix_str("load SmolLM2-135M-Instruct")
    model, tokenizer = load_smollm2()
    steps.update()

    steps.set_postfix_str("generate (softmax)")
    before, before_s = _generate(model, tokenizer, PROMPT, max_new_tokens)
    log(f"softmax attention   > {PROMPT}\n                    < {before}")
    steps.update()

    steps.set_postfix_str("LinearizeAttention")
    surgery = surgeon.apply(model, LinearizeAttention(feature_map=feature_map, window=window))
    surgery.recipe.source = {"model": "smollm2"}
    steps.update()

    steps.set_postfix_str("generate (linearized)")
    after, after_s = _generate(surgery.model, tokenizer, PROMPT, max_new_tokens)
    log(f"linear attention    > {PROMPT}\n                    < {after}")
    steps.update()

    distilled = None
    if distill_minutes > 0:  # surgeon.distill: attention transfer + LoRA within the budget, ppl before/after
        from surgeon.distill.demo import quick_distill

        steps.set_postfix_str(f"distill ({distill_minutes:g} min)")
        distilled = quick_distill(surgery.model, tokenizer, minutes=distill_minutes, out_dir=out / "distill", log=log)
        distilled["text"], _ = _generate(surgery.model, tokenizer, PROMPT, max_new_tokens)
        log(f"after distillation  > {PROMPT}\n                    < {distilled['text']}")

    steps.set_postfix_str("save")
    surgeon.save(surgery, out / "surgery")
    steps.update()
    steps.close()

    rows = surgery.report["LinearizeAttention"].rows
    result = {
        "model": "SmolLM2-135M-Instruct",
        "layers_converted": len(rows),
        "params_added": surgery.report["LinearizeAttention"].totals["params_added"],
        "config": surgery.recipe.entries[0].config,
        "prompt": PROMPT,
        "before": {"text": before, "seconds": round(before_s, 2)},
        "after": {"text": after, "seconds": round(after_s, 2)},
        "distill": distilled,
        "out_dir": str(out),
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    if show:
        print(surgery.report)
        print(f"\nparameters added: {result['params_added']:,} "
              f"({100 * result['params_added'] / sum(p.numel() for p in model.parameters()):.2f}% of the model)")
        print(f"before (softmax, {before_s:.1f} s): {before!r}")
        print(f"after  (linear,  {after_s:.1f} s): {after!r}")
        print("quality before distillation is expected to drop; `surgeon distill` recovers it. "
              f"Outputs in {out}/")
    return result
