"""Long-context prefill, decode and prefill memory: original vs linearized, each in torch eager AND onnxruntime.

Like is compared with like. Both models run in the same runtimes: the linearized model (hedgehog + window 64
on all 30 layers of SmolLM2-135M, untrained feature maps: speed and memory do not depend on training) and
the original (every layer softmax, with its KV cache), both exported through the project's stateful
prefill/decode export (``export_causal_lm``; the original with ``softmax_only=True``). The linearized model
is exported twice: its recurrence as ONNX's standard ``LinearAttention`` node (opset 27) and as our own ops
(the opset-18 fallback), so the table shows latency both ways. Prefill computes the last position's logits
only in every engine (as generation does).

Timing: every engine is warmed at each timed shape (one untimed prefill at that length; decode: untimed
steps at that context) and timed ``--repeats`` (≥ 3) times; rows give the median and the spread (min, max).
The table leads with **best vs best**: the fastest engine of the original against the fastest engine of
the linearized model at each length. The JSON carries ``provenance`` (commit, versions, threads, load
average) plus the load average before and after the run: rerun when it is above ~2.5 on 2 cores.

Memory: resident growth of eager ``generate()`` on long prompts, with transformers' chunked prefill
(``generation_config.prefill_chunk_size``, set on linearized models by ``LinearizeAttention``) and without.

    python benchmarks/long_context.py                       # SmolLM2-135M (minutes to hours; quiet machine)
    python benchmarks/long_context.py --quick               # tiny model, seconds: checks the script runs

Prints tables and writes ``benchmarks/results/long_context.json`` and ``long_context.png``
(``--quick``: ``long_context_quick.json``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import DynamicCache

import surgeon
import surgeon.export
from surgeon.core.provenance import provenance
from surgeon.core.report import Report
from surgeon.export.causal_lm import export_causal_lm
from surgeon.passes import LinearizeAttention

RESULTS = Path(__file__).parent / "results"
# engine -> (model, runtime kind, export folder key)
ENGINES = {"original eager": ("original", "eager", None), "original ort": ("original", "ort", "original"),
           "linear eager": ("linear", "eager", None), "linear ort (LinearAttention)": ("linear", "ort", "linear_op"),
           "linear ort (ours)": ("linear", "ort", "linear_ours")}


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median and spread of ``repeats`` timed calls (seconds); the caller warms ``fn`` first."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


class Engines:
    """The (model, runtime) pairs behind one prefill / decode interface."""

    def __init__(self, models: dict[str, torch.nn.Module], dirs: dict[str, Path], threads: int):
        self.models, self.dirs, self.threads = models, dirs, threads
        self.ort = {key: surgeon.export.OnnxGenerator(d, threads=threads) for key, d in dirs.items()}

    def runtime(self, engine: str) -> str:
        model, kind, key = ENGINES[engine]
        if kind == "ort":
            import onnxruntime as ort

            op = self.ort[key].manifest.exporter.get("linear_attention_op", {}).get("op", "-")
            return f"onnxruntime {ort.__version__} CPU ({op if model == 'linear' else 'KV cache'})"
        return f"torch {torch.__version__} eager" + (" (SDPA, DynamicCache)" if model == "original" else "")

    def prefill(self, engine: str, ids: torch.Tensor) -> Callable[[], object]:
        model, kind, key = ENGINES[engine]
        if kind == "ort":
            return lambda: self.ort[key].run_prefill(ids)

        def run() -> object:
            with torch.no_grad():
                return self.models[model](ids, use_cache=False, logits_to_keep=1)
        return run

    def decode(self, engine: str, ids: torch.Tensor, context: int, warmup: int, steps: int) -> list[float]:
        """Seconds of each of ``steps`` decode steps after a ``context``-token prefill and ``warmup`` untimed steps."""
        model, kind, key = ENGINES[engine]
        times = []
        if kind == "ort":
            gen = self.ort[key]
            _, state = gen.run_prefill(ids[:, :context])
            for t in range(context, context + warmup + steps):
                start = time.perf_counter()
                _, state = gen.run_decode(ids[:, t:t + 1].numpy(), np.full((1, 1), t), state)
                times.append(time.perf_counter() - start)
            return times[warmup:]
        lm = self.models[model]
        cache = DynamicCache(config=lm.config)
        with torch.no_grad():
            lm(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
            for t in range(context, context + warmup + steps):
                start = time.perf_counter()
                lm(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - start)
        return times[warmup:]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(fn: Callable[[], object], every: float = 0.002) -> int:
    """Peak resident-memory growth (bytes) while ``fn`` runs, sampled by a thread every ``every`` seconds."""
    gc.collect()
    base, peak, done = rss_bytes(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(every)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_bytes()) - base


def load_models(quick: bool) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    if quick:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                       max_position_embeddings=8192)
        original, name = transformers.LlamaForCausalLM(cfg).eval(), "tiny Llama (hidden 64, 2 layers, 4/2 heads)"
        recipe = LinearizeAttention(feature_map="hedgehog", window=16, sinks=4)
    else:
        from surgeon.models.smollm2 import load_smollm2

        original, _ = load_smollm2()
        original.eval()
        name = "SmolLM2-135M-Instruct"
        recipe = LinearizeAttention(feature_map="hedgehog", window=64, sinks=4)
    import copy

    linear = surgeon.apply(copy.deepcopy(original), recipe).model.eval()
    return original, linear, f"{name}; linearized: every layer {recipe}"


def export_all(original: torch.nn.Module, linear: torch.nn.Module, work: Path) -> tuple[dict[str, Path], dict]:
    """Export (once per work folder) the original and both linearized graphs; returns folders and export facts."""
    plan = {"original": (original, {"softmax_only": True}), "linear_op": (linear, {"linear_op": "onnx"}),
            "linear_ours": (linear, {"linear_op": "ours"})}
    dirs, facts = {}, {}
    for key, (model, kw) in plan.items():
        path = work / key
        if not (path / "manifest.json").is_file():
            print(f"exporting {key} (prefill + decode)...", flush=True)
            export_causal_lm(model, path, overwrite=True, last_logits_only=True, **kw)
        from surgeon.export.linear_attention_op import count_nodes
        manifest = json.loads((path / "manifest.json").read_text())
        n_layers = getattr(model.config, "num_hidden_layers", 1)
        facts[key] = {"export_seconds": manifest["exporter"].get("export_seconds"),
                      "linear_attention_op": manifest["exporter"].get("linear_attention_op"),
                      "nodes": {g: count_nodes(path / f"{g}.onnx")["total"] for g in ("prefill", "decode")},
                      "nodes_per_layer": {g: round(count_nodes(path / f"{g}.onnx")["total"] / n_layers, 1)
                                          for g in ("prefill", "decode")}}
        dirs[key] = path
    return dirs, facts


def best_vs_best(rows: list[dict], key: str) -> list[dict]:
    """Per length: the fastest original engine against the fastest linearized one (> 1: linearized faster)."""
    out = []
    for n in sorted({r[key] for r in rows}):
        best = {}
        for model in ("original", "linear"):
            mine = [r for r in rows if r[key] == n and r["model"] == model]
            if mine:
                best[model] = min(mine, key=lambda r: r["median"])
        if len(best) == 2:
            out.append({key: n, "original": best["original"]["engine"], "original_median": best["original"]["median"],
                        "linear": best["linear"]["engine"], "linear_median": best["linear"]["median"],
                        "speedup": best["original"]["median"] / best["linear"]["median"]})
    return out


def same_runtime(rows: list[dict], key: str) -> list[dict]:
    """Original / linearized ratios within eager and within onnxruntime (fastest linearized graph)."""
    out = []
    for n in sorted({r[key] for r in rows}):
        for kind in ("eager", "ort"):
            o = [r for r in rows if r[key] == n and r["model"] == "original" and ENGINES[r["engine"]][1] == kind]
            lin = [r for r in rows if r[key] == n and r["model"] == "linear" and ENGINES[r["engine"]][1] == kind]
            if o and lin:
                best = min(lin, key=lambda r: r["median"])
                out.append({key: n, "runtime": kind, "linear_engine": best["engine"], "original": o[0]["median"],
                            "linear": best["median"], "speedup": o[0]["median"] / best["median"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths: check that the script runs")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=None,
                        help="prompt lengths for the generate() resident-memory check")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="generate()'s prefill_chunk_size for the memory check (default: the model's, 2048)")
    parser.add_argument("--ort-original-max", type=int, default=8192,
                        help="skip the original's ORT prefill above this (unfused attention: heads x T^2 floats)")
    parser.add_argument("--eager-max", type=int, default=16384, help="skip eager prefill above this")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--decode-warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine and shape (median, min, max)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be ≥ 3 (median and spread)")
    q = args.quick
    args.lengths = args.lengths or ([128, 256] if q else [512, 1024, 2048, 4096, 8192, 16384])
    args.contexts = args.contexts or ([32, 128] if q else [128, 512, 2048, 8192])
    args.memory_lengths = args.memory_lengths or ([512, 2048] if q else [2048, 8192, 32768])
    args.prefill_chunk = args.prefill_chunk or (128 if q else None)
    work = Path(args.workdir or ("out/long_context_quick" if q else "out/long_context"))
    out_path = Path(args.out or RESULTS / ("long_context_quick.json" if q else "long_context.json"))
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]

    original, linear, description = load_models(q)
    dirs, export_facts = export_all(original, linear, work)
    eng = Engines({"original": original, "linear": linear}, dirs, args.threads)
    vocab = original.config.vocab_size

    prefill: list[dict[str, Any]] = []
    for n in args.lengths:
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        for engine, (model, kind, _) in ENGINES.items():
            if (kind == "eager" and n > args.eager_max) or (engine == "original ort" and n > args.ort_original_max):
                continue
            run = eng.prefill(engine, ids)
            run()                                                    # warm at the timed shape
            row = {"tokens": n, "engine": engine, "model": model, "runtime": eng.runtime(engine),
                   "threads": args.threads, **timed(run, args.repeats)}
            prefill.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        gc.collect()

    decode: list[dict[str, Any]] = []
    for ctx in args.contexts:
        ids = torch.randint(0, vocab, (1, ctx + args.decode_warmup + args.decode_steps),
                            generator=torch.Generator().manual_seed(ctx))
        for engine, (model, kind, key) in ENGINES.items():
            per_repeat = [1000 * statistics.median(eng.decode(engine, ids, ctx, args.decode_warmup, args.decode_steps))
                          for _ in range(args.repeats)]
            gen = eng.ort["original" if model == "original" else "linear_op"]
            row = {"context": ctx, "engine": engine, "model": model, "runtime": eng.runtime(engine),
                   "threads": args.threads, "median": statistics.median(per_repeat), "min": min(per_repeat),
                   "max": max(per_repeat), "n": len(per_repeat), "unit": "ms per token",
                   "state_bytes": gen.state_bytes(context=ctx)}
            decode.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        gc.collect()

    memory: list[dict[str, Any]] = []
    for n in args.memory_lengths:
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(7 * n))
        default_chunk = linear.generation_config.prefill_chunk_size
        for chunk in dict.fromkeys([args.prefill_chunk or default_chunk, None]):
            linear.generation_config.prefill_chunk_size = chunk

            def gen() -> object:
                with torch.no_grad():
                    return linear.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                           do_sample=False)
            start = time.perf_counter()
            grown = peak_growth(gen)
            row = {"prompt_tokens": n, "prefill_chunk_size": chunk, "resident_growth_gb": grown / 1e9,
                   "seconds": time.perf_counter() - start}
            memory.append(row)
            print(row, flush=True)
        linear.generation_config.prefill_chunk_size = default_chunk
        gc.collect()

    bvb = [{"phase": "prefill (s)", **r} for r in best_vs_best(prefill, "tokens")] + \
          [{"phase": "decode (ms/token)", **r} for r in best_vs_best(decode, "context")]
    same = [{"phase": "prefill", **r} for r in same_runtime(prefill, "tokens")] + \
           [{"phase": "decode", **r} for r in same_runtime(decode, "context")]
    cols = ["median", "min", "max"]
    print(Report("best vs best (fastest engine of each model; > 1: linearized faster)",
                 ["phase", "tokens", "context", "original", "original_median", "linear", "linear_median", "speedup"],
                 [{"tokens": "", "context": "", **r} for r in bvb]))
    print()
    print(Report("prefill (seconds, batch 1, fp32, last logits)", ["tokens", "engine", *cols], prefill))
    print()
    print(Report("decode step (ms) and state bytes", ["context", "engine", *cols, "state_bytes"], decode))
    print()
    print(Report("linearized vs original, same runtime", ["phase", "tokens", "context", "runtime", "linear_engine",
                                                          "original", "linear", "speedup"],
                 [{"tokens": "", "context": "", **r} for r in same]))
    print()
    print(Report("generate() resident growth", ["prompt_tokens", "prefill_chunk_size", "resident_growth_gb",
                                                "seconds"], memory))
    load_after = [round(x, 2) for x in os.getloadavg()]
    result = {
        "best_vs_best": bvb, "model": description, "threads": args.threads,
        "loadavg": {"before": load_before, "after": load_after},
        "prefill": prefill, "decode": decode, "same_runtime": same, "generate_memory": memory,
        "exports": export_facts,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "notes": ["every engine warmed at each timed shape (one untimed prefill at that length; decode: "
                  f"{args.decode_warmup} untimed steps, then the median of {args.decode_steps} timed ones per repeat)",
                  f"{args.repeats} repeats per row: median, min, max",
                  "both models exported through surgeon's stateful prefill/decode export and run in the same "
                  "onnxruntime; eager rows run the same models in torch",
                  "timings taken with a 1-minute load average above ~2.5 on a 2-core machine are not trustworthy"],
        "provenance": provenance(counts={"prefill_rows": len(prefill), "decode_rows": len(decode),
                                         "memory_rows": len(memory), "repeats": args.repeats,
                                         "lengths": args.lengths, "contexts": args.contexts}),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    _plot(prefill, decode, out_path.with_suffix(".png"), description.split(";")[0])
    print(f"wrote {out_path}")


def _plot(prefill: list[dict], decode: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for rows, ax, key in ((prefill, a, "tokens"), (decode, b, "context")):
        for engine in ENGINES:
            pts = sorted((r[key], r["median"], r["min"], r["max"]) for r in rows if r["engine"] == engine)
            if pts:
                x, y, lo, hi = zip(*pts)
                ax.errorbar(x, y, yerr=[np.subtract(y, lo), np.subtract(hi, y)], fmt="o-" if "ort" in engine else "s--",
                            capsize=3, label=engine)
        ax.set_xscale("log"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    a.set_yscale("log"), a.set_xlabel("prompt tokens"), a.set_ylabel("prefill seconds (median, min–max)")
    b.set_xlabel("context tokens"), b.set_ylabel("decode step ms (median, min–max)")
    fig.suptitle(f"{title}: long-context prefill and decode on CPU, same runtimes for both models")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
