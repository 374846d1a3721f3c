"""Datasets and scoring of the local lm-eval tasks ``surgeon/eval/tasks/*.yaml`` (offline, nothing downloads).

The YAMLs name these functions with lm-eval's ``!function`` tag (``custom_dataset`` /
``process_results``), so lm-eval builds the datasets in memory:

* ``surgeon_pydoc_ppl`` (``loglikelihood_rolling``): the held-out CPython pydoc topics of
  :func:`surgeon.distill.data.pydoc_texts` (never trained on by ``surgeon distill``), cut at paragraph
  boundaries into documents of at most :data:`DOC_CHARS` characters; word / byte perplexity and bits
  per byte.
* ``surgeon_python_mc`` (``multiple_choice``): short questions about Python, four choices each.
* ``surgeon_python_gen`` (``generate_until``): short completions scored by exact match.

Example:
    >>> docs = pydoc_documents()
    >>> len(docs) > 20 and max(len(d["text"]) for d in docs) <= DOC_CHARS
    True
    >>> process_perplexity({"text": "two words"}, [-3.0])["word_perplexity"]
    (-3.0, 2)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).parent / "tasks"
DOC_CHARS = 2000


def pydoc_documents(max_chars: int = DOC_CHARS) -> list[dict[str, str]]:
    """Held-out pydoc prose as documents of whole paragraphs, at most ``max_chars`` characters each."""
    from surgeon.distill.data import pydoc_texts

    docs: list[dict[str, str]] = []
    for text in pydoc_texts("held_out"):
        current = ""
        for para in (p.strip() for p in text.split("\n\n")):
            if not para:
                continue
            para = para[:max_chars]
            if current and len(current) + 2 + len(para) > max_chars:
                docs.append({"text": current})
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current:
            docs.append({"text": current})
    return docs


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (TASK_DIR / name).read_text().splitlines() if line.strip()]


def pydoc_dataset(**_: Any) -> Any:
    """``custom_dataset`` of ``surgeon_pydoc_ppl``."""
    return _dataset(pydoc_documents())


def python_mc_dataset(**_: Any) -> Any:
    """``custom_dataset`` of ``surgeon_python_mc`` (``python_mc.jsonl``)."""
    return _dataset(_jsonl("python_mc.jsonl"))


def python_gen_dataset(**_: Any) -> Any:
    """``custom_dataset`` of ``surgeon_python_gen`` (``python_gen.jsonl``)."""
    return _dataset(_jsonl("python_gen.jsonl"))


def process_perplexity(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """Per-document (log-likelihood, count) pairs that lm-eval's weighted perplexity metrics aggregate."""
    (loglikelihood,) = results
    text = doc["text"]
    return {"word_perplexity": (loglikelihood, len(re.split(r"\s+", text))),
            "byte_perplexity": (loglikelihood, len(text.encode("utf-8"))),
            "bits_per_byte": (loglikelihood, len(text.encode("utf-8")))}
