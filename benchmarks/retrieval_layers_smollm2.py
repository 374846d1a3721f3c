"""Which SmolLM2 layer, kept as softmax attention, brings back recall beyond the window?

The converted model (hedgehog φ, 4 sinks, window w, untrained with λ ≈ 0, i.e. sinks + window) cannot
retrieve a needle placed before its window. For each of the 30 layers in turn, that one layer gets its
original softmax attention back and the needle probes run again (passkey at depths 0.1–0.7 of a
1,024-token held-out haystack, 2 trials per depth; the teacher retrieves all). A layer that alone restores
retrieval is what a hybrid plan should keep as softmax when recall matters; each row gives what keeping it
costs in decode state at 8 K tokens. Writes JSON + a PNG (score per layer).

    python benchmarks/retrieval_layers_smollm2.py              # window 256, ~15 min on 2 threads
    python benchmarks/retrieval_layers_smollm2.py --sets 0-14,15-29,8-21,0-9,10-19,20-29   # blocks kept together
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from surgeon.core.report import format_table
from surgeon.core.provenance import provenance
from surgeon.distill.evaluate import exact_continuation, held_out_windows, make_niah_trials
from surgeon.distill.planning import measure_retrieval, retrieval_scores, state_bytes_fn
from surgeon.models.smollm2 import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--feature-dim", type=int, default=16)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=2, help="trials per depth")
    ap.add_argument("--sets", help="blocks of layers kept softmax together, e.g. 0-14,15-29 (writes *_sets.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teacher, tok = load_smollm2()
    teacher.eval()
    depths = [0.1, 0.3, 0.5, 0.7]
    haystack = held_out_windows(tok, args.context, 4)
    per_depth = make_niah_trials(tok, haystack, args.context, depths, args.trials, 0, teacher.config.vocab_size)
    trials = [t for depth in per_depth for t in depth]
    beyond = all((1 - d) * args.context - 16 > args.window for d in depths)   # the needle (~16 tokens) ends before it
    with torch.no_grad():
        teacher_score = sum(exact_continuation(teacher, ids, start) for ids, start in trials) / len(trials)
    linearize = dict(feature_map="hedgehog", feature_dim=args.feature_dim, sinks=args.sinks, linear_weight_init=1e-6)
    if args.sets:
        return _sets(teacher, trials, teacher_score, args, linearize, started)
    scores = measure_retrieval(teacher, trials, args.window, **linearize)
    state = state_bytes_fn(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, features=2 * args.feature_dim,
                           sinks=args.sinks, context=8192)
    rows = [{"softmax layer": "none" if layer < 0 else layer, "needle score": round(score, 3),
             **{f"state_MiB@8K, window {w}": round(state(w, () if layer < 0 else (layer,)) / 2**20, 2)
                for w in (64, args.window)}}
            for layer, score in sorted(scores.items())]
    print(format_table(list(rows[0]), rows))
    restoring = [layer for layer, score in scores.items() if layer >= 0 and score >= 0.8 * teacher_score]
    result = {
        "model": "SmolLM2-135M-Instruct", "window": args.window, "sinks": args.sinks, "feature_dim": args.feature_dim,
        "context": args.context, "depths": depths, "trials": len(trials), "needle_before_window": beyond,
        "teacher_score": teacher_score, "scores": {str(k): v for k, v in sorted(scores.items())},
        "layers_restoring_recall": restoring, "rows": rows,
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}, fp32, eager PyTorch",
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "provenance": provenance(counts={"trials": len(trials), "depths": len(depths), "trials_per_depth": args.trials,
                                         "layer_settings": len(scores)})}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "retrieval_layers_smollm2.json"
    path.write_text(json.dumps(result, indent=2))
    _plot(scores, teacher_score, args.window, out / "retrieval_layers_smollm2.png")
    print(f"teacher {teacher_score:.2f}; layers that alone restore ≥ 80 % of it: {restoring}; wrote {path}")


def _sets(teacher, trials, teacher_score: float, args, linearize: dict, started: float) -> None:
    """Blocks of layers kept softmax together: how many layers does recall beyond the window need?"""
    blocks = {}
    for spec in args.sets.split(","):
        lo, _, hi = spec.partition("-")
        blocks[spec] = tuple(range(int(lo), int(hi or lo) + 1))
    scores = retrieval_scores(teacher, trials, args.window, [()] + list(blocks.values()), **linearize)
    rows = [{"softmax layers": "none", "count": 0, "needle score": scores[()]}] + [
        {"softmax layers": spec, "count": len(kept), "needle score": scores[kept]} for spec, kept in blocks.items()]
    print(format_table(list(rows[0]), rows))
    result = {"model": "SmolLM2-135M-Instruct", "window": args.window, "sinks": args.sinks, "context": args.context,
              "trials": len(trials), "teacher_score": teacher_score, "rows": rows,
              "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}, fp32, eager PyTorch",
              "minutes": round((time.perf_counter() - started) / 60, 1),
              "provenance": provenance(counts={"trials": len(trials), "trials_per_depth": args.trials,
                                               "sets": len(blocks)})}
    path = Path(args.out) / "retrieval_layers_smollm2_sets.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"teacher {teacher_score:.2f}; wrote {path}")


def _plot(scores: dict[int, float], teacher: float, window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [k for k in sorted(scores) if k >= 0]
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.bar(layers, [scores[k] for k in layers])
    ax.axhline(teacher, ls="--", color="gray", label="teacher (all softmax)")
    ax.axhline(scores[-1], ls=":", color="red", label=f"no softmax layer (sinks + window {window})")
    ax.set_xlabel("layer kept as softmax attention")
    ax.set_ylabel("needle retrieved")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
