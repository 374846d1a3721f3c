"""Summaries of per-prompt fidelity rows: every figure with its n and a 95 % interval, paired differences.

Rows come from :func:`surgeon.fidelity.measure.measure` (one per configuration and prompt, with the
original's ``ref_nll``) and needle rows (``hit`` / ``orig_hit`` per trial).

Example:
    >>> rows = [{"config": "a", "kind": "code", "context": 64, "prompt": str(i), "top1": t, "kl": 0.1,
    ...          "greedy": t, "first_divergence": 3, "nll": 10.0, "ref_nll": 9.0, "tokens": 63}
    ...         for i, t in enumerate([0.8, 0.9, 1.0])]
    >>> s = summarize(rows)[("a", "code", 64)]
    >>> s["n"], round(s["top1"], 3), s["top1_ci"][0] <= 0.9 <= s["top1_ci"][1]
    (3, 0.9, True)
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

from surgeon.fidelity.stats import bootstrap_ci, paired_diff_ci, ratio_ci, verdict, wilson

METRICS = ("top1", "kl", "greedy", "first_divergence")
MIN_N = 3
"""Fewer prompts than this get no interval and no verdict (a bootstrap over 1-2 prompts has no spread)."""
HIGHER_IS_BETTER = {"top1": True, "kl": False, "greedy": True, "first_divergence": True, "ppl_ratio": False}


def _group(rows: Iterable[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def summarize(rows: Iterable[dict], keys: tuple[str, ...] = ("config", "kind", "context")) -> dict[tuple, dict]:
    """Per group: n prompts, each metric's mean and bootstrap interval, and the perplexity ratio with its
    interval (summed NLL of the configuration over the original's, resampling prompts)."""
    out = {}
    for key, group in _group(rows, keys).items():
        s: dict[str, Any] = {"n": len(group)}
        enough = len(group) >= MIN_N
        for m in METRICS:
            values = [float(r[m]) for r in group]
            s[m] = sum(values) / len(values)
            s[f"{m}_ci"] = bootstrap_ci(values) if enough else None
        nll, ref, tok = ([float(r[k]) for r in group] for k in ("nll", "ref_nll", "tokens"))
        s["ppl_ratio"] = math.exp((sum(nll) - sum(ref)) / sum(tok))
        s["ppl_ratio_ci"] = ratio_ci(nll, ref, tok) if enough else None
        out[key] = s
    return out


def compare(rows: list[dict], config: str, baseline: str, keys: tuple[str, ...] = ("kind", "context")
            ) -> dict[tuple, dict]:
    """``config`` − ``baseline`` per group on the prompts both were scored on: mean difference of each metric,
    its paired-bootstrap interval and the verdict (better / worse / tie)."""
    out = {}
    by = _group([r for r in rows if r["config"] in (config, baseline)], keys)
    for key, group in by.items():
        a = {r["prompt"]: r for r in group if r["config"] == config}
        b = {r["prompt"]: r for r in group if r["config"] == baseline}
        common = sorted(set(a) & set(b))
        if not common:
            continue
        d: dict[str, Any] = {"n": len(common)}
        enough = len(common) >= MIN_N
        for m in METRICS:
            x, y = [float(a[p][m]) for p in common], [float(b[p][m]) for p in common]
            d[m] = sum(x) / len(x) - sum(y) / len(y)
            d[f"{m}_ci"] = paired_diff_ci(x, y) if enough else None
            d[f"{m}_verdict"] = verdict(d[f"{m}_ci"], HIGHER_IS_BETTER[m]) if enough else f"n < {MIN_N}"
        tok = [float(a[p]["tokens"]) for p in common]
        ax, bx = [float(a[p]["nll"]) for p in common], [float(b[p]["nll"]) for p in common]
        d["log_ppl_ratio"] = (sum(ax) - sum(bx)) / sum(tok)
        d["log_ppl_ratio_ci"] = ratio_ci(ax, bx, tok, transform=lambda t: t) if enough else None
        d["log_ppl_ratio_verdict"] = (verdict(d["log_ppl_ratio_ci"], higher_is_better=False) if enough
                                      else f"n < {MIN_N}")
        out[key] = d
    return out


def needle_summary(rows: Iterable[dict], keys: tuple[str, ...] = ("config", "context")) -> dict[tuple, dict]:
    """Per group: trials, hits, hits among the trials the original gets right (the target's denominator),
    each with a Wilson interval."""
    out = {}
    for key, group in _group(rows, keys).items():
        hits = sum(bool(r["hit"]) for r in group)
        right = [r for r in group if r["orig_hit"]]
        kept = sum(bool(r["hit"]) for r in right)
        out[key] = {"trials": len(group), "hits": hits, "rate": hits / len(group), "rate_ci": wilson(hits, len(group)),
                    "original_right": len(right), "hits_where_original_right": kept,
                    "recall_vs_original": kept / len(right) if right else float("nan"),
                    "recall_vs_original_ci": wilson(kept, len(right))}
    return out


def _ci(x: float, ci: list | tuple | None, fmt: str = ".3f") -> str:
    return f"{x:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci is not None else "")


def markdown(result: dict, split: str = "test") -> list[str]:
    """The rows of the docs' fidelity tables, rebuilt from a ``benchmarks/fidelity_smollm2.py`` results file
    (``tests/docs`` checks that the page holds exactly these lines)."""
    configs = result["configs"]
    lines = ["| kind | context | configuration | state MiB | n | top-1 [95 % CI] | greedy [95 % CI] | "
             "tokens to 1st divergence | ppl ratio [95 % CI] |", "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted((s for s in result["summary"] if s["split"] == split),
                  key=lambda s: (s["context"], ("prose", "code", "chat").index(s["kind"]), configs[s["config"]]["bytes"],
                                 s["config"]))
    for s in rows:
        lines.append(f"| {s['kind']} | {s['context']} | {s['config']} | {configs[s['config']]['bytes'] / 2**20:.2f} | "
                     f"{s['n']} | {_ci(s['top1'], s['top1_ci'])} | {_ci(s['greedy'], s['greedy_ci'])} | "
                     f"{s['first_divergence']:.1f} | {_ci(s['ppl_ratio'], s['ppl_ratio_ci'])} |")
    lines += ["", "| comparison | kind | context | n | Δ top-1 | Δ greedy | Δ log ppl |", "|---|---|---|---|---|---|---|"]
    for name, comps in result["comparisons_on_test"].items():
        for d in comps:
            cells = [f"{_ci(d[m], d[m + '_ci'], '+.3f')} {d[m + '_verdict']}" for m in ("top1", "greedy", "log_ppl_ratio")]
            lines.append(f"| {name} | {d['kind']} | {d['context']} | {d['n']} | " + " | ".join(cells) + " |")
    lines += ["", "| configuration | context | trials | the original finds | found where the original finds it | "
              "Wilson 95 % CI |", "|---|---|---|---|---|---|"]
    for s in result["needle"]:
        lo, hi = s["recall_vs_original_ci"]
        lines.append(f"| {s['config']} | {s['context']} | {s['trials']} | {s['original_right']} | "
                     f"{s['hits_where_original_right']} | {lo:.2f}–{hi:.2f} |")
    return lines
