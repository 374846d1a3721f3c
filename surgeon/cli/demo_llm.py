"""The default demo: SmolLM2-135M-Instruct with every attention layer linearized (hedgehog with 16 features
per head + 4 sinks + window 128: the configuration of benchmarks/fidelity_smollm2.py's student).

load → answer a long prompt (a held-out passage of over 1,024 tokens + a question, so most of the attention
goes through the linear branch) → the strongest zero-training baseline at the converted model's decode-state
bytes answers too (the original keeping 4 sinks + a window + heavy hitters by attention received, H2O; the
strongest on the fidelity benchmark's validation prompts) → LinearizeAttention on all 30 layers → report
(attention FLOPs and decode state vs. the softmax KV cache at 1 K / 8 K / 32 K) → answer again →
quick distillation (perplexity before / after, agreement on prompts shorter than the window) → save
the surgery → prefill/decode ONNX graphs (traced in a background process while distillation runs, then
given the distilled weights) → verify them against PyTorch in onnxruntime (the same criterion as
``surgeon verify``) → answer again on onnxruntime. The answers are printed side
by side with their token agreement to the original's.

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

QUESTION = "Summarize the passage above in one or two sentences."


def long_prompt(chars: int = 4200) -> str:
    """A held-out pydoc passage (never trained on) of over 1,024 tokens, then the question."""
    from surgeon.distill.data import pydoc_texts

    passage = max(pydoc_texts("held_out"), key=len)[:chars]
    return f"{passage.rsplit(' ', 1)[0]}\n\n{QUESTION}"


def _ids(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, list[int], float]:
    ids = _ids(tokenizer, prompt)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, seconds


def token_agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of the reference's positions where ``tokens`` has the same token (greedy answers)."""
    return sum(a == b for a, b in zip(tokens, reference)) / max(len(reference), 1)


def linear_fraction(n_tokens: int, window: int, sinks: int) -> float:
    """Fraction of the causal (query, key) pairs of an ``n_tokens`` prompt that the linear branch computes."""
    total = n_tokens * (n_tokens + 1) // 2
    exact = sum(min(t + 1, window) + min(sinks, max(t + 1 - window, 0)) for t in range(n_tokens))
    return (total - exact) / total


def _deploy(model, tokenizer, out: Path, prompt: str, max_new_tokens: int, log, background=None) -> dict[str, Any]:
    """Export prefill/decode graphs (or finish the background export with the trained weights), verify them in
    onnxruntime, answer the prompt on onnxruntime."""
    import surgeon.export
    from surgeon.export import OnnxGenerator, verify_causal_lm

    onnx_dir = out / "onnx"
    if background is not None:
        start = time.perf_counter()
        update = background.finish(model)
        export_seconds, update_seconds = background.export_seconds, update.seconds
        waited = time.perf_counter() - start - update_seconds
        log(f"prefill.onnx + decode.onnx were exported in the background while distilling ({export_seconds:.0f} s; "
            f"waited {waited:.0f} s for it); the distilled weights written into them in {update_seconds:.1f} s")
    else:
        exported = surgeon.export.to_onnx(model, onnx_dir, overwrite=True)
        export_seconds, update_seconds, waited = exported.seconds, None, None
        log(f"exported prefill.onnx + decode.onnx to {onnx_dir} in {export_seconds:.0f} s")
    report = verify_causal_lm(onnx_dir, model, shapes=[(1, 37), (2, 100), (1, 200)], n_generate=32,
                              raise_on_failure=False)   # the default criterion: the same as `surgeon verify`
    report.save(onnx_dir / "verify.json")
    log(f"onnxruntime verification: {'PASSED' if report.passed else 'FAILED: ' + str(report.first_failure)} "
        f"(logits max abs {report.max_abs:.2e}, greedy agreement {report.greedy_agreement:.0%})")
    ids = _ids(tokenizer, prompt)
    generator = OnnxGenerator(onnx_dir)
    start = time.perf_counter()
    tokens = generator.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    answer = tokens[0, ids["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(answer, skip_special_tokens=True).strip()
    return {"tokens": answer, "dir": str(onnx_dir), "export_seconds": round(export_seconds, 1),
            "exported_while_distilling": background is not None, "export_wait_seconds": waited,
            "update_seconds": update_seconds, "verify_passed": report.passed,
            "logits_max_abs": report.max_abs, "greedy_agreement": report.greedy_agreement,
            "decode_ms_per_token": report.decode_ms_per_token, "state_bytes": generator.state_bytes(),
            "text": text, "seconds": round(seconds, 2)}


def equal_bytes_baseline(model, surgery, tokenizer, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """The original model answering with an exact-token decode state of the converted model's bytes: 4 sinks,
    then half the room as a window and half as heavy hitters (H2O)."""
    from surgeon.export.stateful_lm import StateLayout
    from surgeon.fidelity import ExactTokenModel, ExactTokenPolicy

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token_head = 2 * head_dim * 4 * cfg.num_hidden_layers * cfg.num_key_value_heads
    state = StateLayout.of(surgery.model).state_bytes(batch=1)
    room = state // per_token_head - 4
    policy = ExactTokenPolicy(sinks=4, window=room - room // 2, heavy=room // 2, score="h2o")
    start = time.perf_counter()
    tokens = ExactTokenModel(model, policy).generate(_ids(tokenizer, prompt)["input_ids"], max_new_tokens,
                                                     eos_token_id=tokenizer.eos_token_id)
    return {"text": tokenizer.decode(tokens, skip_special_tokens=True).strip(), "tokens": tokens,
            "seconds": round(time.perf_counter() - start, 2), "policy": policy.name,
            "state_bytes": policy.state_bytes(cfg), "converted_state_bytes": state}


def run_llm_demo(out_dir: str | Path = "out/demo", window: int = 128, feature_map: str = "hedgehog",
                 max_new_tokens: int = 32, show: bool = True, distill_minutes: float = 0.0,
                 export: bool = False, sinks: int = 4, feature_dim: int | None = 16) -> dict[str, Any]:
    """Run the LLM pipeline, write ``demo.json`` + the saved surgery under ``out_dir``, return a summary.

    ``distill_minutes`` > 0 adds the quick distillation; ``export`` adds ONNX export, onnxruntime
    verification and generation on onnxruntime. ``result["passed"]`` is False when a check failed
    (the onnxruntime verification); the CLI then exits 1.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: tqdm.write(msg)) if show else (lambda msg: None)
    steps = tqdm(total=6 + (distill_minutes > 0) + export, desc="surgeon demo (SmolLM2-135M)", unit="step",
                 disable=not show)
    prompt = long_prompt()

    started = time.perf_counter()
    steps.set_postfix_str("load SmolLM2-135M-Instruct")
    model, tokenizer = load_smollm2()
    model.eval()
    n_prompt = _ids(tokenizer, prompt)["input_ids"].shape[1]
    steps.update()

    steps.set_postfix_str("generate (softmax)")
    answers: dict[str, dict[str, Any]] = {}
    text, tokens, sec = _generate(model, tokenizer, prompt, max_new_tokens)
    answers["original (softmax)"] = {"text": text, "tokens": tokens, "seconds": round(sec, 2)}
    steps.update()

    steps.set_postfix_str("LinearizeAttention")
    # 16 features make φ(q)·φ(k) large: λ starts at 1e-6 (as the benchmark's student) so the untrained hybrid is
    # sinks + window, not an untrained linear branch summed over a thousand keys
    hedgehog = {"feature_dim": feature_dim, "linear_weight_init": 1e-6} if feature_map == "hedgehog" else {}
    surgery = surgeon.apply(model, LinearizeAttention(feature_map=feature_map, window=window, sinks=sinks,
                                                      **hedgehog))
    surgery.recipe.source = {"model": "smollm2"}
    steps.update()

    steps.set_postfix_str("generate (equal-bytes baseline)")
    baseline = equal_bytes_baseline(model, surgery, tokenizer, prompt, max_new_tokens)
    answers[f"baseline ({baseline['policy']})"] = {k: baseline[k] for k in ("text", "tokens", "seconds")}
    steps.update()

    background = None
    if export and distill_minutes > 0:   # the graphs do not depend on the weights: trace them while distilling
        from surgeon.export.background import BackgroundExport

        background = BackgroundExport.start(surgery, out / "onnx", saved_dir=out / "linearized")
        log(f"exporting the linearized model to {out / 'onnx'} in a background process (log: {background.log_path})")

    steps.set_postfix_str("generate (linearized)")
    text, tokens, sec = _generate(surgery.model, tokenizer, prompt, max_new_tokens)
    answers["linearized"] = {"text": text, "tokens": tokens, "seconds": round(sec, 2)}
    steps.update()

    distilled = None
    if distill_minutes > 0:  # surgeon.distill: attention transfer + LoRA within the budget, measured
        from surgeon.distill.demo import quick_distill
        from surgeon.models.smollm2 import cache_dir

        steps.set_postfix_str(f"distill ({distill_minutes:g} min)")
        threads = torch.get_num_threads()
        if background is not None and threads > 1:
            torch.set_num_threads(threads - 1)    # one core stays with the export
        try:
            distilled = quick_distill(surgery.model, tokenizer, teacher=model, minutes=distill_minutes,
                                      out_dir=out / "distill", chat_cache=cache_dir() / "demo_chat.json", log=log)
        finally:
            torch.set_num_threads(threads)
        text, tokens, sec = _generate(surgery.model, tokenizer, prompt, max_new_tokens)
        answers["distilled"] = {"text": text, "tokens": tokens, "seconds": round(sec, 2)}
        steps.update()

    steps.set_postfix_str("save")
    surgeon.save(surgery, out / "surgery")
    steps.update()

    deployed = None
    if export:
        steps.set_postfix_str("export + verify + generate on onnxruntime")
        deployed = _deploy(surgery.model, tokenizer, out, prompt, max_new_tokens, log, background)
        answers["onnxruntime"] = {k: deployed[k] for k in ("text", "tokens", "seconds")}
        steps.update()
    steps.close()

    reference = answers["original (softmax)"]["tokens"]
    for a in answers.values():
        a["agreement"] = round(token_agreement(a["tokens"], reference), 3)
    rows = surgery.report["LinearizeAttention"].rows
    result = {
        "model": "SmolLM2-135M-Instruct",
        "layers_converted": len(rows),
        "params_added": surgery.report["LinearizeAttention"].totals["params_added"],
        "config": surgery.recipe.entries[0].config,
        "prompt": prompt, "prompt_tokens": n_prompt,
        "linear_fraction": round(linear_fraction(n_prompt, window, sinks), 4),
        "answers": answers,
        "equal_bytes_baseline": {k: v for k, v in baseline.items() if k not in ("text", "tokens", "seconds")},
        "distill": distilled,
        "onnx": deployed,
        "passed": deployed is None or bool(deployed["verify_passed"]),
        "out_dir": str(out),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    if show:
        print(surgery.report)
        print(f"\nparameters added: {result['params_added']:,} "
              f"({100 * result['params_added'] / sum(p.numel() for p in model.parameters()):.2f}% of the model)")
        print(f"\nprompt: {n_prompt} tokens (a held-out passage + {QUESTION!r}); window {window} + {sinks} sinks: "
              f"{result['linear_fraction']:.0%} of its attention pairs go through the linear branch")
        print(f"agreement: the fraction of the original answer's {len(reference)} tokens matched position by position; "
              f"the baseline keeps {baseline['state_bytes'] / 2**20:.2f} MiB of exact tokens, the converted model's "
              f"decode state is {baseline['converted_state_bytes'] / 2**20:.2f} MiB")
        for name, a in answers.items():
            print(f"{name:<44} agreement {a['agreement']:>5.0%}  ({a['seconds']:.1f} s): {a['text']!r}")
        if distilled:
            print(f"held-out perplexity @{distilled['context']}: original {distilled['teacher_ppl']:.2f}, linearized "
                  f"{distilled['before_ppl']:.2f} -> distilled {distilled['after_ppl']:.2f} (ratio "
                  f"{distilled['ratio_before']:.2f} -> {distilled['ratio_after']:.2f}, {distill_minutes:g} min budget); "
                  f"top-1 agreement with the original on prompts shorter than the window: "
                  f"{distilled['short_prompt_agreement']:.3f}")
        if deployed:
            print(f"onnxruntime: {'verified' if deployed['verify_passed'] else 'VERIFICATION FAILED'}, "
                  f"state {deployed['state_bytes'] / 2**20:.1f} MiB at any context")
        print(f"Outputs in {out}/")
    return result
