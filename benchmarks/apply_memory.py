"""Time and peak memory of ``surgeon.apply(model, LinearizeAttention(...), inplace=True)`` vs model size.

A Llama-shaped ``LlamaForCausalLM`` (hidden 2048, 16 query / 4 kv heads, MLP 5632, vocab 32000, float32)
is built on the meta device and materialised with ``to_empty`` (no random init: weights are filled
with a constant, which touches every page so the model is resident). Each size runs in a fresh
process; a sampler thread reads the process's resident set every 5 ms during ``apply``. Rows:

* ``touched`` (default): the transaction copies only the tensors the pass changes in place (none for
  a module swap) and the structure of the rest;
* ``full snapshot``: every handler reports ``touched() = None`` (every parameter and buffer cloned,
  the behaviour before issue 16), run at the smaller sizes only (it needs twice the model).

    python benchmarks/apply_memory.py [--layers 8 18] [--full-layers 8] [--out benchmarks/results]

Prints a table and writes ``apply_memory.json``. Targets: apply ≤ 10 s, peak ≤ 1.15× the model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2 ** 30


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def run_one(layers: int, full: bool) -> dict:
    """Build the model, apply the pass in place, return the measurements (runs in a child process)."""
    import torch
    import transformers

    import surgeon
    from surgeon.core.handler import PassHandler
    from surgeon.passes import LinearizeAttention

    torch.set_num_threads(2)
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.02)
        for b in model.buffers():
            b.fill_(1.0)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if full:
        PassHandler.touched = lambda self, model, config, plan: None  # type: ignore[method-assign]
        for cls in PassHandler.__subclasses__():
            cls.touched = PassHandler.touched  # type: ignore[method-assign]
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    surgery = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=64), inplace=True)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    converted = len(surgery.recipe.entries[0].sites)
    return {"layers": layers, "params": params, "model_gib": model_bytes / GIB, "snapshot": "full" if full else "touched",
            "apply_s": seconds, "rss_before_gib": base / GIB, "peak_rss_gib": peak[0] / GIB,
            "peak_over_model": peak[0] / model_bytes, "extra_gib": (peak[0] - base) / GIB, "sites": converted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 18])
    ap.add_argument("--full-layers", type=int, nargs="*", default=[8])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(int(args.child[0]), args.child[1] == "full")))
        return
    rows = []
    jobs = [(n, "touched") for n in args.layers] + [(n, "full") for n in args.full_layers]
    for layers, mode in jobs:
        out = subprocess.run([sys.executable, __file__, "--child", str(layers), mode], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['params'] / 1e9:.2f} B params ({r['model_gib']:.2f} GiB), {r['snapshot']:>7}: apply {r['apply_s']:.2f} s, "
              f"peak {r['peak_rss_gib']:.2f} GiB = {r['peak_over_model']:.3f}x model, +{r['extra_gib']:.3f} GiB in apply",
              flush=True)
    from surgeon.core.provenance import provenance
    from surgeon.core.report import format_table

    table = [{"params (B)": round(r["params"] / 1e9, 3), "model (GiB)": round(r["model_gib"], 2),
              "snapshot": r["snapshot"], "apply (s)": round(r["apply_s"], 2), "peak RSS (GiB)": round(r["peak_rss_gib"], 2),
              "peak / model": round(r["peak_over_model"], 3), "added in apply (GiB)": round(r["extra_gib"], 3)}
             for r in rows]
    print(format_table(list(table[0]), table))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "apply_memory.json").write_text(json.dumps({"rows": rows, "targets": {"apply_s": 10.0, "peak_over_model": 1.15},
                                                           "provenance": provenance(counts={
                                                               "layer_settings": args.layers, "full_layers": args.full_layers,
                                                               "rows": len(rows), "repeats": 1})},
                                                          indent=2))


if __name__ == "__main__":
    main()
