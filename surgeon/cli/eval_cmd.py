"""``surgeon eval``: lm-evaluation-harness on a saved surgery through every route, side by side.

    surgeon eval out/s --out out/eval [--routes original,surgered,hf,onnx] [--tasks surgeon_pydoc_ppl,...]

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="surgeon")
    >>> add_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["eval", "out/s", "--out", "out/e", "--limit", "5"]).routes
    'original,surgered,hf,onnx'
"""
from __future__ import annotations

import argparse
from pathlib import Path

from surgeon.core.argtypes import positive_int
from surgeon.core.errors import ConfigError

DEFAULT_TASKS = "surgeon_pydoc_ppl,surgeon_python_mc,surgeon_python_gen"


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from surgeon.eval import evaluate, routes_for
    from surgeon.eval.routes import require_lm_eval
    from surgeon.core.persist import load_recipe
    from surgeon.models.registry import load_surgery, resolve

    require_lm_eval()                                      # the install hint before any model loads
    recipe = load_recipe(args.surgery)
    source = (recipe.source or {}).get("model")
    model, _ = load_surgery(args.surgery)
    if not hasattr(model, "generate"):
        raise ConfigError(f"{args.surgery} holds a {type(model).__name__}, not a causal LM: lm-eval evaluates "
                          "language models")
    tokenizer = _tokenizer(args.tokenizer, source)
    names = _split(args.routes)
    original = resolve(source).build().eval() if "original" in names else None
    routes = routes_for(names, surgered=model, original=original, tokenizer=tokenizer, recipe=recipe,
                        work_dir=Path(args.out) / "models")
    report = evaluate(routes, _split(args.tasks), tokenizer, limit=args.limit, max_length=args.max_length,
                      batch_size=args.batch_size, include_path=args.include_path or ())
    js, md = report.save(args.out)
    print(report.to_markdown())
    print(f"wrote {js} and {md}")
    return 0


def _tokenizer(folder: str | None, source: str | None):
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    if source == "smollm2":
        from surgeon.models.smollm2 import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    raise ConfigError(f"no tokenizer for base model {source!r}: pass --tokenizer <folder with the tokenizer>")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="lm-evaluation-harness on the original, surgered, HF-folder and ONNX routes "
                                    "(offline local tasks by default); JSON + markdown side by side")
    p.add_argument("surgery", help="directory written by `surgeon apply` / surgeon.save")
    p.add_argument("--out", required=True, help="folder for eval.json, eval.md and the exported models (models/)")
    p.add_argument("--routes", default="original,surgered,hf,onnx",
                   help="comma list of original, surgered, hf, onnx (onnxruntime-genai), onnxruntime (prefill.onnx; "
                        "log-likelihood tasks only)")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help="comma list: local tasks (surgeon_pydoc_ppl, surgeon_python_mc, surgeon_python_gen) or "
                        "standard lm-eval task names whose data you have")
    p.add_argument("--limit", type=positive_int, help="documents per task (default: all)")
    p.add_argument("--max-length", type=positive_int, default=2048, help="context of every route (perplexity windows)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size of the in-memory / hf routes")
    p.add_argument("--include-path", action="append", help="extra folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the built-in model's own)")
    p.set_defaults(func=cmd_eval)
