"""``surgeon distill``: distil a saved linearized surgery (and optionally evaluate it against its base model).

    surgeon apply --model smollm2 --pass LinearizeAttention --config '{"window": 64}' --out out/s
    surgeon distill out/s --out out/d --transfer-steps 100 --lora-steps 200 --eval
    surgeon distill out/s --out out/d --resume          # continue from out/d/checkpoints

Writes ``distilled.safetensors`` (the full state dict, adapters merged), ``distill.json``, loss
curves (JSON + PNG) and, with ``--eval``, ``eval.json`` + ``eval.md``. Reload with
``surgeon.restore(base, "out/s")`` then ``load_state_dict(safetensors.torch.load_file(...))``
(with ``--keep-softmax k`` first put those layers back with ``surgeon.distill.restore_softmax``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import safetensors.torch

from surgeon.core.argtypes import non_negative_int, positive_float, positive_int
from surgeon.core.errors import ConfigError
from surgeon.core.persist import load_recipe
from surgeon.distill.api import distill
from surgeon.distill.config import STAGE2_RECIPES, DistillConfig, stage2_fields
from surgeon.distill.evaluate import evaluate
from surgeon.models.registry import load_surgery, resolve
from surgeon.models.smollm2 import load_smollm2_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="attention transfer + LoRA distillation of a saved linearized surgery")
    p.add_argument("surgery", help="directory written by `surgeon apply` (a LinearizeAttention surgery)")
    p.add_argument("--out", required=True, help="output directory (model, curves, checkpoints, eval)")
    p.add_argument("--data", default="pydoc", help="'pydoc' (train topics), 'teacher', 'pydoc+teacher', or a "
                   ".txt file / folder of .txt files")
    p.add_argument("--config", default="{}", help="DistillConfig as JSON; the flags below override it")
    p.add_argument("--stages", choices=["both", "transfer", "lora"], default=None)
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--transfer-steps", type=non_negative_int)
    p.add_argument("--transfer-mode", choices=["layer", "block", "joint"])
    p.add_argument("--lora-steps", type=non_negative_int)
    p.add_argument("--stage2", choices=STAGE2_RECIPES,
                   help="what stage 2 trains: LoRA adapters (default) or only the linear branch (no original weight "
                        "changes, so prompts within the window stay exact)")
    p.add_argument("--keep-softmax", type=non_negative_int)
    p.add_argument("--mixed-precision", choices=["no", "bf16"])
    p.add_argument("--minutes", type=positive_float, help="wall-clock budget per stage")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--eval", action="store_true", help="evaluate against the base model (perplexity, probes)")
    p.add_argument("--eval-windows", type=positive_int, default=8)
    p.set_defaults(func=cmd_distill)


def _texts(path: Path) -> list[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def cmd_distill(args: argparse.Namespace) -> int:

    try:
        raw = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config is not valid JSON ({e.msg} at column {e.colno}): {args.config}") from e
    out = Path(args.out)
    overrides = {"seq_len": args.seq_len, "transfer_steps": args.transfer_steps, "transfer_mode": args.transfer_mode,
                 "lora_steps": args.lora_steps, "keep_softmax": args.keep_softmax,
                 "mixed_precision": args.mixed_precision, "max_minutes": args.minutes}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if args.stage2:
        raw.update(stage2_fields(args.stage2))
    if args.stages:
        raw["stages"] = ["transfer", "lora"] if args.stages == "both" else [args.stages]
    raw.setdefault("output_dir", str(out))
    raw.setdefault("checkpoint_dir", str(out / "checkpoints"))
    raw["resume"] = bool(args.resume or raw.get("resume", False))
    config = DistillConfig.from_dict(raw)

    model, _ = load_surgery(args.surgery)
    name = (load_recipe(args.surgery).source or {}).get("model")
    tokenizer = None
    if name == "smollm2":
        tokenizer = load_smollm2_tokenizer()
    data = args.data
    if data not in ("pydoc", "teacher", "pydoc+teacher"):
        path = Path(data)
        if not path.exists():
            raise ConfigError(f"--data {data!r}: not a built-in source ('pydoc', 'teacher', 'pydoc+teacher') and no "
                              "such file or folder")
        data = _texts(path)
    result = distill(model, data=data, config=config, tokenizer=tokenizer)
    print(result.report)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(result.model, str(out / "distilled.safetensors"))
    if args.eval:
        teacher = resolve(name).build().eval() if name else None
        ev = evaluate(result.model, tokenizer, teacher=teacher, n_windows=args.eval_windows, out_dir=out)
        print()
        print(ev)
    print(f"\nwrote {out}/distilled.safetensors, distill.json, loss_curves.png")
    return 0


__all__ = ["add_parser", "cmd_distill"]
