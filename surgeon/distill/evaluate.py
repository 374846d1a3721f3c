"""``surgeon.evaluate``: held-out perplexity, agreement with the teacher, and synthetic recall probes.

* **Perplexity** on held-out text (by default the held-out pydoc topics, never trained on) in
  ``context``-token windows (1024 by default), student and teacher side by side, and their ratio.
* **Agreement**: teacher-forced top-1 agreement and mean KL(teacher ‖ student) over the same tokens,
  and greedy-generation agreement (fraction of identical tokens in short greedy continuations).
* **MQAR** (multi-query associative recall): ``n_pairs`` ``key: value`` lines, then queries of
  random keys; a trial counts when the value's tokens are predicted exactly (teacher-forced greedy).
  With no tokenizer the probe uses raw token ids (random keys / values).
* **Needle in a haystack**: a passkey sentence at several depths of a held-out prose haystack of
  ``niah_context`` tokens; scored by exact prediction of the passkey after the question.

Results print as a table, save as JSON and markdown.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> torch.manual_seed(0); m = transformers.LlamaForCausalLM(cfg).eval()  # doctest: +ELLIPSIS
    <...>
    >>> ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    >>> r = evaluate(m, data=ids, teacher=m, context=48, n_windows=2, niah_context=64, mqar_trials=2, niah_trials=1)
    >>> r.perplexity["ratio"], r.agreement["top1"]
    (1.0, 1.0)
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.distill.data import pack, pydoc_texts
from surgeon.core.errors import ConfigError
from surgeon.core.report import format_table

KEYS = ["apple", "river", "candle", "tiger", "marble", "forest", "window", "rocket", "garden", "pencil", "violin",
        "castle", "island", "mirror", "basket", "engine", "feather", "harbor", "lantern", "meadow", "planet",
        "saddle", "thunder", "velvet", "wagon", "anchor", "bridge", "canyon", "dragon", "falcon", "glacier", "helmet"]


@dataclass
class EvalResult:
    perplexity: dict[str, Any] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    mqar: dict[str, Any] = field(default_factory=dict)
    niah: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "agreement": self.agreement, "mqar": self.mqar, "niah": self.niah,
                "settings": self.settings}

    def rows(self) -> list[dict[str, Any]]:
        rows = [{"metric": f"perplexity @{self.settings.get('context')} (held-out)",
                 "student": self.perplexity.get("student"), "teacher": self.perplexity.get("teacher"),
                 "ratio": self.perplexity.get("ratio")}]
        if self.agreement:
            rows.append({"metric": "top-1 agreement (teacher-forced)", "student": self.agreement.get("top1")})
            rows.append({"metric": "KL(teacher‖student) per token", "student": self.agreement.get("kl")})
            if "generation" in self.agreement:
                rows.append({"metric": "greedy generation agreement", "student": self.agreement["generation"]})
        if self.mqar:
            rows.append({"metric": f"MQAR accuracy ({self.mqar.get('n_pairs')} pairs)",
                         "student": self.mqar.get("student"), "teacher": self.mqar.get("teacher")})
        for i, depth in enumerate(self.niah.get("depths", [])):
            rows.append({"metric": f"needle @ depth {depth:.2f} ({self.niah.get('context')} tok)",
                         "student": self.niah["student"][i],
                         "teacher": self.niah["teacher"][i] if self.niah.get("teacher") else None})
        return rows

    def __str__(self) -> str:
        return "evaluation\n" + format_table(["metric", "student", "teacher", "ratio"], self.rows())

    def to_markdown(self) -> str:
        def cell(v: Any) -> str:
            return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

        lines = ["| metric | student | teacher | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['metric']} | {cell(r.get('student'))} | {cell(r.get('teacher'))} | {cell(r.get('ratio'))} |"
                  for r in self.rows()]
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path, name: str = "eval") -> dict[str, str]:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(self.to_dict(), indent=2))
        (out / f"{name}.md").write_text(self.to_markdown())
        return {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md")}


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(_device(model)), use_cache=False).logits.float().cpu()


def _eval_mode(models: list[nn.Module]):
    class _Ctx:
        def __enter__(self):
            self.modes = [m.training for m in models]
            for m in models:
                m.eval()

        def __exit__(self, *exc):
            for m, t in zip(models, self.modes):
                m.train(t)
    return _Ctx()


def held_out_windows(tokenizer: Any, context: int, n_windows: int, data: Any = None) -> torch.Tensor:
    """``n_windows`` windows of ``context`` tokens of held-out text (default: pydoc's held-out topics).

    Asking for more windows than the text holds is an error that says how many there are (never fewer
    windows silently).
    """
    for name, value in (("context", context), ("n_windows", n_windows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"held_out_windows: {name} must be an int >= 1, got {value!r}")
    if data is None or (isinstance(data, str) and data == "pydoc"):
        if tokenizer is None:
            raise ConfigError("evaluation on the held-out pydoc text needs tokenizer=...; or pass data= token ids")
        ids = pack(pydoc_texts("held_out"), context, tokenizer, what="held-out pydoc text")
    elif isinstance(data, torch.Tensor) and data.dim() == 2 and data.shape[1] == context:
        ids = data
    else:
        ids = pack(data, context, tokenizer, what="evaluation data")
    if n_windows > ids.shape[0]:
        source = "the held-out pydoc text" if data is None or isinstance(data, str) else "the evaluation data"
        raise ConfigError(f"held_out_windows: {n_windows} windows of {context} tokens asked for, but {source} holds "
                          f"{ids.shape[0]}; ask for at most {ids.shape[0]}, use a shorter context, or pass more text")
    return ids[:n_windows]


@torch.no_grad()
def perplexity_and_agreement(student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor
                             ) -> tuple[dict[str, Any], dict[str, Any]]:
    nll = {"student": 0.0, "teacher": 0.0}
    agree, kl, count = 0, 0.0, 0
    for row in windows:
        ids = row[None]
        target = ids[:, 1:]
        s = _logits(student, ids)[:, :-1]
        nll["student"] += float(F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1), reduction="sum"))
        if teacher is not None:
            t = _logits(teacher, ids)[:, :-1]
            if t.shape[-1] != s.shape[-1]:
                raise ConfigError(f"teacher vocabulary ({t.shape[-1]}) differs from the student's ({s.shape[-1]})")
            nll["teacher"] += float(F.cross_entropy(t.reshape(-1, t.shape[-1]), target.reshape(-1), reduction="sum"))
            agree += int((s.argmax(-1) == t.argmax(-1)).sum())
            lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
            kl += float((lt.exp() * (lt - ls)).sum())
        count += target.numel()
    ppl = {"student": math.exp(nll["student"] / count), "tokens": count}
    agreement: dict[str, Any] = {}
    if teacher is not None:
        ppl["teacher"] = math.exp(nll["teacher"] / count)
        ppl["ratio"] = round(ppl["student"] / ppl["teacher"], 6)
        agreement = {"top1": agree / count, "kl": kl / count}
    return ppl, agreement


@torch.no_grad()
def generation_agreement(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, prompt_len: int = 64,
                         new_tokens: int = 24, n_prompts: int = 2) -> float:
    """Fraction of identical tokens between student and teacher greedy continuations of held-out prompts."""
    same, total = 0, 0
    for row in windows[:n_prompts]:
        ids = row[None, :prompt_len]
        outs = []
        for m in (student, teacher):
            g = m.generate(input_ids=ids.to(_device(m)), attention_mask=torch.ones_like(ids).to(_device(m)),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
            outs.append(g[0, prompt_len:].cpu())
        n = min(len(outs[0]), len(outs[1]))
        same += int((outs[0][:n] == outs[1][:n]).sum())
        total += n
    return same / max(total, 1)


def exact_continuation(model: nn.Module, ids: torch.Tensor, answer_start: int) -> bool:
    """Teacher-forced greedy: every answer token (from ``answer_start``) is the argmax of the previous position."""
    logits = _logits(model, ids[None])[0]
    pred = logits[answer_start - 1:-1].argmax(-1)
    return bool((pred == ids[answer_start:]).all())


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_mqar_trials(tokenizer: Any, vocab: int, n_pairs: int, n_trials: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    rng = random.Random(seed)
    trials = []
    for _ in range(n_trials):
        if tokenizer is not None:
            keys = rng.sample(KEYS, n_pairs)
            values = [str(rng.randint(1000, 9999)) for _ in keys]
            body = "Memorize these codes.\n" + "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
            j = rng.randrange(n_pairs)
            prefix = _encode(tokenizer, body + f"\nThe code for {keys[j]} is")
            answer = _encode(tokenizer, f" {values[j]}")
            trials.append((torch.tensor(prefix + answer), len(prefix)))
        else:
            half = max(2, vocab // 2)
            keys = rng.sample(range(1, half), n_pairs)
            values = [rng.randrange(half, vocab) for _ in keys]
            seq = [t for kv in zip(keys, values) for t in kv]
            j = rng.randrange(n_pairs)
            seq += [keys[j], values[j]]
            trials.append((torch.tensor(seq), len(seq) - 1))
    return trials


def make_niah_trials(tokenizer: Any, haystack: torch.Tensor, context: int, depths: list[float], n_trials: int, seed: int,
                vocab: int) -> list[list[tuple[torch.Tensor, int]]]:
    rng = random.Random(seed + 1)
    per_depth = []
    for depth in depths:
        trials = []
        for t in range(n_trials):
            key = str(rng.randint(10000, 99999))
            if tokenizer is not None:
                needle = _encode(tokenizer, f"\nThe secret passkey is {key}. Remember it.\n")
                question = _encode(tokenizer, "\nWhat is the secret passkey? The secret passkey is")
                answer = _encode(tokenizer, f" {key}")
            else:
                a = [rng.randrange(vocab) for _ in range(3)]
                needle, question, answer = [1, 2] + a, [1, 2], a
            fill = context - len(needle) - len(question) - len(answer)
            if fill < 1:
                raise ConfigError(f"niah_context={context} is too short for the needle and question")
            flat = haystack.reshape(-1)
            start = (t * 997) % max(1, flat.numel() - fill)
            hay = flat[start:start + fill].tolist()
            at = int(round(depth * len(hay)))
            seq = hay[:at] + needle + hay[at:] + question
            trials.append((torch.tensor(seq + answer), len(seq)))
        per_depth.append(trials)
    return per_depth


def evaluate(model: nn.Module, tokenizer: Any = None, *, teacher: nn.Module | None = None, data: Any = "pydoc",
             context: int = 1024, n_windows: int = 8, generation: bool = True, probes: bool = True,
             mqar_pairs: int = 8, mqar_trials: int = 16, niah_context: int = 1024,
             niah_depths: tuple[float, ...] | list[float] = (0.0, 0.25, 0.5, 0.75, 1.0), niah_trials: int = 2,
             seed: int = 0, out_dir: str | Path | None = None) -> EvalResult:
    """Evaluate ``model`` (the student) on held-out text and recall probes, side by side with ``teacher``.

    ``data``: ``"pydoc"`` (held-out topics; needs ``tokenizer``), texts, or a ``(n, context)`` id tensor.
    ``teacher=None`` reports the student alone. Writes ``eval.json`` + ``eval.md`` under ``out_dir``.
    """
    models = [model] + ([teacher] if teacher is not None else [])
    vocab = model.get_output_embeddings().out_features if hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None else model.config.vocab_size
    result = EvalResult(settings={"context": context, "n_windows": n_windows, "seed": seed})
    with _eval_mode(models):
        windows = held_out_windows(tokenizer, context, n_windows, data)
        if windows.shape[0] == 0:
            raise ConfigError("no evaluation window: the evaluation data is shorter than one context")
        result.settings["n_windows"] = int(windows.shape[0])
        result.perplexity, result.agreement = perplexity_and_agreement(model, teacher, windows)
        if generation and teacher is not None:
            result.agreement["generation"] = generation_agreement(model, teacher, windows,
                                                                  prompt_len=min(64, context // 2))
        if probes:
            trials = make_mqar_trials(tokenizer, vocab, mqar_pairs, mqar_trials, seed)
            result.mqar = {"n_pairs": mqar_pairs, "trials": mqar_trials}
            for role, m in zip(("student", "teacher"), models):
                result.mqar[role] = sum(exact_continuation(m, ids, a) for ids, a in trials) / len(trials)
            haystack = windows if tokenizer is None else held_out_windows(tokenizer, context, n_windows, data)
            per_depth = make_niah_trials(tokenizer, haystack, niah_context, list(niah_depths), niah_trials, seed, vocab)
            result.niah = {"context": niah_context, "depths": list(niah_depths), "trials": niah_trials}
            for role, m in zip(("student", "teacher"), models):
                result.niah[role] = [sum(exact_continuation(m, ids, a) for ids, a in trials) / len(trials)
                                     for trials in per_depth]
    if out_dir is not None:
        result.save(out_dir)
    return result


__all__ = ["evaluate", "EvalResult"]
