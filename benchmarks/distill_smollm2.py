"""Distillation of SmolLM2-135M-Instruct with all 30 attention layers linearized (hedgehog + window 64).

Measures held-out perplexity (1024-token windows of the held-out pydoc topics) of the teacher, of the
student before distillation, after stage 1 (attention transfer) and after stage 2 (LoRA + KD), with
the tokens and wall time of each stage and the recall probes (MQAR, needle at several depths) of the
teacher and of the student before / after. Writes JSON (+ loss curves) and prints a table.

    python benchmarks/distill_smollm2.py --minutes 12            # a short run (shared 2-core CPU)
    python benchmarks/distill_smollm2.py --minutes 120 --seq-len 512   # the issue's full budget

``--minutes`` is the budget for both training stages together (split by ``--stage1-share``);
evaluation comes on top of it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import surgeon
from surgeon.distill.evaluate import evaluate
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes import LinearizeAttention
from surgeon.core.report import format_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=12.0, help="training budget, both stages together")
    ap.add_argument("--stage1-share", type=float, default=0.3, help="fraction of the budget for attention transfer")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--transfer-steps", type=int, default=100, help="per layer (stops earlier at the budget)")
    ap.add_argument("--lora-steps", type=int, default=2000, help="stops earlier at the budget")
    ap.add_argument("--transfer-lr", type=float, default=1e-2)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--keep-softmax", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=4, help="1024-token held-out windows for perplexity")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="out/bench_distill")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher, tokenizer = load_smollm2()
    student, _ = load_smollm2()
    surgery = surgeon.apply(student, LinearizeAttention(feature_map="hedgehog", window=64))
    student = surgery.model
    ev = dict(tokenizer=tokenizer, teacher=teacher, n_windows=args.eval_windows, context=1024)
    timings = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[{time.perf_counter() - t0:7.1f} s] {name}: {timings[name]} s", flush=True)
        return value

    before = timed("eval before", lambda: evaluate(student, **ev, generation=False, niah_trials=1, mqar_trials=8))
    print(before, flush=True)
    budget1 = args.minutes * args.stage1_share
    budget2 = args.minutes - budget1
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  output_dir=str(out), checkpoint_dir=str(out / "ckpt"), checkpoint_every=25, progress=True)
    r1 = timed("stage 1", lambda: surgeon.distill(student, data="pydoc", tokenizer=tokenizer, config=surgeon.DistillConfig(
        stages=["transfer"], transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
        keep_softmax=args.keep_softmax, max_minutes=budget1, **common)))
    print(r1.report, flush=True)
    (out / "stage1.json").write_text(json.dumps(r1.to_dict(), indent=2, default=str))
    history1 = list(r1.history)
    after1 = timed("eval after stage 1", lambda: evaluate(student, **ev, generation=False, probes=False))
    print(after1, flush=True)
    r2 = timed("stage 2", lambda: surgeon.distill(student, data="pydoc", tokenizer=tokenizer, config=surgeon.DistillConfig(
        stages=["lora"], lora_steps=args.lora_steps, lora_lr=args.lora_lr, max_minutes=budget2,
        scheduler="constant", warmup_steps=10, **{**common, "checkpoint_dir": str(out / "ckpt2")})))
    student = r2.model
    print(r2.report, flush=True)
    after2 = timed("eval after stage 2", lambda: evaluate(student, **ev, niah_trials=1, mqar_trials=8, out_dir=out))
    print(after2, flush=True)
    surgeon.distill.engine.save_curves(history1 + r2.history, out)

    teacher_ppl = after2.perplexity["teacher"]
    result = {
        "model": "SmolLM2-135M-Instruct", "layers_linearized": 30, "feature_map": "hedgehog", "window": 64,
        "kept_softmax": r1.kept_softmax,
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "budget_minutes": args.minutes, "seq_len": args.seq_len,
        "eval": {"context": 1024, "windows": args.eval_windows, "tokens": after2.perplexity["tokens"],
                 "data": "held-out pydoc topics (never trained on)"},
        "perplexity": {"teacher": teacher_ppl, "student_before": before.perplexity["student"],
                       "student_after_stage1": after1.perplexity["student"],
                       "student_after_stage2": after2.perplexity["student"]},
        "ratio": {"before": before.perplexity["ratio"], "after_stage1": after1.perplexity["ratio"],
                  "after_stage2": after2.perplexity["ratio"]},
        "agreement": {"before": before.agreement, "after_stage1": after1.agreement, "after_stage2": after2.agreement},
        "tokens": {"stage1_distinct": r1.tokens.get("transfer"), "stage1_per_layer": r1.tokens.get("transfer_per_layer"),
                   "stage2": r2.tokens.get("lora")},
        "steps": {"stage1_per_layer_max": max([h["step"] for h in history1] or [0]),
                  "stage2": max([h["step"] for h in r2.history] or [0])},
        "seconds": {"stage1": round(r1.seconds.get("transfer", 0), 1), "stage2": round(r2.seconds.get("lora", 0), 1),
                    **timings, "total": round(time.perf_counter() - t0, 1)},
        "stopped_at_budget": {"stage1": r1.stopped_early.get("transfer"), "stage2": r2.stopped_early.get("lora")},
        "stage1_layers": r1.layers,
        "recall": {"mqar": {"teacher": after2.mqar.get("teacher"), "student_before": before.mqar.get("student"),
                            "student_after": after2.mqar.get("student"), "n_pairs": after2.mqar.get("n_pairs"),
                            "trials": after2.mqar.get("trials")},
                   "niah": {"depths": after2.niah.get("depths"), "context": after2.niah.get("context"),
                            "teacher": after2.niah.get("teacher"), "student_before": before.niah.get("student"),
                            "student_after": after2.niah.get("student")}},
        "targets": {"ratio_target": 1.10, "ratio_goal": 1.05},
    }
    (out / "distill_smollm2.json").write_text(json.dumps(result, indent=2))
    rows = [{"model": "teacher (softmax)", "ppl": teacher_ppl, "ratio": 1.0},
            {"model": "student before", "ppl": before.perplexity["student"], "ratio": before.perplexity["ratio"]},
            {"model": "after stage 1", "ppl": after1.perplexity["student"], "ratio": after1.perplexity["ratio"]},
            {"model": "after stage 2", "ppl": after2.perplexity["student"], "ratio": after2.perplexity["ratio"]}]
    print(format_table(["model", "ppl", "ratio"], rows))
    print(json.dumps({k: result[k] for k in ("tokens", "steps", "seconds", "recall")}, indent=1))
    print(f"wrote {out / 'distill_smollm2.json'}")


if __name__ == "__main__":
    main()
