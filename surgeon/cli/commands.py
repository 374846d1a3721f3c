"""The ``surgeon`` command line; it mirrors the Python API.

    surgeon apply  --model efficientnet_lite0 --pass LinearizeReLU --config '{"granularity": "channel"}' --out out/s
    surgeon export out/s --out out/onnx
    surgeon verify out/onnx --model out/s          # exit status 1 when parity fails
    surgeon report out/s
    surgeon demo

Exit status: 0 done; 1 a check failed (``verify`` parity, a demo's check); 2 an input error, with a
message naming the option or file to change (never a traceback).

Example:
    >>> main(["report", "--help"])  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

import surgeon
import surgeon.export
from surgeon.core.argtypes import fraction, non_negative_float, non_negative_int, one_of, positive_int, shape
from surgeon.core.errors import ConfigError, SurgeonError
from surgeon.models.registry import BUILTIN, load_surgery, resolve
from surgeon.core.handler import config_class
from surgeon.core.persist import REPORT_FILE, load_recipe
from surgeon.core.report import ReportGroup
from surgeon.export.manifest import ORT_LEVELS


def _build_passes(names: list[str], configs: list[str]) -> list[surgeon.PassConfig]:
    if len(configs) > len(names):
        raise ConfigError(f"{len(configs)} --config values for {len(names)} --pass values; give one per pass")
    passes = []
    for i, name in enumerate(names):
        raw = configs[i] if i < len(configs) else "{}"
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config for {name} is not valid JSON ({e.msg} at column {e.colno}): {raw}") from e
        passes.append(config_class(name).from_dict(data))
    return passes


def _example_inputs(model_name: str, shape: tuple[int, ...] | None) -> tuple[torch.Tensor, ...] | None:
    spec = resolve(model_name)
    if shape is not None:
        return (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)
    return spec.example_inputs() if spec.example_inputs else None


def cmd_apply(args: argparse.Namespace) -> int:
    spec = resolve(args.model)
    passes = _build_passes(args.pass_names, args.configs or [])
    surgery = surgeon.apply(spec.build().eval(), *passes, example_inputs=_example_inputs(args.model, args.example_shape))
    surgery.recipe.source = {"model": args.model}
    surgeon.save(surgery, args.out)
    print(surgery.report)
    print(f"\nsaved to {args.out}/ (recipe.json, model.safetensors, report.json)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    model, example = load_surgery(args.surgery)
    if args.example_shape is not None:
        example = (torch.randn(args.example_shape),)
    # linearized causal LMs export prefill + decode graphs and need no example input
    ort_optimize = False if args.ort_optimize is None else {
        "levels": args.ort_optimize or None, "threads": args.ort_threads}
    result = surgeon.export.to_onnx(model, args.out, example, recipe=load_recipe(args.surgery).to_dict(),
                                    overwrite=args.overwrite, ort_optimize=ort_optimize,
                                    save_optimized=args.save_optimized or False)
    print(result)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    target = Path(args.model)
    if target.is_dir():
        model, _ = load_surgery(target)
    else:
        model = resolve(args.model).build().eval()
    report = surgeon.export.verify(args.onnx, model, atol=args.atol, rtol=args.rtol, raise_on_failure=False,
                                   ort_level=args.ort_level)
    print(report)
    if args.json:
        report.save(args.json)
    recorded = surgeon.export.load_manifest(args.onnx).onnxruntime.get("optimization")
    if args.ort_levels or args.record_level:
        levels = surgeon.export.optimize(args.onnx, model, record=args.record_level, threads=args.ort_threads)
        print(f"\n{levels}")
    elif recorded:
        from surgeon.export.ort_optimize import OptimizeReport

        print(f"\n{OptimizeReport.from_dict(recorded)} (recorded at export; --ort-levels measures again)")
    if not report.passed:
        print("\nverification FAILED", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if getattr(args, "linearity", None):
        from surgeon.passes.linear_blocks.handler import linearity_report_for

        report = linearity_report_for(args.linearity, args.chunks, args.seq_len, args.plot)
        print(report)
        if args.json:
            report.save(args.json)
        return 0
    if args.directory is None:
        raise ConfigError("surgeon report needs a saved-surgery directory, or --linearity MODEL")
    directory = Path(args.directory)
    if (directory / REPORT_FILE).is_file():
        print(ReportGroup.from_dict(json.loads((directory / REPORT_FILE).read_text())))
        print()
        print(surgeon.core.persist.recipe_summary(directory))
        from surgeon.costs.transformer_private import attention_costs_for_surgery  # issue 28: private costs

        private = attention_costs_for_surgery(directory)
        if private is not None:
            print(f"\n{private}")
        return 0
    if (directory / "verify.json").is_file():
        print((directory / "verify.json").read_text())
        return 0
    raise ConfigError(f"{directory} holds neither a saved surgery ({REPORT_FILE}) nor a verify.json")


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "efficientnet_lite0":
        from surgeon.cli.demo import run_demo

        result = run_demo(args.out, min_fraction=args.min_fraction, results=args.results)
        return 0 if result["verify"]["passed"] else 1
    from surgeon.cli.demo_llm import run_llm_demo

    result = run_llm_demo(args.out, window=args.window, feature_map=args.feature_map, sinks=args.sinks,
                          feature_dim=args.feature_dim, distill_minutes=0.0 if args.no_distill else args.distill_minutes,
                          export=not args.no_export)
    return 0 if result["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon", description="Model surgery for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("apply", help="apply passes to a model and save the surgery")
    p.add_argument("--model", required=True, help=f"built-in {sorted(BUILTIN)} or package.module:factory")
    p.add_argument("--pass", dest="pass_names", action="append", required=True, help="pass name (repeatable)")
    p.add_argument("--config", dest="configs", action="append", help="JSON config, one per --pass, in order")
    p.add_argument("--example-shape", type=shape, help="example input shape, e.g. 2,3,224,224")
    p.add_argument("--out", required=True, help="directory for recipe.json + model.safetensors")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("export", help="export a saved surgery to ONNX")
    p.add_argument("surgery", help="directory written by `surgeon apply` / surgeon.save")
    p.add_argument("--out", required=True, help="ONNX output directory")
    p.add_argument("--example-shape", type=shape)
    p.add_argument("--overwrite", action="store_true", help="replace an export of a different model in --out")
    p.add_argument("--ort-optimize", nargs="*", metavar="LEVEL", type=one_of(ORT_LEVELS, "onnxruntime level"),
                   help="check onnxruntime graph optimization levels (default: all of disabled basic extended "
                        "layout all) for parity and speed; record the fastest that keeps parity in the manifest")
    p.add_argument("--save-optimized", nargs="?", const=True, metavar="LEVEL",
                   type=one_of(ORT_LEVELS, "onnxruntime level"),
                   help="also save the onnxruntime-optimized graphs (<graph>.ort-LEVEL.onnx; default level "
                        "extended: 'layout'/'all' may hold hardware-specific fused ops)")
    p.add_argument("--ort-threads", type=positive_int, help="onnxruntime threads for the level timings")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check an ONNX export against PyTorch in onnxruntime")
    p.add_argument("onnx", help="ONNX export directory (with manifest.json)")
    p.add_argument("--model", required=True, help="saved surgery directory or a model name")
    p.add_argument("--atol", type=non_negative_float, default=None,
                   help="explicit element bound |ort - torch| <= atol + rtol*|torch|, used exactly (default: "
                        "surgeon.export.DEFAULT_CRITERION, a bound scaled to each output + SNR + token checks)")
    p.add_argument("--rtol", type=non_negative_float, default=None, help="see --atol")
    p.add_argument("--json", help="write the verification report here (JSON; LM exports also write a .md beside it)")
    p.add_argument("--ort-level", type=one_of(ORT_LEVELS, "onnxruntime level"), help="onnxruntime graph optimization level for the check (default: the manifest's)")
    p.add_argument("--ort-levels", action="store_true",
                   help="also check every onnxruntime graph optimization level (parity vs PyTorch, latency)")
    p.add_argument("--record-level", action="store_true",
                   help="with --ort-levels: record the fastest level that keeps parity in the manifest")
    p.add_argument("--ort-threads", type=positive_int, help="onnxruntime threads for the level timings")
    p.set_defaults(func=cmd_verify)

    from surgeon.distill.cli import add_parser as add_distill_parser  # accelerate/peft load only when run

    add_distill_parser(sub)

    from surgeon.cli.clients import add_parser as add_clients_parser

    add_clients_parser(sub)

    p = sub.add_parser("report", help="print the report of a saved surgery (or --linearity MODEL: per-block linearity)")
    p.add_argument("directory", nargs="?")
    p.add_argument("--linearity", metavar="MODEL", help="print (and --plot) the R² of each block's best linear map")
    p.add_argument("--chunks", type=positive_int, default=16, help="--linearity: calibration sequences")
    p.add_argument("--seq-len", type=positive_int, default=128, help="--linearity: tokens per sequence")
    p.add_argument("--plot", help="--linearity: write a PNG here")
    p.add_argument("--json", help="--linearity: write the report as JSON here")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="SmolLM2-135M: linearize attention, report, generate before/after "
                                    "(--model efficientnet_lite0: the ReLU pipeline to a verified ONNX graph)")
    p.add_argument("--model", choices=["smollm2", "efficientnet_lite0"], default="smollm2")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--window", type=non_negative_int, default=128, help="smollm2: softmax window of the hybrid attention")
    p.add_argument("--feature-dim", type=positive_int, default=16, help="smollm2: hedgehog features per head (×2)")
    p.add_argument("--feature-map", default="hedgehog", choices=["elu1", "relu", "hedgehog", "taylor2"])
    p.add_argument("--sinks", type=non_negative_int, default=4, help="smollm2: attention-sink tokens kept as exact softmax")
    p.add_argument("--distill-minutes", type=non_negative_float, default=8.0,
                   help="smollm2: budget of the quick distillation (attention transfer + LoRA), ppl before/after")
    p.add_argument("--no-distill", action="store_true", help="smollm2: skip the distillation step (fast demo)")
    p.add_argument("--no-export", action="store_true",
                   help="smollm2: skip ONNX export + onnxruntime verification and generation (saves minutes)")
    p.add_argument("--min-fraction", type=fraction, default=0.95,
                   help="efficientnet_lite0: linearize channels whose ReLU6 is linear on at least this fraction "
                        "of calibration data")
    p.add_argument("--results", metavar="JSON",
                   help="efficientnet_lite0: also write the result with its provenance here "
                        "(benchmarks/results/demo_efficientnet.json)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb. Exit status: 0 done, 1 a check failed (parity, demo), 2 an input error (the message says
    which option or file to change; argparse's own errors exit 2 too)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                 # argparse: --help (0) or a bad option value (2), message printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except SurgeonError as e:
        print(f"surgeon {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
