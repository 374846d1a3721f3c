"""The default demo: SmolLM2-135M-Instruct with every attention layer linearized (hedgehog + window 64).

load → generate before → LinearizeAttention on all 30 layers → report (attention FLOPs and decode
state vs. the softmax KV cache at 1 K / 8 K / 32 K) → generate after → quick distillation (perplexity
before / after) → save the surgery → export prefill/decode ONNX graphs → verify them against PyTorch
in onnxruntime → generate the answer again, on onnxruntime, with constant-size state.

Example:
    >>> from surgeon.cli.demo_llm import run_llm_demo
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


def _deploy(model, tokenizer, out: Path, max_new_tokens: int, log) -> dict[str, Any]:
    """Export prefill/decode graphs, verify them in onnxruntime, answer the prompt on onnxruntime."""
    import surgeon.export
    from surgeon.export import OnnxGenerator, verify_causal_lm

    onnx_dir = out / "onnx"
    exported = surgeon.export.to_onnx(model, onnx_dir, overwrite=True)
    log(f"exported prefill.onnx + decode.onnx to {onnx_dir} in {exported.seconds:.0f} s")
    report = verify_causal_lm(onnx_dir, model, shapes=[(1, 37), (2, 100), (1, 200)], n_generate=32,
                              raise_on_failure=False)
    report.save(onnx_dir / "verify.json")
    log(f"onnxruntime verification: {'PASSED' if report.passed else 'FAILED: ' + str(report.first_failure)} "
        f"(logits max abs {report.max_abs:.2e}, greedy agreement {report.greedy_agreement:.0%})")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    generator = OnnxGenerator(onnx_dir)
    start = time.perf_counter()
    tokens = generator.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    log(f"onnxruntime         > {PROMPT}\n                    < {text}")
    return {"dir": str(onnx_dir), "export_seconds": round(exported.seconds, 1), "verify_passed": report.passed,
            "logits_max_abs": report.max_abs, "greedy_agreement": report.greedy_agreement,
            "decode_ms_per_token": report.decode_ms_per_token, "state_bytes": generator.state_bytes(),
            "text": text, "seconds": round(seconds, 2)}


def run_llm_demo(out_dir: str | Path = "out/demo", window: int = 64, feature_map: str = "hedgehog",
                 max_new_tokens: int = 24, show: bool = True, distill_minutes: float = 0.0,
                 export: bool = False) -> dict[str, Any]:
    """Run the LLM pipeline, write ``demo.json`` + the saved surgery under ``out_dir``, return a summary.

    ``distill_minutes`` > 0 adds the quick distillation; ``export`` adds ONNX export, onnxruntime
    verification and generation on onnxruntime.
    """
    out = Path(out_dir)
    log = (lambda msg: tqdm.write(msg)) if show else (lambda msg: None)
    steps = tqdm(total=5 + (distill_minutes > 0) + export, desc="surgeon demo (SmolLM2-135M)", unit="step",
                 disable=not show)

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
        steps.update()

    steps.set_postfix_str("save")
    surgeon.save(surgery, out / "surgery")
    steps.update()

    deployed = None
    if export:
        steps.set_postfix_str("export + verify + generate on onnxruntime")
        deployed = _deploy(surgery.model, tokenizer, out, max_new_tokens, log)
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
        "onnx": deployed,
        "out_dir": str(out),
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    if show:
        print(surgery.report)
        print(f"\nparameters added: {result['params_added']:,} "
              f"({100 * result['params_added'] / sum(p.numel() for p in model.parameters()):.2f}% of the model)")
        print(f"before (softmax, {before_s:.1f} s): {before!r}")
        print(f"after  (linear,  {after_s:.1f} s): {after!r}")
        if distilled:
            print(f"held-out perplexity: teacher {distilled['teacher_ppl']:.2f}, linearized {distilled['before_ppl']:.2f}"
                  f" -> distilled {distilled['after_ppl']:.2f} ({distill_minutes:g} min budget)")
        if deployed:
            print(f"onnxruntime ({'verified' if deployed['verify_passed'] else 'VERIFICATION FAILED'}, "
                  f"state {deployed['state_bytes'] / 2**20:.1f} MiB at any context): {deployed['text']!r}")
        print(f"Outputs in {out}/")
    return result
