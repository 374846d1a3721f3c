"""Linear-attention op speed vs sequence length, against SDPA and this machine's matmul throughput.

SmolLM2-135M head shapes (9 query / 3 kv heads, head dim 64), batch 1, float32, forward only, no
gradients. For each feature map (hedgehog F=128, elu1 F=64) and window (0, 64): the parallel,
chunked (chunk 64/128/256) and recurrent forms of ``surgeon.ops.linear_attention`` and
``F.scaled_dot_product_attention(is_causal=True)``. Time is the median of several runs after a
warm-up. GFLOP/s counts each form's matmul FLOPs (feature-map projection, intra-chunk scores and
values, chunk states, window band; the dense T×N products for parallel; 2·H·T²·D/… for causal SDPA
counting only the causal half) and is compared with a 1024³ fp32 matmul and with a square matmul
doing the same FLOPs ("same-size"), on the same machine. The parallel form stops at 4 K tokens by
default: its score matrices hold H·T² floats (9.7 GB at 16 K).

    python benchmarks/attention_ops.py [--lengths 512 1024 ...] [--max-quadratic 4096] [--out benchmarks/results]

Prints a table and writes ``attention_ops.json`` and ``attention_ops.png`` (time vs length, log-log).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.linear_attention import linear_attention
from surgeon.core.report import Report
from surgeon.core.provenance import provenance

H, HKV, D = 9, 3, 64
CHUNKS = (64, 128, 256)


def timed(fn: Callable[[], object], budget_s: float = 2.0, max_runs: int = 7) -> float:
    """Median seconds of up to ``max_runs`` calls after one warm-up, stopping once ``budget_s`` is spent."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, budget_s=1.0) / 1e9


_SAME_SIZE: dict[int, float] = {}


def same_size_matmul_gflops(work: float) -> float:
    """GFLOP/s of one square fp32 matmul doing the same FLOPs as ``work`` (n = (work/2)^⅓, rounded to 32)."""
    n = max(32, int(round((work / 2) ** (1 / 3) / 32)) * 32)
    if n not in _SAME_SIZE:
        _SAME_SIZE[n] = matmul_gflops(n)
    return _SAME_SIZE[n]


def flops(form: str, T: int, Fdim: int, window: int, kind: str, chunk: int = 0) -> float:
    """Matmul FLOPs of one forward pass (batch 1, new tokens only)."""
    Dv1 = D + 1
    fmap = 2 * T * D * (Fdim // 2) * (H + HKV) if kind == "hedgehog" else 0
    if form == "sdpa":
        return 2.0 * H * T * T * D              # QKᵀ and PV over the causal half
    if form == "parallel":
        dense = 2 * H * T * T * (Fdim + Dv1) + 2 * H * T * Fdim * Dv1 * 2
        return fmap + dense + (2 * H * T * T * 2 * D if window else 0)
    if form == "recurrent":
        return fmap + 2 * H * T * Fdim * Dv1 * 2 + (2 * H * T * window * 2 * D if window else 0)
    intra = 2 * H * T * chunk * (Fdim + Dv1)
    states = 2 * HKV * T * Fdim * Dv1 + 2 * H * T * Fdim * Dv1 * 2
    band = 2 * H * T * (chunk + window - 1) * 2 * D if window else 0
    return fmap + intra + states + band


def inputs(T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.randn(1, H, T, D, generator=g), torch.randn(1, HKV, T, D, generator=g),
            torch.randn(1, HKV, T, D, generator=g))


def run_case(kind: str, window: int, T: int, form: str, chunk: int, q, k, v) -> float:
    if form == "sdpa":
        def fn():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        fq, fk = make_feature_map(kind, H, D), make_feature_map(kind, HKV, D)

        def fn():
            return linear_attention(q, k, v, fq, fk, scale=D ** -0.5, window=window, form=form,
                                    chunk_size=chunk or 64)
    with torch.no_grad():
        return timed(fn)


def plan(lengths: list[int], max_quadratic: int, max_recurrent: int,
         forms: tuple[str, ...] = ("sdpa", "chunked", "parallel", "recurrent")) -> list[tuple]:
    cases = []
    for T in lengths:
        if "sdpa" in forms:
            cases.append(("-", 0, T, "sdpa", 0))
        for kind in ("hedgehog", "elu1"):
            for window in (0, 64):
                if "chunked" in forms:
                    for chunk in CHUNKS:
                        cases.append((kind, window, T, "chunked", chunk))
                for form in ("parallel", "recurrent"):
                    if form in forms:
                        cases.append((kind, window, T, form, 0))
    return [(*c, (c[3] == "parallel" and c[2] > max_quadratic) or (c[3] == "recurrent" and c[2] > max_recurrent))
            for c in cases]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, window in zip(axes, (0, 64)):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["ms"] is None or (r["form"] != "sdpa" and r["window"] != window):
                continue
            name = "sdpa (causal)" if r["form"] == "sdpa" else f"{r['feature_map']} {r['form']}" + (
                f" C={r['chunk']}" if r["form"] == "chunked" else "")
            if r["form"] == "chunked" and r["chunk"] != 64:
                continue
            series.setdefault(name, []).append((r["T"], r["ms"]))
        for name, pts in sorted(series.items()):
            ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if "sdpa" in name else "-")
        ax.set(xscale="log", yscale="log", xlabel="tokens", title=f"window = {window}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("forward time (ms), batch 1, 9/3 heads, D=64, fp32")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--max-quadratic", type=int, default=4096, help="longest length for the parallel form")
    parser.add_argument("--max-recurrent", type=int, default=16384, help="longest length for the recurrent form")
    parser.add_argument("--forms", nargs="+", default=["sdpa", "chunked", "parallel", "recurrent"],
                        choices=["sdpa", "chunked", "parallel", "recurrent"])
    parser.add_argument("--name", default="attention_ops", help="file stem of the JSON / PNG written to --out")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_gflops()
    g = torch.Generator().manual_seed(0)
    data = {T: inputs(T, g) for T in args.lengths}
    rows = []
    for kind, window, T, form, chunk, skip in tqdm(plan(args.lengths, args.max_quadratic, args.max_recurrent,
                                                         tuple(args.forms)), desc="attention ops"):
        row = {"feature_map": kind, "window": window, "T": T, "form": form, "chunk": chunk or None}
        if skip:
            rows.append({**row, "ms": None, "GFLOP/s": None, "vs matmul": None, "vs same-size matmul": None,
                         "note": "skipped (parallel: H·T² floats per score matrix)" if form == "parallel" else "skipped"})
            continue
        sec = run_case(kind, window, T, form, chunk, *data[T])
        Fdim = 128 if kind == "hedgehog" else 64
        work = flops(form, T, Fdim, window, kind, chunk)
        rate = work / sec / 1e9
        rows.append({**row, "ms": 1e3 * sec, "GFLOP/s": rate, "vs matmul": rate / peak,
                     "vs same-size matmul": rate / same_size_matmul_gflops(work), "note": ""})
    sdpa = {r["T"]: r["ms"] for r in rows if r["form"] == "sdpa"}
    for r in rows:
        r["speed-up vs sdpa"] = sdpa[r["T"]] / r["ms"] if r["ms"] and r["T"] in sdpa else None
    growth = linear_time(rows)
    for g_row in tqdm(growth, desc="linear time, paired"):
        T = g_row["T"]
        g_row["ratio_paired"] = paired_growth(g_row["feature_map"], g_row["window"], g_row["chunk"], data[T // 4], data[T])
    columns = ["feature_map", "window", "T", "form", "chunk", "ms", "GFLOP/s", "vs matmul", "vs same-size matmul",
               "speed-up vs sdpa", "note"]
    table = Report(f"attention ops (fp32, batch 1, 9 q / 3 kv heads, D=64; {torch.get_num_threads()} threads; "
                   f"1024³ matmul {peak:.1f} GFLOP/s)", columns, rows)
    print(table)
    best = {}
    for r in rows:
        if r["form"] == "chunked" and r["ms"]:
            key = (r["feature_map"], r["window"])
            best.setdefault(key, {}).setdefault(r["chunk"], []).append(r["vs same-size matmul"])
    print("\nmedian fraction of same-size matmul GFLOP/s by chunk size:")
    for key, per_chunk in best.items():
        print(" ", key, {c: round(statistics.median(v), 3) for c, v in per_chunk.items()})
    if growth:
        print("\nlinear time: chunked-form time at the longest length / at a quarter of it (target <= 4.5; "
              "ratio_paired: the two timed back to back):")
        for g in growth:
            print(" ", g)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"torch": torch.__version__, "threads": torch.get_num_threads(), "matmul_gflops": peak,
         "forms": args.forms, "same_size_matmul_gflops": {str(n): g for n, g in sorted(_SAME_SIZE.items())},
         "linear_time": growth, "rows": rows,
         "provenance": provenance(counts={"lengths": args.lengths, "forms": args.forms, "rows": len(rows),
                                          "linear_time_settings": len(growth)})}, indent=2))
    plot(rows, out / f"{args.name}.png")
    print(f"\nwrote {out / f'{args.name}.json'} and {out / f'{args.name}.png'}")


def paired_growth(kind: str, window: int, chunk: int, short: tuple, long: tuple, rounds: int = 5) -> float:
    """Median over ``rounds`` of (time at the long length / time at the short one), the two timed back to
    back (one warm-up each first) so both see the same machine load; on a shared CPU the separate
    timings of :func:`linear_time` can be minutes apart."""
    fq, fk = make_feature_map(kind, H, D), make_feature_map(kind, HKV, D)

    def once(q, k, v) -> float:
        t0 = time.perf_counter()
        linear_attention(q, k, v, fq, fk, scale=D ** -0.5, window=window, form="chunked", chunk_size=chunk)
        return time.perf_counter() - t0

    with torch.no_grad():
        once(*short), once(*long)
        return statistics.median(once(*long) / once(*short) for _ in range(rounds))


def linear_time(rows: list[dict]) -> list[dict]:
    """For each chunked setting: time at the longest length over time at a quarter of that length (4 = linear)."""
    out = []
    for key in sorted({(r["feature_map"], r["window"], r["chunk"]) for r in rows if r["form"] == "chunked"}):
        ms = {r["T"]: r["ms"] for r in rows if r["form"] == "chunked" and (r["feature_map"], r["window"], r["chunk"]) == key}
        top = max(ms)
        if top // 4 in ms and ms[top] and ms[top // 4]:
            out.append({"feature_map": key[0], "window": key[1], "chunk": key[2], "T": top,
                        "ratio_vs_quarter": ms[top] / ms[top // 4]})
    return out


if __name__ == "__main__":
    main()
