"""The end-to-end demo on the embedded default model (EfficientNet-Lite0 with its ImageNet weights).

load → LinearizeReLU (channel masks, exact at init) → calibrate: linearize the channels whose ReLU6
is already linear on real photos → FinalizeReLU → save → ONNX export → onnxruntime verification.

Example:
    >>> from surgeon.cli.demo import run_demo
    >>> result = run_demo("/tmp/surgeon_demo", show=False)   # doctest: +SKIP
    >>> result["verify"]["passed"]                            # doctest: +SKIP
    True
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import surgeon
import surgeon.export
from surgeon.models import IMAGENET_EXPECTED, efficientnet_lite0, held_out_views, imagenet_batch
from surgeon.passes import FinalizeReLU, LinearizeReLU, linearize_near_linear

DEMO_IMAGES = ("chelsea", "coffee")
CALIBRATION_IMAGES = ("chelsea", "coffee", "rocket", "astronaut")


def _top1(logits: torch.Tensor) -> list[dict[str, Any]]:
    probs = logits.softmax(-1)
    p, idx = probs.max(-1)
    return [{"image": n, "class": int(i), "prob": round(float(q), 4), "correct": int(i) in IMAGENET_EXPECTED[n]}
            for n, i, q in zip(DEMO_IMAGES, idx, p)]


def _held_out_agreement(labels: list[str], original: torch.Tensor, linearized: torch.Tensor) -> dict[str, Any]:
    """Top-1 agreement of the linearized model with the original, and how often each is right, per view."""
    expected = [IMAGENET_EXPECTED[label.split("/")[0]] for label in labels]
    return {"views": len(labels), "agreement": float((original == linearized).float().mean()),
            "original_correct": sum(int(o) in e for o, e in zip(original, expected)) / len(labels),
            "linearized_correct": sum(int(f) in e for f, e in zip(linearized, expected)) / len(labels),
            "disagreements": [lab for lab, o, f in zip(labels, original, linearized) if o != f]}


def run_demo(out_dir: str | Path = "out/demo", min_fraction: float = 0.95, show: bool = True) -> dict[str, Any]:
    """Run the whole pipeline, write everything under ``out_dir`` and return a JSON-able summary."""
    out = Path(out_dir)
    steps = tqdm(total=7, desc="surgeon demo", unit="step", disable=not show)
    log = (lambda msg: tqdm.write(msg)) if show else (lambda msg: None)

    steps.set_postfix_str("load EfficientNet-Lite0")
    model = efficientnet_lite0(pretrained=True)
    images = imagenet_batch(DEMO_IMAGES)
    calibration = imagenet_batch(CALIBRATION_IMAGES)
    views, view_labels = held_out_views(DEMO_IMAGES)      # crops / scales never used for calibration
    with torch.no_grad():
        original = model(images)
        original_views = model(views).argmax(-1)
    steps.update()

    steps.set_postfix_str("LinearizeReLU")
    surgery = surgeon.apply(model, LinearizeReLU(granularity="channel"), example_inputs=(images,))
    with torch.no_grad():
        init_error = (surgery.model(images) - original).abs().max().item()
    log(f"mask init reproduces the original: max |Δlogit| = {init_error:.2e} over "
        f"{len(surgery.recipe.entries[0].sites)} ReLU6 call sites")
    steps.update()

    steps.set_postfix_str("calibrate")
    zeroed = linearize_near_linear(surgery.model, [calibration, calibration.flip(-1)], min_fraction)
    steps.update()

    steps.set_postfix_str("FinalizeReLU")
    surgery = surgeon.apply(surgery, FinalizeReLU())
    surgery.recipe.source = {"model": "efficientnet_lite0"}
    with torch.no_grad():
        final = surgery.model(images)
        final_views = surgery.model(views).argmax(-1)
    held_out = _held_out_agreement(view_labels, original_views, final_views)
    log(f"held-out views ({len(view_labels)} corner crops at two other scales + flips, never calibrated on): "
        f"top-1 agreement with the original {held_out['agreement']:.1%}; correct class: original "
        f"{held_out['original_correct']:.1%}, linearized {held_out['linearized_correct']:.1%}")
    steps.update()

    steps.set_postfix_str("save")
    surgeon.save(surgery, out / "surgery")
    steps.update()

    steps.set_postfix_str("export ONNX")
    exported = surgeon.export.to_onnx(surgery.model, out / "onnx", (images,), recipe=surgery.recipe.to_dict())
    steps.update()

    steps.set_postfix_str("verify in onnxruntime")
    check = surgeon.export.verify(out / "onnx", surgery.model, raise_on_failure=False)
    check.save(out / "verify.json")
    steps.update()
    steps.close()

    summary = {r["metric"]: r for r in surgery.report["model (per example)"].rows}
    result = {
        "sites": len(surgery.recipe.entries[0].sites),
        "mask_init_max_abs_error": init_error,
        "channels_linearized": sum(zeroed.values()),
        "relu_count_before": summary["relu_count"]["before"],
        "relu_count_after": summary["relu_count"]["after"],
        "top1_original": _top1(original),
        "top1_linearized": _top1(final),
        "held_out_views": held_out,
        "export_seconds": round(exported.seconds, 1),
        "verify": {"passed": check.passed, "max_abs": check.max_abs},
        "out_dir": str(out),
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    if show:
        print(surgery.report)
        print()
        print(check)
        print()
        before, after = result["relu_count_before"], result["relu_count_after"]
        print(f"ReLU count per image: {before:,} → {after:,} ({100 * (1 - after / before):.1f}% fewer); "
              f"{result['channels_linearized']} channels linearized (linear on ≥{min_fraction:.0%} of calibration data)")
        for o, f in zip(result["top1_original"], result["top1_linearized"]):
            print(f"  {o['image']:8s} original class {o['class']} (p={o['prob']:.3f})  →  "
                  f"linearized class {f['class']} (p={f['prob']:.3f})  {'ok' if f['correct'] else 'WRONG'}")
        print(f"onnxruntime parity: {'PASSED' if check.passed else 'FAILED'} (max abs {check.max_abs:.2e}); "
              f"outputs in {out}/")
    return result
