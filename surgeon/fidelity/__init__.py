"""Fidelity evaluation that can tell configurations apart: held-out prose / code / chat prompts split into
validation and test, the original's own continuation as the reference, zero-training exact-token baselines
at equal decode-state bytes, and 95 % intervals on every figure.

    >>> from surgeon.fidelity import ExactTokenPolicy
    >>> ExactTokenPolicy(sinks=4, window=128, heavy=64, score="tova").name
    'sinks 4 + window 128 + tova 64'
"""
from surgeon.fidelity.exact_tokens import ExactTokenModel, ExactTokenPolicy
from surgeon.fidelity.measure import HFRunner, measure, needle_hit, reference
from surgeon.fidelity.prompts import KINDS, Prompt, make_needles, make_prompts
from surgeon.fidelity.report import compare, needle_summary, summarize
from surgeon.fidelity.stats import bootstrap_ci, paired_diff_ci, wilson

__all__ = ["ExactTokenModel", "ExactTokenPolicy", "HFRunner", "measure", "needle_hit", "reference", "KINDS",
           "Prompt", "make_needles", "make_prompts", "compare", "needle_summary", "summarize", "bootstrap_ci",
           "paired_diff_ci", "wilson"]
