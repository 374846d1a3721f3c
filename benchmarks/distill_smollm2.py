"""Fidelity of a linearized SmolLM2-135M-Instruct: the converted model against the original and against the
zero-training constant-memory baselines (sliding window, attention sinks + window), at equal decode state.

Every row gives its decode-state bytes (fp32, batch 1, all 30 layers). Baselines are the *original* model
with a 4-D attention mask (no training, no surgeon code): ``window`` = the last w tokens only,
``sinks + window`` = StreamingLLM's 4 first tokens + the last w. The converted model is
``LinearizeAttention(window, sinks, hedgehog feature_dim)`` trained with ``surgeon.distill``:
stage 1 attention transfer (each layer until its held-out MSE plateaus, on sequences as long as the
evaluation context), stage 2 KD at every position on teacher-generated chat answers mixed with prose,
training only the linear branch (default; the original weights stay untouched, so prompts within the window
stay exact) or LoRA on q/k/v/o (``--stage2 lora``, LoLCATs). Evaluation: perplexity ratio at several contexts, teacher-forced top-1 agreement and KL at 1024,
greedy agreement on held-out prompts longer than the window, top-1 agreement on prompts shorter than
the window (where the converted model before stage 2 *is* the original), needle retrieval beyond the
window at the depths where the teacher succeeds. Writes JSON + a PNG (ratio vs training tokens and
minutes; Pareto table of ratio vs state bytes).

    python benchmarks/distill_smollm2.py --quick      # ≤ 25 min on a 2-core CPU
    python benchmarks/distill_smollm2.py              # full (≤ 2 h)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import surgeon
from surgeon.core.report import format_table
from surgeon.core.provenance import provenance
from surgeon.distill.config import STAGE2_RECIPES, stage2_fields
from surgeon.distill.data import chat_prompts, chat_texts, pack, pydoc_texts
from surgeon.distill.evaluate import exact_continuation, held_out_windows, make_niah_trials
from surgeon.distill.planning import measure_errors, pareto, plan_hybrid, state_bytes_fn
from surgeon.export.stateful_lm import StateLayout
from surgeon.models.smollm2 import cache_dir, load_smollm2
from surgeon.passes import LinearizeAttention

PRESETS = {
    "quick": dict(stage1_minutes=7.0, stage2_minutes=6.0, stage1_seq=1024, stage2_seq=512, transfer_packs=12,
                  transfer_steps=300, lora_steps=400, chat=6, chat_tokens=160, eval_windows=2,
                  contexts=(256, 512, 1024, 2048), baseline_windows=(64, 128, 256), greedy_prompts=20,
                  greedy_new=12, short_prompts=40, niah_trials=1, lm_eval_docs=8),
    "full": dict(stage1_minutes=40.0, stage2_minutes=45.0, stage1_seq=2048, stage2_seq=1024, transfer_packs=24,
                 transfer_steps=2000, lora_steps=4000, chat=24, chat_tokens=256, eval_windows=4,
                 contexts=(256, 512, 1024, 2048), baseline_windows=(64, 128, 256), greedy_prompts=24,
                 greedy_new=16, short_prompts=64, niah_trials=2, lm_eval_docs=16),
}
SINKS = 4


def kv_bytes(tokens: int, layers: int = 30, kv_heads: int = 3, head_dim: int = 64) -> int:
    """fp32 K + V of ``tokens`` tokens in every layer (the softmax / baseline decode state)."""
    return 2 * layers * kv_heads * head_dim * tokens * 4


@torch.no_grad()
def nll(model, windows: torch.Tensor, mask_fn=None) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in windows:
        ids = row[None]
        kw = {"attention_mask": mask_fn(ids.shape[1])} if mask_fn else {}
        logits = model(input_ids=ids, use_cache=False, **kw).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


def streaming_mask(window: int, sinks: int):
    """A float (1, 1, T, T) mask: each query sees its last ``window`` tokens and the first ``sinks``."""
    def make(T: int) -> torch.Tensor:
        t = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        allowed = (j <= t) & ((t - j < window) | (j < sinks))
        return torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return make


@torch.no_grad()
def agreement(student, teacher, windows: torch.Tensor) -> dict[str, float]:
    """Teacher-forced top-1 agreement and mean KL(teacher ‖ student) per token."""
    agree, kl, count = 0, 0.0, 0
    for row in windows:
        ids = row[None]
        s = student(input_ids=ids, use_cache=False).logits[0].float()
        t = teacher(input_ids=ids, use_cache=False).logits[0].float()
        agree += int((s.argmax(-1) == t.argmax(-1)).sum())
        lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
        kl += float((lt.exp() * (lt - ls)).sum())
        count += ids.shape[1]
    return {"top1": agree / count, "kl": kl / count}


@torch.no_grad()
def greedy_agreement(student, teacher, prompts: list[torch.Tensor], new: int) -> float:
    same = total = 0
    for ids in prompts:
        outs = []
        for m in (student, teacher):
            g = m.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
            outs.append(g[0, ids.shape[0]:])
        same += int((outs[0] == outs[1]).sum())
        total += new
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the ≤ 25-minute preset (default: full, ≤ 2 h)")
    ap.add_argument("--window", type=int, default=None,
                    help="fix the window (default: planned from the measured transfer errors under --budget)")
    ap.add_argument("--windows", default="64,128,256", help="candidate windows for the plan")
    ap.add_argument("--budget", type=float, default=0.05,
                    help="decode-state budget as a fraction of the softmax KV cache at 8K tokens")
    ap.add_argument("--feature-dim", type=int, default=16, help="hedgehog projection per head (φ has 2× features)")
    ap.add_argument("--sinks", type=int, default=SINKS)
    ap.add_argument("--linear-weight-init", type=float, default=1e-6,
                    help="initial λ of the linear branch (1e-6: the untrained hybrid is sinks + window exactly; "
                         "1e-3 costs 1.07 -> 1.43 @1024 at window 256 before training)")
    ap.add_argument("--stage2", choices=STAGE2_RECIPES, default="linear-branch",
                    help="what stage 2 trains: only the linear branch (feature maps, λ; default), which leaves every "
                         "original weight untouched so prompts within the window stay exact, or LoRA on q/k/v/o "
                         "(LoLCATs; results then go to distill_smollm2[_quick]_lora.json)")
    ap.add_argument("--stage2-lr", type=float, default=None, help="stage-2 learning rate (default 1e-3)")
    ap.add_argument("--stage1-minutes", type=float, help="stage-1 budget (0: no stage 1)")
    ap.add_argument("--stage2-minutes", type=float)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-routes", default="original,surgered,hf",
                    help="surgeon eval routes (lm-evaluation-harness) for the final evaluation; add onnx / onnxruntime "
                         "to include the exports (minutes of export each)")
    ap.add_argument("--tag", default="", help="suffix of the result files and work folder (another variant)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="out/bench_distill")
    args = ap.parse_args()
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("stage1_minutes", "stage2_minutes"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    work, out = Path(args.work) / (mode + ("_lora" if args.stage2 == "lora" else "") + args.tag), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t0) / 60:6.1f} min] {msg}", flush=True)

    teacher, tok = load_smollm2()
    teacher.eval()
    contexts = preset["contexts"]
    windows = {c: held_out_windows(tok, c, preset["eval_windows"]) for c in contexts}
    # the teacher's and the baselines' numbers depend only on the data: cached per preset (a rerun skips them)
    cache_file = work / "baselines.json"
    key = {"contexts": list(contexts), "windows": preset["eval_windows"], "baseline_windows": list(preset["baseline_windows"]),
           "sinks": SINKS}
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if cached.get("key") == key and "teacher_nll" in cached:
        teacher_nll = {int(c): tuple(v) for c, v in cached["teacher_nll"].items()}
    else:
        teacher_nll = {c: nll(teacher, windows[c]) for c in contexts}
        cache_file.write_text(json.dumps({**cached, "key": key, "teacher_nll": teacher_nll}))
    log("teacher perplexity " + ", ".join(f"@{c}: {math.exp(a / n):.2f}" for c, (a, n) in teacher_nll.items()))

    def ratios(model, mask_fn=None, only=None) -> dict[int, float]:
        res = {}
        for c in (only or contexts):
            a, n = nll(model, windows[c], mask_fn)
            res[c] = round(math.exp(a / n) / math.exp(teacher_nll[c][0] / teacher_nll[c][1]), 4)
        return res

    rows = list(cached.get("rows", [])) if cached.get("key") == key else []
    if not rows:
        for w in preset["baseline_windows"]:
            for sinks in (0, SINKS):
                r = ratios(teacher, streaming_mask(w, sinks))
                rows.append({"model": f"{'sinks + ' if sinks else ''}window {w} (no training)", "kind": "baseline",
                             "state_MiB": round(kv_bytes(w + sinks) / 2**20, 2), "train_min": 0.0,
                             **{f"ratio@{c}": v for c, v in r.items()}})
                log(rows[-1]["model"] + f": {r}")
        cache_file.write_text(json.dumps({"key": key, "teacher_nll": teacher_nll, "rows": rows}))
    else:
        log(f"baselines from {cache_file} (same data and windows)")

    # hybrid planning: measured per-layer transfer error at each candidate window, under the state budget at 8K
    budget_bytes = int(args.budget * kv_bytes(8192))
    plan_packs = pack(pydoc_texts("train"), 1024, tok, what="planning text")[:2]
    linearize = dict(feature_map="hedgehog", feature_dim=args.feature_dim, sinks=args.sinks,
                     linear_weight_init=args.linear_weight_init)
    candidates = [args.window] if args.window else [int(w) for w in args.windows.split(",")]
    errors = measure_errors(teacher, plan_packs, candidates, **linearize)
    state_fn = state_bytes_fn(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, features=2 * args.feature_dim,
                              sinks=args.sinks, context=8192)
    options = plan_hybrid(errors, state_fn, budget_bytes, max_softmax_layers=2)
    chosen = options[0]
    plan_rows = [{"window": o.window, "softmax_layers": list(o.softmax_layers), "state_MiB@8K": round(o.state_bytes / 2**20, 2),
                  "transfer_error": round(o.error, 4), "chosen": o == chosen} for o in pareto(options)]
    print(format_table(["window", "softmax_layers", "state_MiB@8K", "transfer_error", "chosen"], plan_rows))
    log(f"plan under {args.budget:.0%} of the KV cache at 8K ({budget_bytes / 2**20:.1f} MiB): {chosen.describe()}")

    student, _ = load_smollm2()
    config = LinearizeAttention(window=chosen.window, **linearize,
                                **({"layers": [i for i in range(30) if i not in chosen.softmax_layers]}
                                   if chosen.softmax_layers else {}))
    surgery = surgeon.apply(student, config)
    student = surgery.model.eval()
    state_bytes = StateLayout.of(student).state_bytes(batch=1)
    args.window = chosen.window

    # the untrained sinks + window baseline holding the same decode-state bytes as the converted model
    eq_window = state_bytes // kv_bytes(1) - SINKS
    eq_rows = [r for r in rows if r.get("equal_state_window") == eq_window]
    if not eq_rows:
        r = ratios(teacher, streaming_mask(eq_window, SINKS))
        rows.append({"model": f"sinks + window {eq_window} (no training, equal state)", "kind": "baseline",
                     "equal_state_window": eq_window, "state_MiB": round(kv_bytes(eq_window + SINKS) / 2**20, 2),
                     "train_min": 0.0, **{f"ratio@{c}": v for c, v in r.items()}})
        log(rows[-1]["model"] + f": {r}")
        cache_file.write_text(json.dumps({"key": key, "teacher_nll": teacher_nll, "rows": rows}))
    label = f"hedgehog f{args.feature_dim} + {args.sinks} sinks + window {args.window}"
    curve = []

    def record(stage: str, minutes: float, tokens: int, only=None) -> dict:
        student.eval()
        r = ratios(student, only=only)
        row = {"model": f"{label}, {stage}", "kind": "surgeon", "state_MiB": round(state_bytes / 2**20, 2),
               "train_min": round(minutes, 1), **{f"ratio@{c}": v for c, v in r.items()}}
        rows.append(row)
        curve.append({"stage": stage, "minutes": round(minutes, 2), "tokens": tokens, **{f"ratio@{c}": v for c, v in r.items()}})
        log(f"{row['model']}: {r}")
        return row

    record("before training", 0.0, 0, only=(1024,))

    # stage 1: attention transfer, early-stopped per layer, on sequences as long as the longest eval context
    common = dict(batch_size=1, progress=True, output_dir=str(work / "stage1"))
    s1_min, s1_tokens, s1_report = 0.0, 0, {"minutes": 0.0, "skipped": True}
    if preset["stage1_minutes"] > 0:      # --stage1-minutes 0: all the training time goes to stage 2
        r1 = surgeon.distill(student, data="pydoc", tokenizer=tok, config=surgeon.DistillConfig(
            stages=["transfer"], seq_len=preset["stage1_seq"], transfer_steps=preset["transfer_steps"],
            transfer_packs=preset["transfer_packs"], transfer_lr=1e-2, transfer_eval_every=10, transfer_patience=3,
            max_minutes=preset["stage1_minutes"], **common))
        s1_min = r1.seconds["transfer"] / 60
        s1_tokens = r1.tokens.get("transfer_per_layer", 0)
        s1_report = {"minutes": round(s1_min, 2), "layers": r1.layers, "tokens_per_layer": s1_tokens,
                     "stopped_at_budget": r1.stopped_early.get("transfer")}
        log(f"stage 1: {s1_min:.1f} min, {len(r1.layers)} layers, converged "
            f"{sum(bool(l.get('converged')) for l in r1.layers)}; tokens/s per layer "
            f"{sum(l.get('tokens_per_s', 0) for l in r1.layers) / max(len(r1.layers), 1):.0f}")
        record("after stage 1", s1_min, s1_tokens, only=(512, 1024))

    # stage 2: KD on every position (linear branch only, or LoRA), teacher chat answers mixed with prose
    chat = chat_texts(teacher, tok, n=preset["chat"], max_new_tokens=preset["chat_tokens"],
                      cache=cache_dir() / f"chat_{preset['chat']}_{preset['chat_tokens']}.json")
    prose = pydoc_texts("train")
    data = [t for pair in zip(chat, prose) for t in pair] + prose[len(chat):]
    r2 = surgeon.distill(student, data=data, tokenizer=tok, teacher=teacher, config=surgeon.DistillConfig(
        stages=["lora"], seq_len=preset["stage2_seq"], lora_steps=preset["lora_steps"], lora_lr=args.stage2_lr or 1e-3,
        **stage2_fields(args.stage2),
        max_minutes=preset["stage2_minutes"], warmup_steps=5, **{**common, "output_dir": str(work / "stage2")}))
    student = r2.model.eval()
    s2_min = r2.seconds["lora"] / 60
    record("after stage 2", s1_min + s2_min, s1_tokens + r2.tokens.get("lora", 0))

    # agreement, long-prompt greedy, short-prompt agreement, needle beyond the window
    agree = agreement(student, teacher, windows[1024])
    long_len = max(256, 2 * args.window)  # prompts longer than the window
    long_prompts = list(held_out_windows(tok, long_len, preset["greedy_prompts"]))
    greedy = greedy_agreement(student, teacher, long_prompts, preset["greedy_new"])
    shorts = held_out_windows(tok, 48, preset["short_prompts"] // 2)
    chats = [tok.apply_chat_template([{"role": "user", "content": p[:120]}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"][0][:args.window - 4]
             for p in chat_prompts(preset["short_prompts"] // 2, "held_out", seed=1)]
    short = agreement(student, teacher, list(shorts) + [c for c in chats])
    haystack = held_out_windows(tok, 1024, 4)
    depths = [0.1, 0.3, 0.5, 0.7]
    trials = make_niah_trials(tok, haystack, 1024, depths, preset["niah_trials"], 0, teacher.config.vocab_size)
    niah = {"depths": depths, "context": 1024,
            "teacher": [sum(exact_continuation(teacher, i, a) for i, a in t) / len(t) for t in trials],
            "student": [sum(exact_continuation(student, i, a) for i, a in t) / len(t) for t in trials]}
    niah["where_teacher_succeeds"] = [d for d, s in zip(depths, niah["teacher"]) if s >= 0.8]
    log(f"agreement @1024 {agree}; greedy on {len(long_prompts)} long prompts {greedy:.3f}; "
        f"short prompts {short}; needle {niah}")

    baseline_rows = [r for r in rows if r["kind"] == "baseline"]
    equal_state = [r for r in baseline_rows if r.get("equal_state_window") == eq_window]
    by_state = sorted(rows, key=lambda r: r["state_MiB"])
    result = {
        "mode": mode, "model": "SmolLM2-135M-Instruct", "config": config.to_dict(),
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}, fp32, eager PyTorch",
        "decode_state_MiB": round(state_bytes / 2**20, 2),
        "softmax_kv_MiB_at_8k": round(kv_bytes(8192) / 2**20, 1),
        "state_fraction_of_kv_at_8k": round(state_bytes / kv_bytes(8192), 4),
        "eval": {"contexts": list(contexts), "windows_per_context": preset["eval_windows"],
                 "data": "held-out pydoc topics (never trained on)",
                 "teacher_perplexity": {c: round(math.exp(a / n), 3) for c, (a, n) in teacher_nll.items()}},
        "rows": rows, "curve": curve,
        "agreement_1024": agree, "greedy_agreement_long_prompts": greedy, "long_prompt_tokens": long_len,
        "plan": {"budget_fraction_of_kv_at_8k": args.budget, "budget_MiB": round(budget_bytes / 2**20, 2),
                 "candidate_windows": candidates, "pareto": plan_rows, "errors": errors},
        "short_prompt_agreement": short, "niah": niah,
        "stage1": s1_report,
        "stage2": {"minutes": round(s2_min, 2), "tokens": r2.tokens.get("lora"),
                   "tokens_per_s": round(r2.tokens.get("lora", 0) / max(r2.seconds["lora"], 1e-9), 1),
                   "stopped_at_budget": r2.stopped_early.get("lora"), "data": f"{len(chat)} teacher chat answers + prose",
                   "trains": args.stage2, "lr": args.stage2_lr or 1e-3},
        "equal_state_baselines": equal_state,
        "targets": {"quick_ratio_1024": 1.30, "full_ratio_1024": 1.15, "greedy_long": 0.60, "short_agreement": 0.99},
        "minutes_total": round((time.perf_counter() - t0) / 60, 1),
        "provenance": provenance(counts={
            "eval_windows_per_context": preset["eval_windows"], "contexts": list(contexts),
            "greedy_prompts": len(long_prompts), "greedy_new_tokens": preset["greedy_new"],
            "short_prompts": preset["short_prompts"], "needle_depths": len(depths),
            "needle_trials_per_depth": preset["niah_trials"], "lm_eval_docs": preset["lm_eval_docs"],
            "stage2_tokens": r2.tokens.get("lora"), "chat_answers": len(chat)}),
    }
    stem = f"distill_smollm2{'_quick' if args.quick else ''}{'_lora' if args.stage2 == 'lora' else ''}{args.tag}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    surgery.model = student
    surgeon.save(surgery, work / "student")          # the distilled model, for re-evaluation (surgeon.restore)
    log(f"saved the distilled model to {work / 'student'}; lm-evaluation-harness next")
    result["lm_eval"] = lm_eval_section(surgery, teacher, tok, work, args.eval_routes.split(","), preset["lm_eval_docs"])
    result["minutes_total"] = round((time.perf_counter() - t0) / 60, 1)
    path.write_text(json.dumps(result, indent=2, default=str))
    cols = ["model", "state_MiB", "train_min"] + [f"ratio@{c}" for c in contexts]
    print(format_table(cols, [{k: r.get(k, "-") for k in cols} for r in by_state]))
    _plot(result, out / f"{stem}.png")
    log(f"wrote {path}")


def lm_eval_section(surgery, teacher, tok, work: Path, routes: list[str], docs: int) -> dict:
    """The same models through lm-evaluation-harness (``surgeon eval``): rolling perplexity on the held-out
    pydoc documents and the local multiple-choice set, one column per route; ratios to the original."""
    from surgeon.eval import evaluate, routes_for

    started = time.perf_counter()
    try:
        report = evaluate(routes_for(routes, surgered=surgery, original=teacher, tokenizer=tok, work_dir=work / "eval"),
                          ["surgeon_pydoc_ppl", "surgeon_python_mc"], tok, limit=docs, max_length=1024)
    except Exception as e:  # the benchmark's own numbers are already written: record why this part failed
        return {"error": f"{type(e).__name__}: {e}"}
    report.save(work / "eval", "lm_eval")
    print(report.to_markdown())
    ppl = {r: report.value(r, "surgeon_pydoc_ppl", "word_perplexity") for r in report.routes}
    return {"routes": report.routes, "tasks": report.tasks, "docs_per_task": docs, "max_length": 1024,
            "metrics": report.metrics, "seconds": report.seconds, "skipped": report.skipped,
            "word_perplexity_ratio": {r: round(v / ppl["original"], 4) for r, v in ppl.items()
                                      if v is not None and ppl.get("original")},
            "minutes": round((time.perf_counter() - started) / 60, 2)}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pts = [c for c in result["curve"] if "ratio@1024" in c]
    a.plot([c["minutes"] for c in pts], [c["ratio@1024"] for c in pts], "o-", label="converted (surgeon)")
    for r in result["rows"]:
        if r["kind"] == "baseline" and "sinks" in r["model"]:
            a.axhline(r["ratio@1024"], ls="--", lw=0.8, color="gray")
            a.text(0, r["ratio@1024"], r["model"].replace(" (no training)", ""), fontsize=7, va="bottom")
    a.set_xlabel("training minutes (2-core CPU)")
    a.set_ylabel("perplexity ratio @1024")
    a.set_title("quality vs compute")
    for kind, marker in (("baseline", "s"), ("surgeon", "o")):
        rs = [r for r in result["rows"] if r["kind"] == kind and "ratio@1024" in r]
        b.scatter([r["state_MiB"] for r in rs], [r["ratio@1024"] for r in rs], marker=marker, label=kind)
    b.set_xlabel("decode state, MiB (fp32, 30 layers)")
    b.set_ylabel("perplexity ratio @1024")
    b.set_title("ratio vs state bytes")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
