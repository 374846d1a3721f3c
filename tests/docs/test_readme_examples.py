"""The README's and docs' examples run and print what the page shows.

Every ```python block that a ```text block follows is executed (in a temporary folder, one thread) and its
printed output must equal the text block. The LLM example (SmolLM2, minutes of distillation) runs in the slow
suite on a tiny Llama with the real tokenizer, its step budget cut.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
PAGES = ("README.md", "docs/fidelity.md", "docs/deployment.md", "docs/private-inference.md", "docs/linearizer.md",
         "docs/compile.md", "docs/cli.md", "docs/architecture.md")


def examples() -> list[tuple[str, int, str, str]]:
    """(page, index, code, expected output) for each ```python block directly followed by a ```text block."""
    found = []
    for name in PAGES:
        text = (ROOT / name).read_text()
        for i, m in enumerate(re.finditer(r"```python\n((?:(?!```).)*?)```\n```text\n(.*?)```", text, re.S)):
            found.append((name, i, m[1], m[2]))
    return found


def _run(code: str) -> str:
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs_example__"})   # noqa: S102
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return out.getvalue()


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def test_the_pages_have_their_examples():
    got = {(name, i) for name, i, _, _ in examples()}
    assert {("README.md", 0), ("README.md", 1), ("README.md", 2), ("docs/private-inference.md", 0)} <= got


@pytest.mark.parametrize("name,index,code,expected", examples(), ids=[f"{n}-{i}" for n, i, _, _ in examples()])
def test_example_prints_what_the_page_shows(name, index, code, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = _run(code)
    assert _lines(printed) == _lines(expected), f"{name} example {index}: printed\n{printed}\nthe page shows\n{expected}"


@pytest.mark.slow
def test_llm_example_runs_on_a_tiny_llama(tmp_path, monkeypatch):
    """README example 2, as written, with a tiny Llama (SmolLM2's tokenizer and vocabulary) in place of the 135M
    model and its budget cut from 8 minutes of training to a few steps."""
    import transformers

    import surgeon.models.smollm2 as smollm2

    text = (ROOT / "README.md").read_text()
    code = next(m[1] for m in re.finditer(r"```python\n(.*?)```", text, re.S) if "load_smollm2()" in m[1])
    assert "max_minutes=8" in code and "seq_len=512" in code
    code = code.replace("max_minutes=8", "max_minutes=8, transfer_steps=2, lora_steps=2").replace("seq_len=512", "seq_len=64")
    tok = smollm2.load_smollm2_tokenizer()

    def tiny():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                                          tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(config).eval(), tok

    monkeypatch.setattr(smollm2, "load_smollm2", tiny)
    monkeypatch.chdir(tmp_path)
    printed = _run(code)
    assert "PASSED" in printed, printed
    assert (tmp_path / "out" / "lin" / "recipe.json").is_file() and (tmp_path / "out" / "onnx" / "decode.onnx").is_file()
