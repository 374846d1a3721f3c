"""Fidelity of a converted SmolLM2-135M-Instruct against the original, and against zero-training exact-token
baselines at the same decode-state bytes, on held-out prose / code / chat prompts (surgeon.fidelity).

Configurations (each row names its decode-state bytes, fp32, batch 1):
* the distilled student (``--student``, saved by benchmarks/distill_smollm2.py) as trained, and with its
  linear branch switched off (λ = 0: the same exact tokens, no state) — what the linear state is worth;
* the same with memory slots planned toward retrieval heads (``--slots`` per layer on average);
* baselines on the original model at each of those byte counts: sinks + window (StreamingLLM), H2O and TOVA
  eviction (a share of the exact tokens chosen by attention), and a per-head split (retrieval heads keep
  heavy hitters, the others sinks + window).

Stages: ``validation`` scores every configuration on the validation prompts and picks, per byte count, the
strongest baseline and the best eviction split; ``test`` scores the picked ones once on the test prompts;
``needle`` runs passkey trials at several contexts. Rows are cached in ``--work`` (a rerun resumes).

    python benchmarks/fidelity_smollm2.py --stage all --val-prompts 1024:1 --prompts 1024:4,4096:1
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch

import surgeon
from surgeon.core.provenance import provenance
from surgeon.core.report import format_table
from surgeon.distill.planning import plan_memory
from surgeon.distill.retrieval import retrieval_heads
from surgeon.export.stateful_lm import StateLayout
from surgeon.fidelity import (KINDS, ExactTokenModel, ExactTokenPolicy, HFRunner, compare, make_needles, make_prompts,
                              measure, needle_hit, needle_summary, reference, summarize)
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes.attention.memory_slots import set_memory

SINKS = 4
TOKEN_HEAD_BYTES = 2 * 64 * 4          # K + V of one token in one kv head, fp32
KV_HEADS, LAYERS = 3, 30
KV_AT_8K = 8192 * LAYERS * KV_HEADS * TOKEN_HEAD_BYTES


def parse_prompts(spec: str) -> list[tuple[int, int]]:
    return [(int(c), int(n)) for c, n in (part.split(":") for part in spec.split(","))]


class Student:
    """One restored student switched in place between λ trained / 0 and slots on / off."""

    def __init__(self, base, path: Path) -> None:
        self.model = surgeon.restore(base, path).eval()
        self.params = {n: p for n, p in self.model.named_parameters() if n.endswith("linear_log_weight")}
        self.trained = {n: p.detach().clone() for n, p in self.params.items()}
        set_memory(self.model, 0)
        self.base_bytes = StateLayout.of(self.model).state_bytes(batch=1)

    def set(self, linear: bool, slots: list[int] | None) -> HFRunner:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.trained[n] if linear else torch.full_like(p, -10.0))      # λ = e^-100 ≈ 0
        set_memory(self.model, slots or 0)
        return HFRunner(self.model)

    def bytes(self, slots: list[int] | None) -> int:
        return self.base_bytes + sum(slots or []) * KV_HEADS * TOKEN_HEAD_BYTES


def baselines(tokens_per_head: int, retrieval: torch.Tensor, shares: tuple[float, ...] = (0.5,)
              ) -> dict[str, ExactTokenPolicy]:
    """Exact-token policies keeping ``tokens_per_head`` tokens in every layer and kv head on average;
    ``shares``: fractions of the room beyond the sinks given to heavy hitters (H2O, TOVA)."""
    room = tokens_per_head - SINKS
    out = {f"sinks+window {room}": ExactTokenPolicy(sinks=SINKS, window=room)}
    for score in ("h2o", "tova"):
        for share in shares:
            heavy = int(room * share)
            out[f"{score} {room - heavy}+{heavy}"] = ExactTokenPolicy(sinks=SINKS, window=room - heavy, heavy=heavy,
                                                                      score=score)
    # per-head split: every head keeps sinks + half the room as its window; the other half of all heads'
    # room goes to the top third of kv heads by retrieval score, as heavy hitters (H2O)
    window = room // 2
    pool = (room - window) * LAYERS * KV_HEADS
    top = retrieval.flatten().argsort(descending=True)[: LAYERS * KV_HEADS // 3]
    heavy = torch.zeros(LAYERS * KV_HEADS, dtype=torch.long)
    heavy[top] = pool // len(top)
    out[f"per-head {window}+retrieval"] = ExactTokenPolicy(
        sinks=SINKS, window=window, heavy=tuple(tuple(int(x) for x in row) for row in heavy.view(LAYERS, KV_HEADS)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="out/bench_distill/quick_w128/student")
    ap.add_argument("--stage", choices=("validation", "test", "needle", "all", "report"), default="all")
    ap.add_argument("--prompts", default="1024:4,4096:1", help="test prompts, context:count per kind")
    ap.add_argument("--val-prompts", default="1024:1", help="validation prompts, context:count per kind")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=192, help="memory slots per layer on average (planned)")
    ap.add_argument("--needle-contexts", default="2048,4096")
    ap.add_argument("--needle-keys", type=int, default=2, help="passkeys per haystack and depth")
    ap.add_argument("--needle-seeds", default="0", help="passkey seeds (each adds haystacks × depths × keys trials)")
    ap.add_argument("--shares", default="0.5", help="heavy-hitter shares of the room beyond the sinks (validation grid)")
    ap.add_argument("--needle-configs", default="student + slots,@slots",
                    help="configurations in the needle stage (@slots: the strongest baseline at that level)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="out/fidelity")
    ap.add_argument("--out", default="benchmarks/results/fidelity_smollm2.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows_file = work / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    done = {(r["config"], r["prompt"]) for r in rows}
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - t0) / 60:6.1f} min] {msg}", flush=True)

    def add(row: dict) -> None:
        rows.append(row)
        done.add((row["config"], row["prompt"]))
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    teacher, tok = load_smollm2()
    teacher.eval()
    original = HFRunner(teacher)
    student = Student(load_smollm2()[0], Path(args.student))

    # retrieval heads, measured on validation passkeys (choices are made on validation only)
    calib_file = work / "retrieval.pt"
    if calib_file.exists():
        scores = torch.load(calib_file)
    else:
        probes = [(torch.tensor(ids), a) for ids, a, _ in make_needles(tok, "validation", 1024, haystacks=4,
                                                                       depths=(0.2, 0.5), keys_per_cell=1)]
        scores = retrieval_heads(teacher, probes)            # (layers, q heads)
        torch.save(scores, calib_file)
    kv_scores = scores.view(LAYERS, KV_HEADS, -1).amax(-1)
    plan = plan_memory({i: float(row.max()) for i, row in enumerate(scores)}, args.slots)
    log(f"retrieval heads measured; slot plan {plan}")

    levels = {"": None, " + slots": plan}
    candidates: dict[str, tuple[int, object]] = {}
    for suffix, slots in levels.items():
        b = student.bytes(slots)
        candidates[f"student{suffix}"] = (b, ("student", True, slots))
        candidates[f"student{suffix} λ=0"] = (b, ("student", False, slots))
        per_head = b // (LAYERS * KV_HEADS * TOKEN_HEAD_BYTES)
        for name, policy in baselines(per_head, kv_scores, tuple(map(float, args.shares.split(",")))).items():
            candidates[f"{name} @{suffix or ' student'}".replace("@ + ", "@").replace("@ ", "@")] = (
                policy.state_bytes(teacher.config), ("baseline", policy, suffix))

    def runner(spec):
        if spec[0] == "student":
            return student.set(spec[1], spec[2])
        return ExactTokenModel(teacher, spec[1])

    refs: dict[str, dict] = {}

    def score(split: str, names: list[str]) -> None:
        for context, n in parse_prompts(args.prompts if split == "test" else args.val_prompts):
            for kind in KINDS:
                for i, p in enumerate(make_prompts(tok, kind, split, context, n)):
                    pid = f"{split}/{kind}/{context}/{i}"
                    todo = [c for c in names if (c, pid) not in done]
                    if not todo:
                        continue
                    if pid not in refs:
                        refs.clear()
                        refs[pid] = reference(original, p.ids, args.new_tokens)
                    ref = refs[pid]
                    for c in todo:
                        t1 = time.perf_counter()
                        r = measure(runner(candidates[c][1]), ref)
                        r.pop("greedy_tokens")
                        add({"config": c, "prompt": pid, "split": split, "kind": kind, "context": context,
                             "ref_nll": ref["nll"], "bytes": candidates[c][0], **r,
                             "seconds": round(time.perf_counter() - t1, 2)})
                    scored = ", ".join(f"{r['config']} {r['top1']:.2f}/{r['greedy']:.2f}" for r in rows[-len(todo):])
                    log(f"{pid} (top-1/greedy): {scored}")

    def picks() -> dict[str, str]:
        """Per byte level, the strongest baseline on validation (mean teacher-forced top-1 over every prompt)."""
        val = [r for r in rows if r["split"] == "validation"]
        best = {}
        for suffix in levels:
            tag = f"@{suffix.strip(' +') or 'student'}"
            means = {}
            for c in candidates:
                if c.endswith(tag) and not c.startswith("student"):
                    vals = [r["top1"] for r in val if r["config"] == c]
                    if vals:
                        means[c] = sum(vals) / len(vals)
            if means:
                best[tag] = max(means, key=means.get)
        return best

    if args.stage in ("validation", "all"):
        score("validation", list(candidates))
    chosen = picks()
    log(f"strongest baselines on validation: {chosen}")
    test_configs = [c for c in candidates if c.startswith("student")] + list(chosen.values())
    if args.stage in ("test", "all"):
        score("test", test_configs)
    needle_rows_file = work / "needle.jsonl"
    needle_rows = [json.loads(x) for x in needle_rows_file.read_text().splitlines()] if needle_rows_file.exists() else []
    if args.stage in ("needle", "all"):
        names = [chosen.get(c, c) for c in args.needle_configs.split(",")]
        seen = {(r["config"], r["trial"]) for r in needle_rows}
        for context, seed in itertools.product(map(int, args.needle_contexts.split(",")),
                                               map(int, args.needle_seeds.split(","))):
            trials = make_needles(tok, "test", context, keys_per_cell=args.needle_keys, seed=seed)
            for t, (ids, start, info) in enumerate(trials):
                tid = f"test/{context}/{t}" if seed == 0 else f"test/{context}/s{seed}/{t}"
                if all((c, tid) in seen for c in names):
                    continue
                orig = needle_hit(original, ids, start)
                for c in names:
                    if (c, tid) in seen:
                        continue
                    row = {"config": c, "trial": tid, "context": context, "seed": seed, "orig_hit": orig,
                           "hit": needle_hit(runner(candidates[c][1]), ids, start), **info}
                    needle_rows.append(row)
                    with needle_rows_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                log(f"needle {tid} depth {info['depth']}: original {orig}, " +
                    ", ".join(f"{r['config']} {r['hit']}" for r in needle_rows[-len(names):]))
    write(args, rows, needle_rows, candidates, chosen, plan, kv_scores)


def _fmt(x: float, ci) -> str:
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "")


def write(args, rows, needle_rows, candidates, chosen, plan, kv_scores) -> None:
    summary = summarize(rows, ("config", "split", "kind", "context"))
    table = []
    for (c, split, kind, context), s in sorted(summary.items(), key=lambda kv: (kv[0][1], kv[0][3], kv[0][2], kv[0][0])):
        table.append([split, context, kind, c, f"{candidates[c][0] / 2**20:.2f}", s["n"], _fmt(s["top1"], s["top1_ci"]),
                      _fmt(s["greedy"], s["greedy_ci"]), f"{s['first_divergence']:.1f}", f"{s['kl']:.3f}",
                      _fmt(s["ppl_ratio"], s["ppl_ratio_ci"])])
    columns = ["split", "ctx", "kind", "config", "MiB", "n", "top-1", "greedy", "1st div", "KL", "ppl ratio"]
    print(format_table(columns, [dict(zip(columns, row)) for row in table]))
    comparisons = {}
    for tag, base in chosen.items():
        level = "" if tag == "@student" else " + slots"
        for c in (f"student{level}", f"student{level} λ=0"):
            comparisons[f"{c} vs {base}"] = compare([r for r in rows if r["split"] == "test"], c, base)
        comparisons[f"student{level} vs student{level} λ=0"] = compare(
            [r for r in rows if r["split"] == "test"], f"student{level}", f"student{level} λ=0")
    for name, comp in comparisons.items():
        for key, d in comp.items():
            print(f"{name} {key}: top-1 {d['top1']:+.3f} {d['top1_verdict']}, greedy {d['greedy']:+.3f} "
                  f"{d['greedy_verdict']}, log ppl {d['log_ppl_ratio']:+.4f} {d['log_ppl_ratio_verdict']} (n={d['n']})")
    needles = needle_summary(needle_rows)
    for (c, ctx), s in sorted(needles.items()):
        print(f"needle {ctx} {c}: {s['hits']}/{s['trials']}, where the original is right "
              f"{s['hits_where_original_right']}/{s['original_right']}")
    counts = {"prompts": {f"{k[1]}/{k[2]}/{k[3]}": v["n"] for k, v in summary.items() if k[0].startswith("student")},
              "needle_trials": {f"{k[0]}@{k[1]}": v["trials"] for k, v in needles.items()},
              "new_tokens": args.new_tokens, "bootstrap_draws": 2000}
    result = {"student": args.student, "kv_cache_bytes_at_8k": KV_AT_8K, "slot_plan": plan,
              "configs": {c: {"bytes": b, "percent_of_kv_at_8k": round(100 * b / KV_AT_8K, 2),
                              "spec": str(spec[1]) if spec[0] == "baseline" else {"linear": spec[1], "slots": spec[2]}}
                          for c, (b, spec) in candidates.items()},
              "strongest_baseline_on_validation": chosen,
              "summary": [{"config": k[0], "split": k[1], "kind": k[2], "context": k[3], **v} for k, v in summary.items()],
              "comparisons_on_test": {name: [{"kind": k[0], "context": k[1], **d} for k, d in comp.items()]
                                      for name, comp in comparisons.items()},
              "needle": [{"config": k[0], "context": k[1], **v} for k, v in needles.items()],
              "retrieval_kv_head_scores": kv_scores.tolist(),
              "provenance": provenance(counts=counts)}
    Path(args.out).write_text(json.dumps(result, indent=1, default=lambda x: x if not isinstance(x, float) or
                                         math.isfinite(x) else None))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
