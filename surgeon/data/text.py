"""Offline English prose for calibration and perplexity: CPython's ``pydoc_data/topics.py``.

Topics are split into fixed train / held-out parts by a hash of the topic name (stable across runs
and machines); text is tokenized and cut into fixed-length chunks (no padding).

Example:
    >>> train, held = topic_split()
    >>> len(train) > len(held) > 0 and not set(train) & set(held)
    True
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch


def topics() -> dict[str, str]:
    """Topic name → text of the ``pydoc_data.topics`` module (always present in CPython)."""
    from pydoc_data.topics import topics as t

    return dict(t)


def topic_split(held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """Topic names in (train, held-out), split by a SHA-1 of the name."""
    train, held = [], []
    for name in sorted(topics()):
        h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < held_out else train).append(name)
    return train, held


def token_chunks(tokenizer: Any, split: str = "train", seq_len: int = 128, n_chunks: int = 32,
                 batch_size: int = 8, held_out: float = 0.2) -> list[torch.Tensor]:
    """``n_chunks`` chunks of ``seq_len`` tokens from one split, as ``(batch, seq_len)`` LongTensor batches."""
    train, held = topic_split(held_out)
    names = {"train": train, "held_out": held, "heldout": held, "test": held}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    t = topics()
    text = "\n\n".join(t[n] for n in names)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seq_len
    if available < n_chunks:
        raise ValueError(f"the {split} split has {ids.numel()} tokens: only {available} chunks of {seq_len}")
    chunks = ids[: n_chunks * seq_len].reshape(n_chunks, seq_len)
    return [chunks[i:i + batch_size] for i in range(0, n_chunks, batch_size)]


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Token-level perplexity of a causal LM on ``(batch, seq)`` id batches (next-token loss, mean over tokens)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids in batches:
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += target.numel()
    finally:
        model.train(was)
    return math.exp(total / max(count, 1))


__all__ = ["topics", "topic_split", "token_chunks", "perplexity"]
