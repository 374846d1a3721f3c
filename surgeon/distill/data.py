"""Training / evaluation data: any iterable of texts or token ids, packed to a fixed length; offline sources.

Packing concatenates documents (an EOS token between them when the tokenizer has one) and cuts the
stream into ``seq_len``-token rows; a short tail is dropped. Built-in sources, all offline:

* ``pydoc_texts(split)``: CPython's ``pydoc_data/topics.py`` prose (~465 k characters, 79 topics),
  split into fixed train / held-out topic sets by a SHA-1 of the topic name. Lines that occur in a
  held-out topic are removed from the training topics too, so no held-out text is ever trained on.
* ``teacher_texts(model, tokenizer, n)``: text sampled from the teacher (seeded), prompted with the
  first sentences of training topics (self-distillation data, as LoLCATs' Alpaca stands in for).

Example:
    >>> train, held = topic_split()
    >>> len(train), len(held), bool(set(train) & set(held))
    (64, 15, False)
    >>> pack([[1, 2, 3, 4, 5], [6, 7, 8]], seq_len=3, eos_token_id=0).tolist()
    [[1, 2, 3], [4, 5, 0], [6, 7, 8]]
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch

from surgeon.core.errors import ConfigError
from surgeon.data.text import topic_split
from surgeon.data.text import topics as pydoc_topics

HELD_OUT_FRACTION = 0.2


# -- pydoc topics ---------------------------------------------------------------------------------
def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def pydoc_texts(split: str = "train") -> list[str]:
    """One text per topic of ``split`` (``train`` or ``held_out``); train texts lose every line (of 4+
    characters) that also occurs in a held-out topic (shared boilerplate, table rules, examples)."""
    train, held = topic_split(HELD_OUT_FRACTION)
    topics = pydoc_topics()
    if split in ("held_out", "heldout", "test", "eval"):
        return [topics[n] for n in held]
    if split != "train":
        raise ConfigError(f"pydoc split must be 'train' or 'held_out', got {split!r}")
    held_lines = {line.strip() for n in held for line in topics[n].splitlines() if len(line.strip()) >= 4}
    out = []
    for n in train:
        kept = [line for line in topics[n].splitlines() if line.strip() not in held_lines]
        text = "\n".join(kept).strip()
        if text:
            out.append(text)
    return out


# -- teacher-generated text --------------------------------------------------------------------------
@torch.no_grad()
def teacher_texts(model: torch.nn.Module, tokenizer: Any, n: int = 8, max_new_tokens: int = 256, seed: int = 0,
                  temperature: float = 0.8, top_p: float = 0.95) -> list[str]:
    """``n`` texts sampled from ``model`` (seeded; the global RNG is left as it was), each prompted with
    the opening of a training topic. Deterministic for a given model, seed and machine."""
    prompts = []
    for text in pydoc_texts("train"):
        first = text.strip().split("\n")[0][:200]
        if len(first) > 20:
            prompts.append(first)
    if not prompts:
        raise ConfigError("no prompts for teacher-generated text")
    was = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            ids = tokenizer(prompts[i % len(prompts)], return_tensors="pt")
            ids = {k: v.to(_device(model)) for k, v in ids.items()}
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    model.train(was)
    return out


CHAT_ASKS = ("Summarize this passage in a few sentences:", "Explain what this passage means, with an example:",
             "What are the key points of the following text?", "Rewrite this more simply:")


def chat_prompts(n: int, split: str = "train", seed: int = 0, passage_chars: int = 600) -> list[str]:
    """``n`` user messages (an instruction + a passage of ``split`` pydoc prose), seeded; for chat-format data."""
    rng = torch.Generator().manual_seed(seed)
    paragraphs = [p for text in pydoc_texts(split) for p in _paragraphs(text) if len(p) > 200]
    if not paragraphs:
        raise ConfigError(f"no {split} passages for chat prompts")
    order = torch.randperm(len(paragraphs), generator=rng).tolist()
    return [f"{CHAT_ASKS[i % len(CHAT_ASKS)]}\n\n{paragraphs[order[i % len(order)]][:passage_chars]}"
            for i in range(n)]


@torch.no_grad()
def chat_texts(model: torch.nn.Module, tokenizer: Any, n: int = 8, max_new_tokens: int = 192, seed: int = 0,
               cache: str | Path | None = None) -> list[str]:
    """Chat-formatted conversations: training-topic prompts and the teacher's own greedy answers.

    Training on them (with KD at every position) keeps the behaviour users see, answers to chat
    prompts, not only prose statistics. ``cache``: a JSON file reused when it holds the same request.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("chat data needs a tokenizer with a chat template (an instruct model's tokenizer)")
    key = {"n": n, "max_new_tokens": max_new_tokens, "seed": seed, "model": type(model).__name__,
           "vocab": getattr(getattr(model, "config", None), "vocab_size", None)}
    path = Path(cache) if cache is not None else None
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["texts"]
    was = model.training
    model.eval()
    out = []
    for prompt in chat_prompts(n, "train", seed):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(_device(model))
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(text + tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=False))
    model.train(was)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "texts": out}))
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- packing ---------------------------------------------------------------------------------------
def _integer_ids(t: torch.Tensor, what: str) -> None:
    """Token ids are integers: a float / bool / complex tensor is refused, never truncated to ids."""
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ConfigError(f"{what} has dtype {t.dtype}; token ids must be an integer tensor (torch.long): pass "
                          "tokenizer output, or texts with tokenizer=... (a float tensor would be truncated to ids)")


def _as_id_lists(data: Any, tokenizer: Any) -> list[list[int]]:
    if isinstance(data, str):
        raise ConfigError("data is a single string: pass a list of texts (e.g. [text]) or a built-in source "
                          "name ('pydoc', 'teacher')")
    if isinstance(data, torch.Tensor):
        _integer_ids(data, "token tensor data")
        if data.dim() == 1:
            return [data.tolist()]
        if data.dim() == 2:
            return [row.tolist() for row in data]
        raise ConfigError(f"token tensor data must be 1-D or 2-D (sequences × tokens), got shape {tuple(data.shape)}")
    docs: list[list[int]] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError(f"data item {i} is text but no tokenizer was given: pass tokenizer=... "
                                  "or token ids")
            docs.append(tokenizer(item, add_special_tokens=False)["input_ids"])
        elif isinstance(item, torch.Tensor):
            _integer_ids(item, f"data item {i}")
            if item.dim() > 2:
                raise ConfigError(f"data item {i}: token tensor of shape {tuple(item.shape)}; expected 1-D or 2-D")
            docs.extend([item.tolist()] if item.dim() == 1 else [r.tolist() for r in item])
        elif isinstance(item, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            docs.append(list(item))
        elif isinstance(item, dict) and "input_ids" in item:
            docs.extend(_as_id_lists([item["input_ids"]], tokenizer))
        else:
            raise ConfigError(f"data item {i} is a {type(item).__name__}: expected a text, a list of token ids or a "
                              "token tensor")
    return docs


def pack(data: Any, seq_len: int, tokenizer: Any = None, eos_token_id: int | None = None,
         vocab_size: int | None = None, what: str = "data") -> torch.Tensor:
    """Pack texts / token sequences into a ``(n, seq_len)`` LongTensor (EOS between documents)."""
    docs = [d for d in _as_id_lists(data, tokenizer) if d]
    if not docs:
        raise ConfigError(f"{what} is empty: give at least one non-empty text or token sequence "
                          "(or a built-in source: 'pydoc', 'teacher')")
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    if eos_token_id is not None:
        stream.pop()
    n = len(stream) // seq_len
    if n == 0:
        raise ConfigError(f"{what} holds {len(stream)} tokens in {len(docs)} document(s), fewer than one training "
                          f"sequence of seq_len={seq_len} tokens: give more text or lower seq_len")
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise ConfigError(f"{what} has token id {int(ids.max())} outside the model's vocabulary of {vocab_size}: "
                          "tokenize with the model's own tokenizer")
    return ids


def resolve(data: Any, model: torch.nn.Module, tokenizer: Any, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``data`` as packed training ids: a built-in source name, texts, token lists or a tensor."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(data, str) and data in ("pydoc", "teacher", "pydoc+teacher"):
        if tokenizer is None:
            raise ConfigError(f"data={data!r} is text: pass tokenizer=...")
        texts: list[str] = []
        if "pydoc" in data:
            texts += pydoc_texts("train")
        if "teacher" in data:
            texts += teacher_texts(model, tokenizer, seed=seed)
        return pack(texts, seq_len, tokenizer, vocab_size=vocab, what=f"data={data!r}")
    if data is None:
        raise ConfigError("data is None: pass texts, token ids, or a built-in source name ('pydoc', 'teacher')")
    return pack(data, seq_len, tokenizer, vocab_size=vocab)


def ngram_overlap(train: torch.Tensor, held: torch.Tensor, n: int = 32) -> int:
    """How many length-``n`` token windows of ``held`` also occur anywhere in ``train`` (0 = disjoint)."""
    seen = set()
    for row in train.tolist():
        for i in range(len(row) - n + 1):
            seen.add(tuple(row[i:i + n]))
    hits = 0
    for row in held.tolist():
        for i in range(len(row) - n + 1):
            hits += tuple(row[i:i + n]) in seen
    return hits


def data_digest(packs: torch.Tensor) -> str:
    return hashlib.sha1(packs.contiguous().numpy().tobytes()).hexdigest()[:16] + f"-{tuple(packs.shape)}"


__all__ = ["topic_split", "pydoc_texts", "teacher_texts", "chat_prompts", "chat_texts", "pack", "resolve", "ngram_overlap", "data_digest"]
