"""``surgeon export-hf``: a saved surgery as a standard Hugging Face folder (``surgeon.export.to_hf``).

    surgeon export-hf out/s --out out/hf [--overwrite]

Also registers ``surgeon eval`` (:mod:`surgeon.cli.eval_cmd`).

Example:
    >>> p = build_parser_for_test()
    >>> p.parse_args(["export-hf", "out/s", "--out", "out/hf"]).out
    'out/hf'
"""
from __future__ import annotations

import argparse

from surgeon.core.errors import ConfigError


def cmd_export_hf(args: argparse.Namespace) -> int:
    import surgeon.export
    from surgeon.cli.commands import load_surgery
    from surgeon.core.persist import load_recipe

    model, _ = load_surgery(args.surgery)
    recipe = load_recipe(args.surgery)
    tokenizer = None
    if (recipe.source or {}).get("model") == "smollm2":
        from surgeon.models.smollm2 import load_smollm2_tokenizer

        tokenizer = load_smollm2_tokenizer()
    if not hasattr(model, "generate"):
        raise ConfigError(f"{args.surgery} holds a {type(model).__name__}, not a causal LM; export it with "
                          "`surgeon export` (ONNX) instead")
    path = surgeon.export.to_hf(model, args.out, tokenizer, recipe=recipe, overwrite=args.overwrite)
    print(f"wrote {path}: AutoModelForCausalLM.from_pretrained({str(path)!r}) loads the rewritten model "
          "(trust_remote_code=True where surgeon is not imported)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a saved surgery as a Hugging Face folder (AutoModelForCausalLM "
                                         "loads the rewritten model)")
    p.add_argument("surgery", help="directory written by `surgeon apply` / surgeon.save")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, modeling files)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder that holds another model")
    p.set_defaults(func=cmd_export_hf)

    from surgeon.cli.eval_cmd import add_parser as add_eval_parser

    add_eval_parser(sub)


def build_parser_for_test() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser
