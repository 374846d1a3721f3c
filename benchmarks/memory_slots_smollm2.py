"""Recall beyond the window with memory slots (LoLA's sparse cache) on the distilled SmolLM2.

A linear state blurs a passkey read once, hundreds of tokens back; sinks + window forget it by
construction. ``LinearizeAttention(memory=G)`` keeps, per layer and kv head, the G key/value pairs the
linear state recalls worst as exact softmax keys (no training: added to the distilled model with
``set_memory``). For each G this measures the needle beyond the window (depths where the teacher
succeeds), greedy agreement on held-out prompts longer than the window, and the perplexity ratio,
beside the untrained sinks + window baseline holding the same decode-state bytes (its window grown by
G). Every row gives its decode-state bytes at 8K (fp32, batch 1). Prints a table, writes JSON + PNG.

    python benchmarks/distill_smollm2.py --quick          # once: trains and saves the student it reads
    python benchmarks/memory_slots_smollm2.py --configs 256:0,256:64,64:256

A configuration ``window:slots`` also runs the student at another window than it was trained with (the
feature maps then cover the tokens between the two windows), to trade window tokens for memory slots at
the same decode state. ``window:slots:r`` plans the slots per layer at the same total
(:func:`~surgeon.distill.planning.plan_memory`): the layers holding retrieval heads, found on the teacher
with passkey probes built from *training* text (:func:`~surgeon.distill.retrieval.retrieval_heads`), get
up to ``--boost`` times the slots, taken evenly from the other layers.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_smollm2 import SINKS, kv_bytes, nll, streaming_mask  # noqa: E402

import surgeon  # noqa: E402
from surgeon.core.errors import ConfigError  # noqa: E402
from surgeon.core.report import format_table  # noqa: E402
from surgeon.core.provenance import provenance  # noqa: E402
from surgeon.distill.data import pack, pydoc_texts  # noqa: E402
from surgeon.distill.evaluate import exact_continuation, held_out_windows, make_niah_trials  # noqa: E402
from surgeon.distill.planning import plan_memory  # noqa: E402
from surgeon.distill.retrieval import retrieval_heads  # noqa: E402
from surgeon.distill.transfer import linear_units  # noqa: E402
from surgeon.export.stateful_lm import StateLayout  # noqa: E402
from surgeon.models.smollm2 import load_smollm2  # noqa: E402
from surgeon.passes import LinearizeAttention  # noqa: E402
from surgeon.passes.attention.memory_slots import set_memory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="out/bench_distill/quick/student",
                    help="a distilled model saved by benchmarks/distill_smollm2.py (surgeon.save folder), or "
                         "'untrained': SmolLM2 converted with no training (window 256 + 4 sinks, linear branch at 1e-6)")
    ap.add_argument("--configs", default="256:0,256:64,64:256",
                    help="window:slots pairs to try (slots: memory slots per layer and kv head)")
    ap.add_argument("--block", type=int, default=64, help="prefill tokens per memory update")
    ap.add_argument("--boost", type=float, default=2.5,
                    help="window:slots:r configs: slots of the best retrieval layer, in units of the uniform count")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="window:slots:r configs: layers whose best head scores within this fraction of the best "
                         "get more slots")
    ap.add_argument("--calibration-trials", type=int, default=1,
                    help="passkey probes per depth, on training text, that find the retrieval heads (':r' configs)")
    ap.add_argument("--needle-trials", type=int, default=2, help="trials per depth")
    ap.add_argument("--greedy-prompts", type=int, default=20)
    ap.add_argument("--greedy-new", type=int, default=12)
    ap.add_argument("--eval-windows", type=int, default=2, help="held-out windows per perplexity context")
    ap.add_argument("--contexts", default="1024,2048")
    ap.add_argument("--baselines", help="JSON of an earlier run of this benchmark with the same settings: its "
                    "sinks + window rows (teacher only) are reused for the windows they cover")
    ap.add_argument("--needle-only", action="store_true", help="measure the needle only (no greedy, no perplexity)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/memory_slots_smollm2.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    student_dir = Path(args.student)
    if args.student != "untrained" and not (student_dir / "recipe.json").is_file():
        raise ConfigError(f"no saved student at {student_dir}: run `python benchmarks/distill_smollm2.py --quick` "
                          "first (it saves the distilled model there), or pass --student DIR")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t0) / 60:6.1f} min] {msg}", flush=True)

    teacher, tok = load_smollm2()
    teacher.eval()
    base, _ = load_smollm2()
    if args.student == "untrained":      # sinks + window 256 + a linear branch at λ ≈ 0: what slots do with no training
        student = surgeon.apply(base, LinearizeAttention(feature_map="hedgehog", feature_dim=16, window=256,
                                                         sinks=SINKS, linear_weight_init=1e-6)).model.eval()
    else:
        student = surgeon.restore(base, student_dir).eval()
    kind = "untrained" if args.student == "untrained" else "distilled"
    units = linear_units(student)
    trained_window, sinks = units[0][1].window, units[0][1].sinks
    per_slot = kv_bytes(1) * len(units) // 30          # one more key/value per linearized layer
    log(f"student: {len(units)} linearized layers, trained at window {trained_window}, {sinks} sinks")

    contexts = [int(c) for c in args.contexts.split(",")]
    windows = {c: held_out_windows(tok, c, args.eval_windows) for c in contexts}
    teacher_nll = {c: nll(teacher, windows[c]) for c in contexts}
    depths = [0.1, 0.3, 0.5, 0.7]
    haystack = held_out_windows(tok, 1024, 4)
    trials = make_niah_trials(tok, haystack, 1024, depths, args.needle_trials, 0, teacher.config.vocab_size)
    configs = [parse_config(c) for c in args.configs.split(",")]
    longest = max([trained_window] + [w for w, _, _ in configs])
    long_prompts = list(held_out_windows(tok, max(256, 2 * longest), args.greedy_prompts))

    @torch.no_grad()
    def needle(model, mask_fn=None) -> list[float]:
        scores = []
        for per_depth in trials:
            hits = 0
            for ids, start in per_depth:
                if mask_fn is None:
                    hits += exact_continuation(model, ids, start)
                else:
                    logits = model(input_ids=ids[None], attention_mask=mask_fn(ids.shape[0]), use_cache=False).logits
                    hits += bool((logits[0, start - 1:-1].argmax(-1) == ids[start:]).all())
            scores.append(hits / len(per_depth))
        return scores

    def ratios(model, mask_fn=None) -> dict[str, float]:
        out = {}
        for c in contexts:
            a, n = nll(model, windows[c], mask_fn)
            out[f"ratio@{c}"] = round(math.exp(a / n) / math.exp(teacher_nll[c][0] / teacher_nll[c][1]), 4)
        return out

    @torch.no_grad()
    def masked_greedy(mask_fn) -> float:
        """Greedy agreement of the teacher under a sinks + window mask with the unmasked teacher (no cache:
        every step is a full forward under the mask)."""
        same = 0
        for ids, want in zip(long_prompts, teacher_greedy):
            seq = ids[None]
            for _ in range(args.greedy_new):
                logits = teacher(input_ids=seq, attention_mask=mask_fn(seq.shape[1]), use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
            same += int((seq[0, ids.shape[0]:] == want).sum())
        return round(same / (len(long_prompts) * args.greedy_new), 3)

    @torch.no_grad()
    def generated_agreement(model) -> float:
        """Greedy agreement with the teacher: same token at the same position of ``greedy_new`` generated ones."""
        same = 0
        for ids, want in zip(long_prompts, teacher_greedy):
            got = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]),
                                 max_new_tokens=args.greedy_new, min_new_tokens=args.greedy_new, do_sample=False,
                                 pad_token_id=0)[0, ids.shape[0]:]
            same += int((got == want).sum())
        return round(same / (len(long_prompts) * args.greedy_new), 3)

    with torch.no_grad():
        teacher_greedy = [teacher.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]),
                                           max_new_tokens=args.greedy_new, min_new_tokens=args.greedy_new,
                                           do_sample=False, pad_token_id=0)[0, ids.shape[0]:] for ids in long_prompts]
    teacher_needle = needle(teacher)
    log(f"teacher needle by depth {dict(zip(depths, teacher_needle))}")
    where = [i for i, s in enumerate(teacher_needle) if s >= 0.8]

    def beyond(scores: list[float]) -> float:
        """Needle score at the depths where the teacher succeeds."""
        return round(sum(scores[i] for i in where) / max(len(where), 1), 3)

    settings = {"needle_trials": args.needle_trials, "greedy_prompts": args.greedy_prompts,
                "greedy_new": args.greedy_new, "eval_windows": args.eval_windows, "contexts": contexts,
                "needle_only": args.needle_only}
    reused: dict[int, dict] = {}
    computed: dict[int, dict] = {}
    if args.baselines:
        earlier = json.loads(Path(args.baselines).read_text())
        if settings_of(earlier) != settings:
            raise ConfigError(f"--baselines {args.baselines} was run with {settings_of(earlier)}, not {settings}")
        reused = {r["window"]: r for r in earlier["rows"] if r["model"].startswith("sinks")}
    calibration: dict[str, object] = {}

    def retrieval_scores() -> dict[int, float]:
        """Each layer's best retrieval head (teacher attention mass on the passkey), on probes of training text."""
        if not calibration:
            hay = pack(pydoc_texts("train"), 1024, tok, what="calibration text")[:4]
            probes = [t for per_depth in make_niah_trials(tok, hay, 1024, depths, args.calibration_trials, 11,
                                                          teacher.config.vocab_size) for t in per_depth]
            mass = retrieval_heads(teacher, probes)
            calibration["layer_score"] = [round(float(x), 4) for x in mass.max(1).values]
            calibration["heads"] = [[round(float(x), 3) for x in row] for row in mass]
            top = sorted(range(len(mass)), key=lambda i: -calibration["layer_score"][i])[:6]
            log("retrieval heads (teacher attention mass on the passkey, best head per layer): "
                + ", ".join(f"layer {i}: {calibration['layer_score'][i]}" for i in top))
        return dict(enumerate(calibration["layer_score"]))

    rows = []
    for window, slots, planned in tqdm(configs, desc="window:slots"):
        set_memory(student, 0)
        for _, unit in units:
            unit.window = window
        state = StateLayout.of(student).state_bytes(batch=1) + slots * per_slot
        per_layer = plan_memory(retrieval_scores(), slots, args.boost, args.threshold) if planned else slots
        set_memory(student, per_layer, block=args.block)
        name = f"{kind} hybrid, window {window} + {slots} memory slots" + (
            f" (per layer toward retrieval heads, ×{args.boost:g} at most)" if planned else "")
        plan = {"slots_per_layer": per_layer} if planned else {}
        t1 = time.perf_counter()
        n = needle(student)
        eq_window = state // kv_bytes(1) - SINKS
        if args.needle_only:
            rows.append({"model": name, "window": window, **plan,
                         "slots": slots, "state_MiB@8K": round(state / 2**20, 2),
                         "state_%KV@8K": round(100 * state / kv_bytes(8192), 2), "needle": n,
                         "needle_where_teacher_succeeds": beyond(n)})
            n = needle(teacher, streaming_mask(eq_window, SINKS))
            rows.append({"model": f"sinks + window {eq_window} (no training, equal state)", "window": eq_window,
                         "slots": 0, "state_MiB@8K": round(kv_bytes(eq_window + SINKS) / 2**20, 2),
                         "state_%KV@8K": round(100 * kv_bytes(eq_window + SINKS) / kv_bytes(8192), 2), "needle": n,
                         "needle_where_teacher_succeeds": beyond(n)})
            log(f"{rows[-2]['model']}: needle {rows[-2]['needle']}; {rows[-1]['model']}: needle {n}")
            continue
        row = {"model": name, "window": window, "slots": slots, **plan,
               "state_MiB@8K": round(state / 2**20, 2), "state_%KV@8K": round(100 * state / kv_bytes(8192), 2),
               "needle": n, "needle_where_teacher_succeeds": beyond(n),
               "greedy_long": generated_agreement(student),
               **ratios(student), "seconds": round(time.perf_counter() - t1, 1)}
        rows.append(row)
        log(f"{row['model']}: {row}")
        if eq_window in reused or eq_window in computed:
            earlier_row, source = (reused[eq_window], args.baselines) if eq_window in reused else \
                (computed[eq_window], "this run")
            rows.append({**earlier_row, "reused_from": source})
            log(f"{rows[-1]['model']}: reused from {source}")
            continue
        mask = streaming_mask(eq_window, SINKS)
        n = needle(teacher, mask)
        rows.append({"model": f"sinks + window {eq_window} (no training, equal state)", "window": eq_window, "slots": 0,
                     "state_MiB@8K": round(kv_bytes(eq_window + SINKS) / 2**20, 2),
                     "state_%KV@8K": round(100 * kv_bytes(eq_window + SINKS) / kv_bytes(8192), 2),
                     "needle": n, "needle_where_teacher_succeeds": beyond(n),
                     "greedy_long": masked_greedy(mask), **ratios(teacher, mask)})
        computed[eq_window] = rows[-1]     # another configuration with the same state reuses it
        log(f"{rows[-1]['model']}: {rows[-1]}")
    cols = ["model", "state_MiB@8K", "state_%KV@8K", "needle_where_teacher_succeeds",
            *([] if args.needle_only else ["greedy_long", *[f"ratio@{c}" for c in contexts]])]
    print(format_table(cols, rows))
    result = {"student": str(student_dir), "trained_window": trained_window, "sinks": sinks, "block": args.block,
              "retrieval_calibration": {"boost": args.boost, "threshold": args.threshold,
                                        "trials_per_depth": args.calibration_trials, "context": 1024,
                                        "text": "pydoc train split (not the held-out haystack), other passkeys",
                                        **calibration},
              "needle": {"context": 1024, "depths": depths, "trials_per_depth": args.needle_trials,
                         "teacher": teacher_needle},
              "greedy": {"prompts": len(long_prompts), "prompt_tokens": int(long_prompts[0].shape[0]),
                         "new_tokens": args.greedy_new},
              "eval_windows": args.eval_windows, "settings": settings, "rows": rows,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, fp32, eager PyTorch (both sides)",
              "minutes": round((time.perf_counter() - t0) / 60, 1),
              "provenance": provenance(counts={
                  "needle_depths": len(depths), "needle_trials_per_depth": args.needle_trials,
                  "greedy_prompts": len(long_prompts), "greedy_new_tokens": args.greedy_new,
                  "eval_windows": args.eval_windows, "calibration_trials_per_depth": args.calibration_trials,
                  "configs": args.configs, "needle_only": args.needle_only})}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if not args.needle_only:
        plot(rows, out.with_suffix(".png"))
    log(f"wrote {out}")


def parse_config(spec: str) -> tuple[int, int, bool]:
    """``window:slots`` or ``window:slots:r`` (slots planned per layer toward the retrieval layers)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "r") or not all(p.isdigit() for p in parts[:2]):
        raise ConfigError(f"--configs: {spec!r} is not window:slots or window:slots:r (e.g. 128:192:r)")
    return int(parts[0]), int(parts[1]), len(parts) == 3


def settings_of(result: dict) -> dict:
    """The settings a result was measured with (read from its fields, so older files compare too)."""
    return {"needle_trials": result["needle"]["trials_per_depth"], "greedy_prompts": result["greedy"]["prompts"],
            "greedy_new": result["greedy"]["new_tokens"], "eval_windows": result["eval_windows"],
            "contexts": sorted(int(k.split("@")[1]) for k in result["rows"][0] if k.startswith("ratio@")),
            "needle_only": not any("greedy_long" in r for r in result["rows"])}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    series = (("o", "hybrid + memory slots", lambda r: not r["model"].startswith("sinks") and
               "slots_per_layer" not in r),
              ("^", "… slots planned toward retrieval layers", lambda r: "slots_per_layer" in r),
              ("s", "sinks + window, no training", lambda r: r["model"].startswith("sinks")))
    for marker, label, belongs in series:
        sel = sorted((r for r in rows if belongs(r)), key=lambda r: r["state_MiB@8K"])
        if not sel:
            continue
        xs = [r["state_MiB@8K"] for r in sel]
        ax[0].plot(xs, [r["needle_where_teacher_succeeds"] for r in sel], marker=marker, label=label)
        ax[1].plot(xs, [r["ratio@1024"] for r in sel], marker=marker, label=label)
    ax[0].set(xlabel="decode state at 8K (MiB)", ylabel="needle beyond the window", title="recall")
    ax[1].set(xlabel="decode state at 8K (MiB)", ylabel="perplexity ratio @1024", title="fidelity")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
