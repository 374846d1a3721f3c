"""The LLM demo's prompt is longer than the window, so most of its attention goes through the linear branch."""
from __future__ import annotations

import pytest

from surgeon.cli.demo_llm import linear_fraction, token_agreement


def test_linear_fraction_counts_the_pairs_outside_window_and_sinks():
    assert linear_fraction(10, 10, 4) == 0.0                      # the window covers everything
    assert linear_fraction(6, 2, 1) == pytest.approx((21 - (1 + 2 + 3 + 3 + 3 + 3)) / 21)
    assert token_agreement([1, 2, 3], [1, 5, 3, 4]) == 0.5


@pytest.mark.slow
def test_demo_prompt_is_over_1024_tokens_and_78_percent_linear():
    from surgeon.cli.demo_llm import _ids, long_prompt
    from surgeon.models.smollm2 import load_smollm2_tokenizer

    n = _ids(load_smollm2_tokenizer(), long_prompt())["input_ids"].shape[1]
    assert n == 1152 and n >= 4 * 128                              # ≥ 1,024 tokens, ≥ 4× the window
    assert round(linear_fraction(n, 128, 4), 2) == 0.78            # 78 % of the pairs are linear
