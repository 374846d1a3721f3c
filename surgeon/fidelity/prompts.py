"""Held-out prompts for fidelity evaluation: prose, code and chat over a passage, split into validation / test.

Text we never train on (``surgeon.distill`` trains on the *train* pydoc topics and on teacher-generated
answers about them):

* ``prose``: the held-out pydoc topics and IDLE's bundled text files (NEWS, HISTORY, README, ...);
* ``code``: CPython's standard-library ``.py`` sources;
* ``chat``: a user message holding a passage of that prose or code and a question, in the model's chat
  template, ending where the assistant's answer starts.

Each source document goes to ``validation`` or ``test`` by a SHA-1 of its name, so the two splits share no
text: every choice (configuration, split of a budget, constant) is made on ``validation`` and reported once on
``test``. Prompts of one kind and split are disjoint windows of one stream of that split's documents.

Example:
    >>> import transformers
    >>> from surgeon.fidelity.prompts import source_documents
    >>> docs = source_documents("code", "validation")
    >>> len(docs) > 10 and all(t for t in docs.values())
    True
    >>> bool(set(docs) & set(source_documents("code", "test")))
    False
"""
from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from surgeon.core.errors import ConfigError
from surgeon.data.text import topic_split, topics

KINDS = ("prose", "code", "chat")
SPLITS = ("validation", "test")
VALIDATION_FRACTION = 0.35
QUESTIONS = {
    "prose": ("Summarize the text above in three sentences.",
              "What are the three most important points of the text above?",
              "Explain the last part of the text above to a beginner.",
              "What is the text above about, and who would read it?"),
    "code": ("Explain what the code above does.",
             "Summarize the purpose of the functions defined above.",
             "What does the last function above return, and when?",
             "List the main classes or functions above and what each is for."),
}


@dataclass
class Prompt:
    """One evaluation prompt: token ids, its kind, split and the documents it came from."""

    kind: str
    split: str
    ids: list[int]
    sources: list[str] = field(default_factory=list)
    question: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.split}/{len(self.ids)}/{self.sources[0] if self.sources else '?'}"


def split_of(name: str) -> str:
    """``validation`` or ``test``: a fixed SHA-1 split of a source document's name."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if h < VALIDATION_FRACTION else "test"


@lru_cache(maxsize=None)
def _all_documents(kind: str) -> dict[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if kind == "prose":
        _, held = topic_split()
        t = topics()
        docs = {f"pydoc:{n}": t[n] for n in held}
        for f in sorted((stdlib / "idlelib").glob("*.txt")):
            docs[f"idlelib:{f.name}"] = f.read_text(encoding="utf-8", errors="replace")
        return docs
    if kind == "code":
        return {f"stdlib:{f.name}": f.read_text(encoding="utf-8", errors="replace")
                for f in sorted(stdlib.glob("*.py")) if f.stat().st_size > 2000}
    raise ConfigError(f"unknown text kind {kind!r}: one of {KINDS[:2]} (chat prompts wrap prose or code passages)")


def source_documents(kind: str, split: str) -> dict[str, str]:
    """The documents of ``kind`` (``prose`` / ``code``) that belong to ``split``."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: one of {SPLITS}")
    return {n: t for n, t in _all_documents(kind).items() if split_of(n) == split}


_STREAMS: dict[tuple[int, str, str], tuple[Any, list[int], list[tuple[int, str]]]] = {}


def _stream(tokenizer: Any, kind: str, split: str) -> tuple[list[int], list[tuple[int, str]]]:
    """The split's documents as one token stream, with (start offset, name) of each document (cached; the cache
    holds the tokenizer too, so its id cannot be reused by another one)."""
    key = (id(tokenizer), kind, split)
    if key not in _STREAMS:
        _STREAMS[key] = (tokenizer, *_tokenize_stream(tokenizer, kind, split))
    return _STREAMS[key][1], _STREAMS[key][2]


def _tokenize_stream(tokenizer: Any, kind: str, split: str) -> tuple[list[int], list[tuple[int, str]]]:
    ids: list[int] = []
    starts = []
    for name, text in source_documents(kind, split).items():
        starts.append((len(ids), name))
        ids += tokenizer(text.strip() + "\n\n", add_special_tokens=False)["input_ids"]
    return ids, starts


def _sources(starts: list[tuple[int, str]], lo: int, hi: int) -> list[str]:
    names = [n for i, (s, n) in enumerate(starts) if s < hi and (i + 1 == len(starts) or starts[i + 1][0] > lo)]
    return names


def available(tokenizer: Any, kind: str, split: str, context: int) -> int:
    """How many disjoint ``context``-token prompts of ``kind`` the ``split`` holds."""
    base = "prose" if kind == "chat" else kind
    ids, _ = _stream(tokenizer, base, split)
    if kind == "chat":      # alternating prose / code passages: each source gives its own windows
        ids_code, _ = _stream(tokenizer, "code", split)
        return 2 * min(len(ids) // context, len(ids_code) // context)
    return len(ids) // context


def make_prompts(tokenizer: Any, kind: str, split: str, context: int, n: int) -> list[Prompt]:
    """``n`` held-out prompts of ``context`` tokens (chat: at most ``context``, passage + question + template).

    Raises ConfigError naming how many exist when the split holds fewer than ``n``.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown prompt kind {kind!r}: one of {KINDS}")
    if context < 64 or n < 1:
        raise ConfigError(f"make_prompts: context must be >= 64 and n >= 1, got context={context}, n={n}")
    have = available(tokenizer, kind, split, context)
    if have < n:
        raise ConfigError(f"the {split} split holds {have} {kind} prompts of {context} tokens, {n} were asked for: "
                          f"ask for at most {have}, or a shorter context")
    if kind != "chat":
        ids, starts = _stream(tokenizer, kind, split)
        return [Prompt(kind, split, ids[i * context:(i + 1) * context], _sources(starts, i * context, (i + 1) * context))
                for i in range(n)]
    return _chat_prompts(tokenizer, split, context, n)


def _chat_prompts(tokenizer: Any, split: str, context: int, n: int) -> list[Prompt]:
    rng = random.Random(f"chat/{split}/{context}")
    streams = {k: _stream(tokenizer, k, split) for k in ("prose", "code")}
    out = []
    for i in range(n):
        base = ("prose", "code")[i % 2]
        ids, starts = streams[base]
        j = i // 2
        question = rng.choice(QUESTIONS[base])
        overhead = len(_chat_ids(tokenizer, "", question))
        room = context - overhead
        passage = tokenizer.decode(ids[j * context:j * context + room])
        chat = _chat_ids(tokenizer, passage, question)
        while len(chat) > context:          # decoding and re-encoding can merge / split a few tokens
            room -= len(chat) - context
            passage = tokenizer.decode(ids[j * context:j * context + room])
            chat = _chat_ids(tokenizer, passage, question)
        out.append(Prompt("chat", split, chat, _sources(starts, j * context, j * context + room), question))
    return out


def _chat_ids(tokenizer: Any, passage: str, question: str) -> list[int]:
    messages = [{"role": "user", "content": f"{passage}\n\n{question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


NEEDLES = (("\nThe secret passkey is {key}. Remember it.\n", "\nWhat is the secret passkey? The secret passkey is"),
           ("\nNote: the access code for the blue vault is {key}.\n",
            "\nWhat is the access code for the blue vault? The access code is"))


def make_needles(tokenizer: Any, split: str, context: int, depths: tuple[float, ...] = (0.1, 0.35, 0.6, 0.85),
                 haystacks: int = 4, keys_per_cell: int = 2, seed: int = 0) -> list[tuple[list[int], int, dict]]:
    """Passkey trials: ``haystacks`` (half prose, half code windows of ``split``) × ``depths`` × ``keys_per_cell``
    passkeys, two phrasings alternating. Each trial is (ids, answer_start, info)."""
    if haystacks < 1 or not depths or keys_per_cell < 1:
        raise ConfigError("make_needles: haystacks, depths and keys_per_cell must be non-empty / >= 1")
    rng = random.Random(f"{seed}/{split}/{context}")
    per_kind = {"prose": (haystacks + 1) // 2, "code": haystacks // 2}
    hays = []
    for kind, count in per_kind.items():
        if count:
            ids, starts = _stream(tokenizer, kind, split)
            have = len(ids) // context
            if have < count:
                raise ConfigError(f"the {split} split holds {have} {kind} haystacks of {context} tokens, {count} "
                                  "were asked for")
            hays += [(kind, ids[i * context:(i + 1) * context]) for i in range(count)]
    trials = []
    for h, (kind, hay) in enumerate(hays):
        for depth in depths:
            for r in range(keys_per_cell):
                key = str(rng.randint(10000, 99999))
                needle, question = NEEDLES[(h + r) % len(NEEDLES)]
                n_ids = tokenizer(needle.format(key=key), add_special_tokens=False)["input_ids"]
                q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
                a_ids = tokenizer(f" {key}", add_special_tokens=False)["input_ids"]
                fill = context - len(n_ids) - len(q_ids) - len(a_ids)
                body = hay[:fill]
                at = int(round(depth * len(body)))
                seq = body[:at] + n_ids + body[at:] + q_ids
                trials.append((seq + a_ids, len(seq), {"haystack": f"{kind}{h}", "depth": depth,
                                                       "distance": len(seq) - at}))
    return trials
