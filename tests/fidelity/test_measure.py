"""Fidelity measurements: held-out prompt sets, the original's reference, a hybrid at λ = 0 against the
independent exact-token baseline, interval summaries."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.fidelity import (ExactTokenModel, ExactTokenPolicy, HFRunner, compare, make_needles, make_prompts,
                              measure, needle_hit, needle_summary, reference, summarize)
from surgeon.fidelity.prompts import available, source_documents
from surgeon.passes import LinearizeAttention
from surgeon_test_models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = byte_tokenizer()
    t.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                       "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return t


def test_splits_share_no_document_and_too_many_prompts_is_an_error(tok):
    assert not set(source_documents("prose", "validation")) & set(source_documents("prose", "test"))
    have = available(tok, "prose", "validation", 4096)
    prompts = make_prompts(tok, "prose", "validation", 4096, have)
    assert len(prompts) == have and all(len(p.ids) == 4096 for p in prompts)
    with pytest.raises(ConfigError, match=f"holds {have} prose prompts of 4096 tokens, {have + 1} were asked"):
        make_prompts(tok, "prose", "validation", 4096, have + 1)
    with pytest.raises(ConfigError, match="unknown prompt kind"):
        make_prompts(tok, "poetry", "test", 256, 1)


def test_chat_prompts_and_needles_fit_their_context(tok):
    chats = make_prompts(tok, "chat", "test", 300, 2)
    for p in chats:
        assert 290 <= len(p.ids) <= 300 and tok.decode(p.ids).endswith("<s>assistant\n") and p.question
    trials = make_needles(tok, "test", 400, depths=(0.2, 0.8), haystacks=2, keys_per_cell=1)
    assert len(trials) == 4
    for ids, start, info in trials:
        assert len(ids) == 400 and tok.decode(ids[start:]).strip() in tok.decode(ids[:start])
        assert info["distance"] > (0.15 * 400 if info["depth"] == 0.8 else 0.75 * 400)


def _lambda_zero(llama, window: int, sinks: int):
    student = surgeon.apply(copy.deepcopy(llama), LinearizeAttention(window=window, sinks=sinks)).model.eval()
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n.endswith("linear_log_weight"):
                p.fill_(-10.0)                                      # λ = e^-100: only the exact tokens remain
    return student


def test_hybrid_at_lambda_zero_is_the_sinks_window_baseline(llama):
    """Two independent implementations of one definition: surgeon's hybrid with its linear branch off
    (window w: a query sees its last w tokens) and the exact-token engine (w - 1 kept + the new one)."""
    ids = torch.randint(3, 259, (60,)).tolist()
    ref = reference(HFRunner(llama), ids, new_tokens=12)
    hybrid = measure(HFRunner(_lambda_zero(llama, window=10, sinks=3)), ref)
    engine = measure(ExactTokenModel(llama, ExactTokenPolicy(sinks=3, window=9, block=1)), ref)
    assert hybrid["greedy_tokens"] == engine["greedy_tokens"]
    for key in ("top1", "greedy", "first_divergence"):
        assert hybrid[key] == engine[key]
    assert hybrid["nll"] == pytest.approx(engine["nll"], rel=1e-5) and hybrid["kl"] == pytest.approx(engine["kl"],
                                                                                                       abs=1e-5)
    itself = measure(HFRunner(llama), ref)
    assert (itself["top1"], itself["greedy"], itself["kl"] < 1e-6) == (1.0, 1.0, True)
    assert itself["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert hybrid["kl"] > 1e-4 and hybrid["nll"] != pytest.approx(ref["nll"], rel=1e-4)   # the window does bite


def test_needle_hit_is_teacher_forced_argmax(llama):
    ids = torch.randint(3, 259, (30,)).tolist()
    ref = reference(HFRunner(llama), ids[:20], new_tokens=6)
    assert needle_hit(HFRunner(llama), ids[:20] + ref["continuation"], 20)
    wrong = ref["continuation"][:5] + [(ref["continuation"][5] + 1) % 259]
    assert not needle_hit(HFRunner(llama), ids[:20] + wrong, 20)


def test_summaries_report_n_intervals_and_ties():
    rows = [{"config": c, "kind": "code", "context": 64, "prompt": str(i), "top1": t + (0.2 if c == "a" else 0),
             "kl": 0.1, "greedy": t, "first_divergence": 2, "nll": 10.0 + i, "ref_nll": 9.0 + i, "tokens": 63}
            for c in ("a", "b") for i, t in enumerate([0.1, 0.3, 0.5, 0.7])]
    s = summarize(rows)
    assert s[("a", "code", 64)]["n"] == 4 and s[("a", "code", 64)]["ppl_ratio"] == pytest.approx(
        torch.tensor(4 / 252).exp().item())
    d = compare(rows, "a", "b")[("code", 64)]
    assert d["top1"] == pytest.approx(0.2) and d["top1_verdict"] == "better"
    assert d["greedy"] == 0 and d["greedy_verdict"] == "tie" and d["log_ppl_ratio_verdict"] == "tie"
    needles = needle_summary([{"config": "a", "context": 64, "hit": h, "orig_hit": o}
                              for h, o in [(1, 1), (0, 1), (1, 0), (0, 0)]])[("a", 64)]
    assert (needles["hits"], needles["original_right"], needles["hits_where_original_right"]) == (2, 2, 1)


def test_too_few_prompts_get_no_interval_and_no_verdict():
    rows = [{"config": c, "kind": "chat", "context": 64, "prompt": str(i), "top1": 0.5 + 0.1 * i + (c == "a"),
             "kl": 0.1, "greedy": 0.5, "first_divergence": 2, "nll": 10.0, "ref_nll": 9.0, "tokens": 63}
            for c in ("a", "b") for i in range(2)]
    assert summarize(rows)[("a", "chat", 64)]["top1_ci"] is None
    d = compare(rows, "a", "b")[("chat", 64)]
    assert d["top1"] == pytest.approx(1.0) and d["top1_ci"] is None and d["top1_verdict"] == "n < 3"
