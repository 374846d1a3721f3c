"""README ↔ evidence: the numbers the README quotes from benchmark runs are the numbers in the files
under ``benchmarks/results/`` (and ``docs/conformance.md``), at the precision the README prints them.

A README number ``3.85`` matches a recorded ``3.8521…`` (it is the recorded value rounded to the digits
shown); anything else fails, naming the sentence. When a benchmark is rerun, its README sentence must
be updated with it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
RESULTS = ROOT / "benchmarks" / "results"
README = " ".join((ROOT / "README.md").read_text().split())        # one line: sentences wrap anywhere
ARCHITECTURE = " ".join((ROOT / "docs" / "architecture.md").read_text().split())


def result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def shown(text: str, value: float) -> bool:
    """``text`` is ``value`` rounded to the digits ``text`` shows (``"3.85"`` ↔ 3.8521; ``"1,440"`` ↔ 1440.2)."""
    text = text.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9)


def claim(pattern: str, doc: str = README) -> re.Match:
    """The sentence matching ``pattern`` (whitespace-normalised); fails when the document lost it."""
    found = re.search(pattern, doc)
    assert found, f"the docs no longer say {pattern!r}: update this test with the sentence that replaced it"
    return found


def check(sentence: re.Match, expected: dict[str, float]) -> None:
    wrong = {k: (sentence[k], v) for k, v in expected.items() if not shown(sentence[k], v)}
    assert not wrong, f"README {sentence[0]!r}: shown vs recorded {wrong}"


def test_shown_rounds_to_the_printed_digits():
    assert shown("3.85", 3.8521) and shown("1,440", 1440.2) and shown("79", 79.05)
    assert not shown("3.85", 3.8561) and not shown("80", 79.05)


def test_conformance_counts_are_the_generated_tables():
    text = (ROOT / "docs" / "conformance.md").read_text()
    totals = dict((k.strip(), int(v)) for v, k in
                  ((m[2], m[1]) for m in re.finditer(r"([a-z ]+?) (\d+)(?:,|$)", text.split("Totals:")[1].splitlines()[0])))
    rows = [line.split("|")[4].strip() for line in text.splitlines() if line.startswith("| ") and "|---" not in line][1:]
    assert sum(totals.values()) == len(rows)
    s = claim(r"(?P<exact>\d+) exact, (?P<refused>\d+) refused, (?P<failures>\d+) failures")
    check(s, {"exact": totals["exact"], "refused": totals["refused"],
              "failures": sum(r not in ("exact", "refused", "not built") for r in rows)})


def test_untrained_hybrid_numbers_are_the_recorded_run():
    rows = result("hybrid_init_smollm2.json")["rows"]
    ratio = {(r["sinks"], r["linear_weight_init"]): r["ratio"] for r in rows}
    s = claim(r"sinks \+ window (?P<sinks>[\d.]+)× the teacher's perplexity, window alone (?P<window>[\d.]+)×, "
              r"and the old λ = 1 initialisation (?P<lam1>[\d.]+)×")
    check(s, {"sinks": ratio[(4, 1e-6)], "window": ratio[(0, 1e-6)], "lam1": ratio[(4, 1.0)]})


def test_compile_benchmark_sentence_is_the_recorded_run():
    r = result("compile.json")
    prefill = {row["tokens"]: row for row in r["prefill"]}
    decode = r["decode"]
    s = claim(r"decode (?P<ort_lo>[\d.]+)–(?P<ort_hi>[\d.]+) ms/token in onnxruntime vs (?P<ind_lo>[\d.]+)–(?P<ind_hi>[\d.]+) "
              r"ms compiled by inductor vs (?P<eag_lo>[\d.]+)–(?P<eag_hi>[\d.]+) ms eager")
    check(s, {"ort_lo": min(d["ort_ms"] for d in decode), "ort_hi": max(d["ort_ms"] for d in decode),
              "ind_lo": min(d["inductor_ms"] for d in decode), "ind_hi": max(d["inductor_ms"] for d in decode),
              "eag_lo": min(d["eager_ms"] for d in decode), "eag_hi": max(d["eager_ms"] for d in decode)})
    s = claim(r"\((?P<o512>[\d.]+) s vs inductor (?P<i512>[\d.]+) s and eager (?P<e512>[\d.]+) s at 512; "
              r"(?P<o2k>[\d.]+) / (?P<i2k>[\d.]+) / (?P<e2k>[\d.]+) s at 2 K\), inductor at 8 K \((?P<i8k>[\d.]+) s vs "
              r"eager (?P<e8k>[\d.]+) s and onnxruntime (?P<o8k>[\d.]+) s\); inductor's cold compile (?P<c512>[\d.]+) s "
              r"\(512\) and (?P<c2k>[\d.]+) s")
    p5, p2, p8 = prefill[512], prefill[2048], prefill[8192]
    check(s, {"o512": p5["ort_s"], "i512": p5["inductor_s"], "e512": p5["eager_s"], "o2k": p2["ort_s"],
              "i2k": p2["inductor_s"], "e2k": p2["eager_s"], "i8k": p8["inductor_s"], "e8k": p8["eager_s"],
              "o8k": p8["ort_s"], "c512": p5["inductor_compile_s"], "c2k": p2["inductor_compile_s"]})


def test_linear_time_range_is_the_recorded_run():
    rows = result("attention_ops_linear_time.json")["linear_time"]
    ratios = [row["ratio_vs_quarter"] for row in rows]
    s = claim(r"the 16 K / 4 K time ratio is (?P<lo>[\d.]+)–(?P<hi>[\d.]+) over the (?P<n>\d+) chunked settings")
    check(s, {"lo": min(ratios), "hi": max(ratios), "n": len(ratios)})
    paired = [row["ratio_paired"] for row in rows]
    check(claim(r"same machine load, it is (?P<lo>[\d.]+)–(?P<hi>[\d.]+) \(`ratio_paired`\)"),
          {"lo": min(paired), "hi": max(paired)})


def test_linear_blocks_table_is_the_recorded_run():
    r = result("linear_blocks_smollm2.json")
    table = re.search(r"k blocks ppl_base ppl_replaced ppl_dropped (.*?) ```", README)
    assert table, "README lost the linear-blocks table"
    shown_rows = re.findall(r"(\d) \[[\d, ]+\] ([\d.]+) ([\d.]+) ([\d.]+)", table[1])
    assert len(shown_rows) == len(r["rows"])
    for (k, base, replaced, dropped), row in zip(shown_rows, r["rows"]):
        assert int(k) == row["k"]
        for text, key in ((base, "ppl_base"), (replaced, "ppl_replaced"), (dropped, "ppl_dropped")):
            assert shown(text, row[key]), (k, key, text, row[key])


def test_apply_memory_numbers_are_the_recorded_run():
    rows = [r for r in result("apply_memory.json")["rows"] if r["snapshot"] == "touched"]
    biggest = max(rows, key=lambda r: r["params"])
    s = claim(r"(?P<b>[\d.]+) B parameters in float32, (?P<gib>[\d.]+) GiB, 2 threads\): .*? takes (?P<s>[\d.]+) s "
              r".*? peaks at (?P<rss>[\d.]+) GiB resident = (?P<peak>[\d.]+)× the model, (?P<extra>[\d.]+) GiB more", ARCHITECTURE)
    check(s, {"b": biggest["params"] / 1e9, "gib": biggest["model_gib"], "s": biggest["apply_s"],
              "rss": biggest["peak_rss_gib"], "peak": biggest["peak_over_model"], "extra": biggest["extra_gib"]})


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json")))
def test_every_results_file_is_valid_json(name):
    assert isinstance(result(name), dict)


def test_demo_cost_table_is_the_cost_model_of_the_demo_configuration():
    """The README's cost block is what the demo's report prints: SmolLM2's 30 layers (9 / 3 heads of 64),
    hedgehog φ of 2 × 64 features, window 64, 4 sinks, chunk 64, fp32."""
    from surgeon.core.report import format_table
    from surgeon.passes.attention.costs import AttentionShape, cost_rows
    from surgeon.passes.attention.handler import REPORT_CONTEXTS

    layer = AttentionShape(n_heads=9, n_kv_heads=3, head_dim=64, feature_dim=128, window=64, chunk=64,
                           hedgehog_dim=64, sinks=4)
    costs = cost_rows([layer] * 30, REPORT_CONTEXTS, 4)
    lines = [line for line in format_table(list(costs[0]), costs).splitlines() if not line.startswith("-")]
    assert " ".join(" ".join(lines).split()) in README


def test_efficientnet_relu_budget_verdict_is_the_recorded_run():
    r = result("relu_budget_efficientnet.json")
    kd = r["recipes"][r["final_recipe"]]
    s = claim(r"held-out top-1 agreement with the original is (?P<before>[\d.]+) before and (?P<after>[\d.]+) after "
              r"(?P<steps>\d+) KD steps, while KL\(original‖student\) falls from (?P<kl0>[\d.]+) to (?P<kl1>[\d.]+)")
    check(s, {"before": r["held_out_top1_before_finetune"], "after": r["held_out_top1_after_finetune"],
              "steps": kd["finetune_steps"], "kl0": kd["after_search"]["held_out_images"]["kl"],
              "kl1": kd["after_finetune"]["held_out_images"]["kl"]})
    assert r["verdict"] == "fails" and '"verdict": "fails"' in README
    s = claim(r"even the training views agree only (?P<train>[\d.]+) % of the time")
    check(s, {"train": 100 * r["train_views_top1_after_finetune"]})


def test_fidelity_table_and_sentence_are_the_recorded_run():
    r = result("distill_smollm2_lora.json")
    rows = {row["model"]: row for row in r["rows"]}
    final = next(row for name, row in rows.items() if name.endswith("after stage 2"))
    equal = r["equal_state_baselines"][0]
    cells = r"\| (?P<state>[\d.]+) MiB \| (?P<r256>[\d.]+) \| (?P<r512>[\d.]+) \| (?P<r1024>[\d.]+) \| (?P<r2048>[\d.]+) \|"
    for pattern, row in ((r"\| the same after stage 2 \(LoRA \+ KD, \d+ min\) " + cells, final),
                         (r"\| sinks \+ window \d+, no training \(equal state\) " + cells, equal)):
        check(claim(pattern), {"state": row["state_MiB"], **{f"r{c}": row[f"ratio@{c}"] for c in (256, 512, 1024, 2048)}})
    s = claim(r"teacher-forced top-1 agreement @1024 is (?P<top1>[\d.]+) \(KL (?P<kl>[\d.]+)\), greedy agreement on "
              r"(?P<n>\d+) held-out (?P<len>\d+)-token prompts (?P<greedy>[\d.]+) .*? shorter than the window "
              r"(?P<short>[\d.]+) after stage 2")
    check(s, {"top1": r["agreement_1024"]["top1"], "kl": r["agreement_1024"]["kl"], "len": r["long_prompt_tokens"],
              "greedy": r["greedy_agreement_long_prompts"], "short": r["short_prompt_agreement"]["top1"]})
    assert sum(r["niah"]["student"]) == 0 and len(r["niah"]["where_teacher_succeeds"]) == 4
    ev = r["lm_eval"]["metrics"]
    s = claim(r"word perplexity (?P<orig>[\d.]+) for the original and (?P<dist>[\d.]+) for the distilled model in memory "
              r"and for its Hugging Face folder alike \(ratio (?P<ratio>[\d.]+);.*? multiple choice (?P<mc>[\d.]+) for all three")
    check(s, {"orig": ev["original"]["surgeon_pydoc_ppl"]["word_perplexity"],
              "dist": ev["surgered"]["surgeon_pydoc_ppl"]["word_perplexity"],
              "ratio": r["lm_eval"]["word_perplexity_ratio"]["surgered"], "mc": ev["original"]["surgeon_python_mc"]["acc"]})
    assert ev["hf"] == ev["surgered"] and ev["surgered"]["surgeon_python_mc"] == ev["original"]["surgeon_python_mc"]


def test_long_context_sentence_is_the_recorded_run():
    r = result("long_context.json")
    same = {(c["phase"], c["tokens"], c["runtime"]): c for c in r["same_runtime"]}
    decode = {(d["context"], d["model"], d["runtime"].split()[0]): d for d in r["decode"]}
    s = claim(r"at 8 K tokens the linearized prefill is (?P<ort>[\d.]+)× faster in onnxruntime \((?P<ort_l>[\d.]+) s vs "
              r"(?P<ort_o>[\d.]+) s\) and (?P<eag>[\d.]+)× in eager \((?P<eag_l>[\d.]+) s vs (?P<eag_o>[\d.]+) s\)")
    o8, e8 = same[("prefill", 8192, "onnxruntime")], same[("prefill", 8192, "eager")]
    check(s, {"ort": o8["speedup"], "ort_l": o8["linear"], "ort_o": o8["original"], "eag": e8["speedup"],
              "eag_l": e8["linear"], "eag_o": e8["original"]})
    s = claim(r"onnxruntime: (?P<l128>[\d.]+) / (?P<l2k>[\d.]+) ms at 128 / 2 K context for the linearized model against "
              r"(?P<o128>[\d.]+) / (?P<o2k>[\d.]+) ms for the original \((?P<x>[\d.]+)× faster at 2 K\); in eager the "
              r"linearized step is slower \((?P<el128>[\d.]+) / (?P<el2k>[\d.]+) ms against (?P<eo128>[\d.]+) / (?P<eo2k>[\d.]+) ms\)")
    check(s, {"l128": decode[(128, "linear", "onnxruntime")]["ms_per_token"],
              "l2k": decode[(2048, "linear", "onnxruntime")]["ms_per_token"],
              "o128": decode[(128, "original", "onnxruntime")]["ms_per_token"],
              "o2k": decode[(2048, "original", "onnxruntime")]["ms_per_token"],
              "x": same[("decode", 2048, "onnxruntime")]["speedup"],
              "el128": decode[(128, "linear", "torch")]["ms_per_token"], "el2k": decode[(2048, "linear", "torch")]["ms_per_token"],
              "eo128": decode[(128, "original", "torch")]["ms_per_token"], "eo2k": decode[(2048, "original", "torch")]["ms_per_token"]})
    s = claim(r"decode state is (?P<lin>[\d,]+) bytes at any context; the original's KV cache is (?P<kv>[\d,]+) bytes at 2 K")
    check(s, {"lin": decode[(2048, "linear", "torch")]["state_bytes"], "kv": decode[(2048, "original", "torch")]["state_bytes"]})


def test_demo_sentence_is_the_recorded_demo_run():
    r = result("demo_smollm2.json")
    d, onnx = r["distill"], r["onnx"]
    s = claim(r"the whole demo took (?P<total>\d+) s with exit 0; distillation moved the perplexity ratio @512 from "
              r"(?P<before>[\d.]+) to (?P<after>[\d.]+) and kept top-1 agreement on prompts shorter than the window at "
              r"(?P<short>[\d.]+); the background export took (?P<export>\d+) s and was done when the distillation was "
              r"\(the demo waited (?P<waited>\d+) s for it\), and writing the distilled weights into it took (?P<update>\d+) s")
    check(s, {"total": r["wall_clock_s"], "before": d["ratio_before"], "after": d["ratio_after"],
              "short": d["short_prompt_agreement"], "export": onnx["export_seconds"], "update": onnx["update_seconds"],
              "waited": onnx["export_wait_seconds"]})
    assert r["passed"] and onnx["exported_while_distilling"] and onnx["export_seconds"] < r["wall_clock_s"]
    assert onnx["text"] == r["answers"]["distilled"]["text"]        # "onnxruntime's answer is the distilled model's"
    s = claim(r"(?P<tokens>\d+) prompt tokens, so with a 64-token window and 4 sinks (?P<pct>\d+) % of the prompt")
    check(s, {"tokens": r["prompt_tokens"], "pct": 100 * r["linear_fraction"]})


@pytest.mark.parametrize("name,label", [
    ("distill_smollm2_quick.json", r"stage 2 on the linear branch only \(default, `distill_smollm2_quick.json`\)"),
    ("distill_smollm2_quick_lora.json", r"stage 2 LoRA on q/k/v/o \(`distill_smollm2_quick_lora.json`\)"),
    ("distill_smollm2_quick_nostage1.json",
     r"linear branch, no stage 1, 13 min of stage 2 \(`distill_smollm2_quick_nostage1.json`\)")])
def test_quick_stage2_table_is_the_recorded_runs(name, label):
    r = result(name)
    final = next(row for row in r["rows"] if row["model"].endswith("after stage 2"))
    cells = (r" \| (?P<r256>[\d.]+) \| (?P<r512>[\d.]+) \| (?P<r1024>[\d.]+) \| (?P<r2048>[\d.]+) \| (?P<top1>[\d.]+) \| "
             r"(?P<greedy>[\d.]+) \| (?P<short>[\d.]+) \| (?P<minutes>[\d.]+) \|")
    check(claim(r"\| " + label + cells), {
        **{f"r{c}": final[f"ratio@{c}"] for c in (256, 512, 1024, 2048)}, "top1": r["agreement_1024"]["top1"],
        "greedy": r["greedy_agreement_long_prompts"], "short": r["short_prompt_agreement"]["top1"],
        "minutes": r["minutes_total"]})
    assert r["stage2"]["trains"] == ("lora" if "lora" in name else "linear-branch")
    assert final["ratio@1024"] <= r["targets"]["quick_ratio_1024"]
    assert r["long_prompt_tokens"] == 512 and "on 20 held-out 512-token prompts" in README
    equal = r["equal_state_baselines"][0]
    check(claim(r"\| sinks \+ window 303, no training \(equal state\) \| (?P<r256>[\d.]+) \| (?P<r512>[\d.]+) \| "
                r"(?P<r1024>[\d.]+) \| (?P<r2048>[\d.]+) \| \| \| \| 0 \|"),
          {f"r{c}": equal[f"ratio@{c}"] for c in (256, 512, 1024, 2048)})


def test_retrieval_layer_sentence_is_the_recorded_scan():
    r = result("retrieval_layers_smollm2.json")
    layers = {int(k): v for k, v in r["scores"].items() if int(k) >= 0}
    s = claim(r"giving any single one of the (?P<n>\d+) layers its softmax attention back \((?P<mib>\d+) MiB more state "
              r"at 8 K\) retrieves the passkey in at most (?P<best>\d+) of (?P<trials>\d+) trials, where the teacher "
              r"retrieves (?P<teacher>\d+) of (?P<trials2>\d+)")
    extra = r["rows"][1]["state_MiB@8K, window 256"] - r["rows"][0]["state_MiB@8K, window 256"]
    check(s, {"n": len(layers), "mib": extra, "best": max(layers.values()) * r["trials"], "trials": r["trials"],
              "teacher": r["teacher_score"] * r["trials"], "trials2": r["trials"]})
    assert r["window"] == 256 and r["needle_before_window"]


def test_retrieval_block_sentence_is_the_recorded_scan():
    r = result("retrieval_layers_smollm2_sets.json")
    got = {row["softmax layers"]: row["needle score"] * r["trials"] for row in r["rows"]}
    s = claim(r"layers 0–9, 10–19, 20–29 or 0–14 retrieve (?P<zero>\d+) of (?P<n>\d+), 15–29 (?P<late>\d+) of \d+ and "
              r"8–21 (?P<mid>\d+) of \d+")
    check(s, {"zero": max(got[k] for k in ("0-9", "10-19", "20-29", "0-14")), "n": r["trials"], "late": got["15-29"],
              "mid": got["8-21"]})
    assert got["none"] == 0 and r["teacher_score"] == 1.0 and r["window"] == 256


def _needle_hits(r: dict, scores: list[float]) -> tuple[int, int]:
    """Trials retrieved / trials, at the depths where the teacher succeeds."""
    n = r["needle"]["trials_per_depth"]
    where = [i for i, s in enumerate(r["needle"]["teacher"]) if s >= 0.8]
    return round(sum(scores[i] for i in where) * n), len(where) * n


@pytest.mark.parametrize("name,label", [("memory_slots_smollm2_full.json", "full \\(LoRA\\)"),
                                        ("memory_slots_smollm2_quick.json", "quick \\(linear branch\\)")])
def test_memory_slot_table_is_the_recorded_runs(name, label):
    r, full = result(name), result("memory_slots_smollm2_full.json")
    assert r["sinks"] == 4 and r["needle"]["context"] == 1024 and r["greedy"]["prompt_tokens"] == 512
    cells = (r" \| (?P<mib>[\d.]+) MiB \((?P<pct>[\d.]+) %\) \| (?P<hits>\d+)/(?P<n>\d+) \| (?P<greedy>[\d.]+) \| "
             r"(?P<r1024>[\d.]+) \| (?P<r2048>[\d.]+) \|")
    baselines = {row["window"]: row for row in full["rows"] if row["model"].startswith("sinks")}
    for row in r["rows"]:
        if row["model"].startswith("sinks"):   # teacher only: the quick file's equal the full file's (shown once)
            same = baselines[row["window"]]
            assert all(row[k] == same[k] for k in ("needle", "ratio@1024", "ratio@2048", "state_MiB@8K"))
            row = same
            what = f"sinks \\+ window {row['window']}, no training \\(equal state\\)"
        else:
            what = f"{label} student, window {row['window']} \\+ {row['slots']} slots"
        hits, n = _needle_hits(r, row["needle"])
        check(claim(r"\| " + what + cells), {
            "mib": row["state_MiB@8K"], "pct": row["state_%KV@8K"], "hits": hits, "n": n, "greedy": row["greedy_long"],
            "r1024": row["ratio@1024"], "r2048": row["ratio@2048"]})


def test_memory_slot_needle_curve_is_the_recorded_run():
    r = result("memory_slots_smollm2_needle.json")
    got = {(row["window"], row["slots"]): _needle_hits(r, row["needle"])[0] for row in r["rows"]}
    s = claim(r"at window 256, 64 slots retrieve it in (?P<s64>\d+) of 8 trials, 128 in (?P<s128>\d+) \((?P<pct128>[\d.]+) % "
              r"of the KV cache; sinks \+ window at that state (?P<b128>\d+)\) and 256 in (?P<s256>\d+) "
              r"\((?P<pct256>[\d.]+) %; sinks \+ window (?P<b256>\d+)\)")
    pct = {(row["window"], row["slots"]): row["state_%KV@8K"] for row in r["rows"]}
    check(s, {"s64": got[(256, 64)], "s128": got[(256, 128)], "s256": got[(256, 256)], "pct128": pct[(256, 128)],
              "pct256": pct[(256, 256)], "b128": got[(431, 0)], "b256": got[(559, 0)]})


def test_memory_slot_sentence_is_the_recorded_run():
    r = result("memory_slots_smollm2_full.json")
    rows = {(row["window"], row["slots"]): row for row in r["rows"]}
    s = claim(r"the full student with window 256 \+ 64 slots is at (?P<r1024>[\d.]+) @1024 and (?P<r2048>[\d.]+) @2048 "
              r"\(sinks \+ window 367: (?P<b1024>[\d.]+) and (?P<b2048>[\d.]+)\) with greedy agreement (?P<g>[\d.]+) "
              r"\((?P<bg>[\d.]+)\), and with window 128 \+ 192 slots it also retrieves the needle in (?P<h>\d+) of 8 "
              r"trials \(sinks \+ window: (?P<bh>\d+) of 8\)\. Window 64 \+ 256 slots retrieves it in (?P<h64>\d+) of 8")
    ours, base = rows[(256, 64)], rows[(367, 0)]
    check(s, {"r1024": ours["ratio@1024"], "r2048": ours["ratio@2048"], "b1024": base["ratio@1024"],
              "b2048": base["ratio@2048"], "g": ours["greedy_long"], "bg": base["greedy_long"],
              "h": _needle_hits(r, rows[(128, 192)]["needle"])[0], "bh": _needle_hits(r, base["needle"])[0],
              "h64": _needle_hits(r, rows[(64, 256)]["needle"])[0]})
    quick = {(row["window"], row["slots"]): row for row in result("memory_slots_smollm2_quick.json")["rows"]}
    check(claim(r"retrieves it in \d+ of 8 \(the quick student: (?P<q64>\d+) of 8\)"),
          {"q64": _needle_hits(r, quick[(64, 256)]["needle"])[0]})
    assert ours["state_%KV@8K"] <= 5 and rows[(128, 192)]["state_%KV@8K"] <= 5


def test_planned_memory_sentences_are_the_recorded_run():
    r = result("memory_slots_smollm2_untrained.json")
    cal = r["retrieval_calibration"]
    score = cal["layer_score"]
    top = sorted(range(len(score)), key=lambda i: -score[i])
    s = claim(r"put up to (?P<s0>[\d.]+) of their attention on its source in one head of layer (?P<l0>\d+), (?P<s1>[\d.]+) "
              r"in layer (?P<l1>\d+), (?P<s2>[\d.]+) in layer (?P<l2>\d+) and (?P<s3>[\d.]+) in layer (?P<l3>\d+) "
              r"\(`retrieval_heads`\); (?P<k>\d+) of the 30 layers score within half of the best\. `plan_memory` gives "
              r"those layers up to (?P<boost>[\d.]+) times the slots and takes the difference evenly from the other (?P<rest>\d+)")
    chosen = [i for i in range(30) if score[i] >= cal["threshold"] * max(score)]
    check(s, {**{f"s{j}": score[top[j]] for j in range(4)}, **{f"l{j}": top[j] for j in range(4)}, "k": len(chosen),
              "boost": cal["boost"], "rest": 30 - len(chosen)})
    rows = {(row["window"], row["slots"], "slots_per_layer" in row): row for row in r["rows"]}
    for row in r["rows"]:          # planned: the same total as uniform, more in exactly the chosen layers
        if "slots_per_layer" in row:
            per = row["slots_per_layer"]
            assert sum(per) == 30 * row["slots"] and {i for i in range(30) if per[i] > row["slots"]} == set(chosen)
    hits = {k: _needle_hits(r, row["needle"])[0] for k, row in rows.items()}
    s = claim(r"planned slots retrieve the needle in (?P<p128>\d+) of 8 trials at window 128 \+ 192 slots where uniform "
              r"slots retrieve (?P<u128>\d+) \((?P<pct>[\d.]+) % of the KV cache; sinks \+ window at that state "
              r"(?P<b>\d+)\), (?P<p256>\d+) of 8 at window 256 \+ 128 where uniform retrieve (?P<u256>\d+) "
              r"\((?P<pct256>[\d.]+) %\), and (?P<p64>\d+) of 8 at window 256 \+ 64 where uniform retrieve (?P<u64>\d+)")
    check(s, {"p128": hits[(128, 192, True)], "u128": hits[(128, 192, False)], "pct": rows[(128, 192, True)]["state_%KV@8K"],
              "b": hits[(367, 0, False)], "p256": hits[(256, 128, True)], "u256": hits[(256, 128, False)],
              "pct256": rows[(256, 128, True)]["state_%KV@8K"], "p64": hits[(256, 64, True)], "u64": hits[(256, 64, False)]})
    assert r["student"] == "untrained" and r["needle"]["teacher"] == [1.0] * 4


def test_full_default_recipe_sentence_is_the_recorded_run():
    r = result("distill_smollm2.json")
    after = [row for row in r["rows"] if row["model"].endswith("after stage 2")][0]
    base = r["equal_state_baselines"][0]
    s = claim(r"ends at (?P<r1024>[\d.]+) @1024 and (?P<r2048>[\d.]+) @2048 after (?P<m1>[\d.]+) min of stage 1 and "
              r"(?P<m2>[\d.]+) min of stage 2 \((?P<tok>\d+) K tokens at (?P<tps>\d+) tokens/s\): below sinks \+ window "
              r"(?P<w>\d+) at equal state \((?P<b1024>[\d.]+) and (?P<b2048>[\d.]+)\)")
    check(s, {"r1024": after["ratio@1024"], "r2048": after["ratio@2048"], "m1": r["stage1"]["minutes"],
              "m2": r["stage2"]["minutes"], "tok": r["stage2"]["tokens"] / 1000, "tps": r["stage2"]["tokens_per_s"],
              "w": base["equal_state_window"], "b1024": base["ratio@1024"], "b2048": base["ratio@2048"]})
    s = claim(r"stay exact \(top-1 (?P<short>[\d.]+)\); top-1 agreement @1024 is (?P<top1>[\d.]+), greedy agreement on "
              r"(?P<n>\d+) long prompts (?P<greedy>[\d.]+) and the needle is retrieved in (?P<hits>\d+) of 4 depths")
    check(s, {"short": r["short_prompt_agreement"]["top1"], "top1": r["agreement_1024"]["top1"],
              "n": 24, "greedy": r["greedy_agreement_long_prompts"], "hits": sum(r["niah"]["student"])})
    assert r["mode"] == "full" and after["ratio@1024"] <= 1.15 and after["ratio@1024"] < base["ratio@1024"]


def test_planned_memory_table_on_the_full_student_is_the_recorded_run():
    r, full = result("memory_slots_smollm2_planned.json"), result("memory_slots_smollm2_full.json")
    assert settings_of_run(r) == settings_of_run(full) and r["student"].endswith("full/student")
    cells = (r" \| (?P<mib>[\d.]+) MiB \((?P<pct>[\d.]+) %\) \| (?P<hits>\d+)/(?P<n>\d+) \| (?P<greedy>[\d.]+) \| "
             r"(?P<r1024>[\d.]+) \| (?P<r2048>[\d.]+) \|")
    rows = {}
    for row in r["rows"]:
        if row["model"].startswith("sinks"):
            continue
        planned = "slots_per_layer" in row
        rows[(row["window"], row["slots"], planned)] = row
        what = f"full \\(linear branch\\) student, window {row['window']} \\+ {row['slots']} slots" + (", planned" if planned else "")
        hits, n = _needle_hits(r, row["needle"])
        check(claim(r"\| " + what + cells), {
            "mib": row["state_MiB@8K"], "pct": row["state_%KV@8K"], "hits": hits, "n": n, "greedy": row["greedy_long"],
            "r1024": row["ratio@1024"], "r2048": row["ratio@2048"]})
    best, base = rows[(128, 192, True)], [row for row in r["rows"] if row["model"].startswith("sinks")][0]
    s = claim(r"perplexity target \((?P<r>[\d.]+) @1024, below sinks \+ window's (?P<b>[\d.]+)\) and greedy target "
              r"\((?P<g>[\d.]+) ≥ 0.60\) and retrieves the needle beyond the window in (?P<h>\d+) of 8 trials \(sinks \+ "
              r"window at the same state: (?P<bh>\d+), uniform slots: (?P<uh>\d+)\)")
    check(s, {"r": best["ratio@1024"], "b": base["ratio@1024"], "g": best["greedy_long"],
              "h": _needle_hits(r, best["needle"])[0], "bh": _needle_hits(r, base["needle"])[0],
              "uh": _needle_hits(r, rows[(128, 192, False)]["needle"])[0]})
    assert best["state_%KV@8K"] <= 5 and best["ratio@1024"] <= 1.15 and best["greedy_long"] >= 0.6


def settings_of_run(r: dict) -> tuple:
    return (r["needle"]["trials_per_depth"], r["greedy"]["prompts"], r["greedy"]["new_tokens"], r["eval_windows"])
