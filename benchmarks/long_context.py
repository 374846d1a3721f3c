"""Long-context prefill and decode: SmolLM2-135M original vs linearized, each in torch eager AND onnxruntime.

Like is compared with like: both models run in the same two runtimes. The linearized model (hedgehog +
window 64 on all 30 layers, untrained feature maps: speed and memory do not depend on training) and the
original (every layer softmax, with its KV cache) are both exported through the project's own stateful
prefill/decode export (``export_causal_lm``; the original with ``softmax_only=True``), and both run in
torch eager (the original with SDPA + ``DynamicCache``, the linearized model with its own cache layers).
Prefill computes the last position's logits only, in every engine (eager: ``logits_to_keep=1``; ONNX:
``last_logits_only=True``), as generation does. Every engine is warmed up (one untimed prefill, and
untimed decode steps before each timed decode) before anything is timed. Every row records its runtime
and thread count.

    python benchmarks/long_context.py [--lengths 512 ... 16384] [--contexts 128 ... 8192] [--threads 2]

Prints a table and writes ``benchmarks/results/long_context.json`` and ``long_context.png``.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

import surgeon
import surgeon.export
from surgeon.core.report import Report
from surgeon.export.causal_lm import export_causal_lm
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes import LinearizeAttention

RESULTS = Path(__file__).parent / "results"
ENGINES = ("original eager", "original ort", "linear eager", "linear ort")


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Engines:
    """The four (model, runtime) pairs behind one prefill / decode interface."""

    def __init__(self, original: torch.nn.Module, linear: torch.nn.Module, dirs: dict[str, Path], threads: int):
        self.models = {"original": original, "linear": linear}
        self.ort = {name: surgeon.export.OnnxGenerator(d, threads=threads) for name, d in dirs.items()}
        self.threads = threads

    def runtime(self, engine: str) -> str:
        if engine.endswith("ort"):
            import onnxruntime as ort

            return f"onnxruntime {ort.__version__} (CPU, levels {self.ort[engine.split()[0]].levels})"
        return f"torch {torch.__version__} eager" + (" (SDPA, DynamicCache)" if engine.startswith("original") else "")

    def prefill(self, engine: str, ids: torch.Tensor) -> Callable[[], object]:
        model, kind = engine.split()
        if kind == "ort":
            return lambda: self.ort[model].run_prefill(ids)

        def run():
            with torch.no_grad():
                return self.models[model](ids, use_cache=False, logits_to_keep=1)
        return run

    def decode_ms(self, engine: str, ids: torch.Tensor, context: int, steps: int, warmup: int) -> float:
        """Milliseconds per decode step after a prefill of ``context`` tokens and ``warmup`` untimed steps."""
        model, kind = engine.split()
        total = warmup + steps
        if kind == "ort":
            gen = self.ort[model]
            _, state = gen.run_prefill(ids[:, :context])
            times = []
            for t in range(context, context + total):
                start = time.perf_counter()
                _, state = gen.run_decode(ids[:, t:t + 1].numpy(), np.full((1, 1), t), state)
                times.append(time.perf_counter() - start)
        else:
            lm = self.models[model]
            cache = DynamicCache(config=lm.config)
            times = []
            with torch.no_grad():
                lm(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
                for t in range(context, context + total):
                    start = time.perf_counter()
                    lm(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times[warmup:])


def _export(model: torch.nn.Module, path: Path, **kw: Any) -> Path:
    if not (path / "manifest.json").is_file():
        tqdm.write(f"exporting {path.name} (prefill + decode)...")
        try:
            export_causal_lm(model, path, overwrite=True, last_logits_only=True, **kw)
        except TypeError as e:
            if "softmax_only" not in str(e):
                raise
            raise SystemExit("this benchmark exports the original model through export_causal_lm(softmax_only=True), "
                             "which needs StateLayout.of(model, softmax_only=True) in surgeon.export.stateful_lm") from e
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--ort-original-max", type=int, default=8192,
                        help="skip the original's ORT prefill above this (its unfused attention holds heads x T^2 floats)")
    parser.add_argument("--eager-max", type=int, default=16384, help="skip eager prefill above this")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--decode-warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed prefill runs per engine and length (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="out/long_context")
    parser.add_argument("--out", default=str(RESULTS / "long_context.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)

    original, _ = load_smollm2()
    original.eval()
    linear = surgeon.apply(original, LinearizeAttention(feature_map="hedgehog", window=64)).model.eval()   # + 4 sinks
    dirs = {"linear": _export(linear, work / "linear_kv"),
            "original": _export(original, work / "original_kv", softmax_only=True)}
    eng = Engines(original, linear, dirs, args.threads)

    warm = torch.randint(0, 40000, (1, 256), generator=torch.Generator().manual_seed(1))
    for engine in ENGINES:                               # first calls (allocations, kernels) are never timed
        eng.prefill(engine, warm)()

    prefill: list[dict[str, Any]] = []
    for n in tqdm(args.lengths, desc="prefill", unit="length"):
        ids = torch.randint(0, 40000, (1, n), generator=torch.Generator().manual_seed(n))
        for engine in ENGINES:
            if (engine.endswith("eager") and n > args.eager_max) or (engine == "original ort" and n > args.ort_original_max):
                continue
            row = {"tokens": n, "model": engine.split()[0], "runtime": eng.runtime(engine), "threads": args.threads,
                   "seconds": _median_s(eng.prefill(engine, ids), args.repeats)}
            prefill.append(row)
            tqdm.write(str(row))
        gc.collect()

    decode: list[dict[str, Any]] = []
    for ctx in tqdm(args.contexts, desc="decode", unit="context"):
        ids = torch.randint(0, 40000, (1, ctx + args.decode_warmup + args.decode_steps),
                            generator=torch.Generator().manual_seed(ctx))
        for engine in ENGINES:
            model = engine.split()[0]
            row = {"context": ctx, "model": model, "runtime": eng.runtime(engine), "threads": args.threads,
                   "ms_per_token": eng.decode_ms(engine, ids, ctx, args.decode_steps, args.decode_warmup),
                   "state_bytes": eng.ort[model].state_bytes(context=ctx)}
            decode.append(row)
            tqdm.write(str(row))
        gc.collect()

    comparisons = _comparisons(prefill, decode)
    print(Report("prefill (seconds, batch 1, fp32)", ["tokens", "model", "runtime", "threads", "seconds"], prefill))
    print()
    print(Report("decode step (ms) and state bytes", ["context", "model", "runtime", "threads", "ms_per_token",
                                                      "state_bytes"], decode))
    print()
    print(Report("linearized vs original, same runtime", list(comparisons[0]) if comparisons else [], comparisons))
    out = {"model": "SmolLM2-135M-Instruct; linearized: 30/30 layers LinearizeAttention(hedgehog, window=64, 4 sinks); "
                    "original: every layer softmax, exported with export_causal_lm(softmax_only=True)",
           "threads": args.threads, "torch": torch.__version__, "prefill": prefill, "decode": decode,
           "same_runtime": comparisons,
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
           "notes": ["every engine warmed up (one untimed 256-token prefill each; decode: "
                     f"{args.decode_warmup} untimed steps before {args.decode_steps} timed ones, median)",
                     "both models exported through surgeon's stateful prefill/decode export and run in the same "
                     "onnxruntime; eager rows run the same models in torch"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    _plot(prefill, decode, Path(args.out).with_suffix(".png"))


def _comparisons(prefill: list[dict], decode: list[dict]) -> list[dict]:
    """Original / linearized time ratios within one runtime (> 1: the linearized model is faster)."""
    out = []
    for phase, rows, key, unit in (("prefill", prefill, "tokens", "seconds"), ("decode", decode, "context", "ms_per_token")):
        for n in sorted({r[key] for r in rows}):
            for kind in ("eager", "onnxruntime"):
                pair = {r["model"]: r[unit] for r in rows if r[key] == n and r["runtime"].startswith(
                    "torch" if kind == "eager" else "onnxruntime")}
                if len(pair) == 2:
                    out.append({"phase": phase, "tokens": n, "runtime": kind, "original": pair["original"],
                                "linear": pair["linear"], "speedup": pair["original"] / pair["linear"]})
    return out


def _plot(prefill: list[dict], decode: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for rows, ax, key, unit in ((prefill, a, "tokens", "seconds"), (decode, b, "context", "ms_per_token")):
        for model in ("original", "linear"):
            for kind in ("torch", "onnxruntime"):
                pts = [(r[key], r[unit]) for r in rows if r["model"] == model and r["runtime"].startswith(kind)]
                if pts:
                    ax.plot(*zip(*pts), "o-" if kind == "onnxruntime" else "s--", label=f"{model}, {kind}")
        ax.set_xscale("log"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    a.set_yscale("log"), a.set_xlabel("prompt tokens"), a.set_ylabel("prefill seconds")
    b.set_xlabel("context tokens"), b.set_ylabel("decode step (ms)")
    fig.suptitle("SmolLM2-135M: long-context prefill and decode on CPU, same runtime for both models")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
