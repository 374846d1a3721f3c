"""SmolLM2-135M: per-block linearity, and held-out perplexity with k = 1…6 blocks replaced vs dropped.

For each k the k blocks with the highest R² (with residual; block 0 excluded: nothing precedes it to
fold into) are (a) replaced ReplaceMe-style by a least-squares linear map folded into the previous
block's ``mlp.down_proj`` (``ReplaceLinearBlocks``), and (b) dropped outright (same blocks skipped,
nothing refitted). Calibration: train topics of CPython's pydoc text; perplexity: held-out topics.

    python benchmarks/linear_blocks_smollm2.py [--calib-chunks 24] [--eval-chunks 16] [--max-k 6]

Writes ``benchmarks/results/linear_blocks_smollm2.json`` and ``linear_blocks_smollm2.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import surgeon
from surgeon.passes import ReplaceLinearBlocks, block_linearity
from surgeon.passes.linear_blocks.handler import SkippedBlock, plot_linearity
from surgeon.core.report import format_table
from surgeon.core.provenance import provenance
from surgeon.data.text import perplexity, token_chunks

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-chunks", type=int, default=24)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--max-k", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from surgeon.models.smollm2 import load_smollm2

    t0 = time.time()
    model, tok = load_smollm2()
    calib = token_chunks(tok, "train", args.calib_len, args.calib_chunks, batch_size=8)
    held = token_chunks(tok, "held_out", args.eval_len, args.eval_chunks, batch_size=4)
    base_ppl = perplexity(model, held)
    print(f"base perplexity {base_ppl:.3f}  ({time.time() - t0:.0f} s)", flush=True)

    lin = block_linearity(model, calib)
    print(lin, flush=True)
    ranked = sorted((r for r in lin.rows if r["block"] >= 1), key=lambda r: -r["r2"])
    rows = []
    for k in range(1, args.max_k + 1):
        blocks = sorted(r["block"] for r in ranked[:k])
        s = surgeon.apply(model, ReplaceLinearBlocks(blocks=blocks, calibration=calib))
        ppl_rep = perplexity(s.model, held)
        fit = s.report["ReplaceLinearBlocks"]
        fit_r2 = [round(r["fit_r2"], 4) for r in fit.rows if r["fit_r2"] is not None]
        del s
        dropped = copy.deepcopy(model)
        for b in blocks:
            dropped.model.layers[b] = SkippedBlock(b)
        ppl_drop = perplexity(dropped, held)
        del dropped
        rows.append({"k": k, "blocks": blocks, "ppl_replaced": ppl_rep, "ppl_dropped": ppl_drop,
                     "span_fit_r2": fit_r2, "ppl_base": base_ppl})
        print(f"k={k} blocks={blocks} replaced {ppl_rep:.3f} dropped {ppl_drop:.3f} ({time.time() - t0:.0f} s)",
              flush=True)
    table = format_table(["k", "blocks", "ppl_base", "ppl_replaced", "ppl_dropped", "span_fit_r2"], rows)
    print("\nheld-out perplexity (SmolLM2-135M-Instruct, CPython pydoc held-out topics, "
          f"{args.eval_chunks}×{args.eval_len} tokens; calibration {args.calib_chunks}×{args.calib_len} train tokens)")
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"model": "SmolLM2-135M-Instruct", "base_ppl": base_ppl, "linearity": lin.to_dict(), "rows": rows,
              "calibration_tokens": args.calib_chunks * args.calib_len, "eval_tokens": args.eval_chunks * args.eval_len,
              "seconds": time.time() - t0, "threads": args.threads,
              "provenance": provenance(counts={"calibration_chunks": args.calib_chunks, "calibration_len": args.calib_len,
                                               "eval_chunks": args.eval_chunks, "eval_len": args.eval_len,
                                               "max_k": args.max_k})}
    (OUT / "linear_blocks_smollm2.json").write_text(json.dumps(result, indent=2))
    plot_linearity(lin, OUT / "linear_blocks_smollm2.png", "SmolLM2-135M per-block linearity")
    print(f"\nwrote {OUT / 'linear_blocks_smollm2.json'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
