"""What an *untrained* hybrid is worth on SmolLM2: held-out perplexity @1024 (4 windows) of LinearizeAttention
(hedgehog, window 64) with and without attention sinks, at several initial linear weights λ.

λ → 0 makes the hybrid exactly sinks + window (StreamingLLM); a pretrained model's untrained linear branch
only hurts, which is why ``linear_weight_init`` defaults to 1e-3. Writes
``benchmarks/results/hybrid_init_smollm2.json``.

    python benchmarks/hybrid_init_smollm2.py
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import surgeon
from surgeon.core.provenance import provenance
from surgeon.distill.evaluate import held_out_windows
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes import LinearizeAttention

SETTINGS = [dict(sinks=4, linear_weight_init=1e-6), dict(sinks=0, linear_weight_init=1e-6),
            dict(sinks=4, linear_weight_init=1.0), dict(sinks=0, linear_weight_init=1.0),
            dict(sinks=4, linear_weight_init=0.05), dict(sinks=4, linear_weight_init=0.01)]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, w[1:], reduction="sum"))
        n += w.numel() - 1
    return math.exp(nll / n)


def main() -> None:
    torch.set_num_threads(2)
    teacher, tok = load_smollm2()
    windows = held_out_windows(tok, 1024, 4)
    teacher_ppl = perplexity(teacher.eval(), windows)
    rows = []
    for kw in SETTINGS:
        start = time.perf_counter()
        model = surgeon.apply(teacher, LinearizeAttention(feature_map="hedgehog", window=64, **kw)).model.eval()
        ppl = perplexity(model, windows)
        rows.append({**kw, "perplexity": round(ppl, 3), "ratio": round(ppl / teacher_ppl, 3),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    out = Path("benchmarks/results/hybrid_init_smollm2.json")
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "context": 1024, "windows": 4, "window": 64,
                               "feature_map": "hedgehog", "teacher_perplexity": round(teacher_ppl, 3),
                               "runtime": "torch eager, fp32, 2 threads", "rows": rows,
                               "provenance": provenance(counts={"windows": 4, "context": 1024,
                                                                "settings": len(SETTINGS)})}, indent=2))


if __name__ == "__main__":
    main()
