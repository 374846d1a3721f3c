"""The end-to-end demo on the embedded default model (EfficientNet-Lite0 with its ImageNet weights).

load → LinearizeReLU (channel masks, exact at init) → calibrate: linearize the channels whose ReLU6
is already linear on the *calibration* photos → FinalizeReLU → save → ONNX export → onnxruntime
verification → top-1 agreement with the original on *held-out* photos, never used for calibration.

scikit-image ships nine RGB photos; they are split once, by name: :data:`CALIBRATION_PHOTOS` (each
photo's center crop, its flip and 16 corner crops at two other scales) choose the channels;
:data:`HELD_OUT_PHOTOS` (the same 18 views each) only score the result.

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
from surgeon.core.errors import ConfigError
from surgeon.core.provenance import provenance
from surgeon.models import IMAGENET_EXPECTED, efficientnet_lite0, held_out_views, imagenet_batch
from surgeon.passes import FinalizeReLU, LinearizeReLU, linearize_near_linear

DEMO_IMAGES = ("chelsea", "coffee")          # held out; their classes are known (tabby cat, espresso)
CALIBRATION_PHOTOS = ("astronaut", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                      "immunohistochemistry")   # the stereo pair stays on one side of the split
HELD_OUT_PHOTOS = ("chelsea", "coffee", "retina")
assert not set(CALIBRATION_PHOTOS) & set(HELD_OUT_PHOTOS)


def photo_views(names: tuple[str, ...]) -> tuple[torch.Tensor, list[str]]:
    """Each photo's center crop and its flip, then 16 corner crops (two scales, flipped or not): 18 views."""
    center = imagenet_batch(names)
    corners, corner_labels = held_out_views(names)
    labels = [f"{n}/center" for n in names] + [f"{n}/center/flip" for n in names] + corner_labels
    return torch.cat([center, center.flip(-1), corners]), labels


def _top1(logits: torch.Tensor) -> list[dict[str, Any]]:
    probs = logits.softmax(-1)
    p, idx = probs.max(-1)
    return [{"image": n, "class": int(i), "prob": round(float(q), 4), "correct": int(i) in IMAGENET_EXPECTED[n]}
            for n, i, q in zip(DEMO_IMAGES, idx, p)]


def _held_out_agreement(labels: list[str], original: torch.Tensor, linearized: torch.Tensor) -> dict[str, Any]:
    """Top-1 agreement of the linearized model with the original on held-out views: all, and per photo."""
    photos = sorted({label.split("/")[0] for label in labels}, key=[lab.split("/")[0] for lab in labels].index)
    same = (original == linearized).tolist()
    known = [i for i, lab in enumerate(labels) if lab.split("/")[0] in IMAGENET_EXPECTED]
    return {"photos": photos, "views": len(labels), "agreeing_views": int(sum(same)),
            "agreement": sum(same) / len(labels),
            "per_photo": {p: sum(s for s, lab in zip(same, labels) if lab.startswith(p + "/")) /
                          sum(lab.startswith(p + "/") for lab in labels) for p in photos},
            "original_correct": sum(int(original[i]) in IMAGENET_EXPECTED[labels[i].split("/")[0]] for i in known)
            / max(len(known), 1),
            "linearized_correct": sum(int(linearized[i]) in IMAGENET_EXPECTED[labels[i].split("/")[0]] for i in known)
            / max(len(known), 1),
            "correct_counted_on": sorted({labels[i].split("/")[0] for i in known}),
            "disagreements": [lab for lab, s in zip(labels, same) if not s]}


def run_demo(out_dir: str | Path = "out/demo", min_fraction: float = 0.95, show: bool = True,
             results: str | Path | None = None) -> dict[str, Any]:
    """Run the whole pipeline, write everything under ``out_dir`` and return a JSON-able summary.

    ``results``: also write the summary there with a ``provenance`` object (as
    ``benchmarks/results/demo_efficientnet.json``).
    """
    if not (isinstance(min_fraction, (int, float)) and 0 < min_fraction <= 1):
        raise ConfigError(f"min_fraction must be in (0, 1] (the share of calibration data on which a channel's "
                          f"ReLU6 must be linear), got {min_fraction!r}")
    out = Path(out_dir)
    steps = tqdm(total=7, desc="surgeon demo", unit="step", disable=not show)
    log = (lambda msg: tqdm.write(msg)) if show else (lambda msg: None)

    steps.set_postfix_str("load EfficientNet-Lite0")
    model = efficientnet_lite0(pretrained=True)
    images = imagenet_batch(DEMO_IMAGES)
    calibration, _ = photo_views(CALIBRATION_PHOTOS)
    views, view_labels = photo_views(HELD_OUT_PHOTOS)      # photos never used for calibration
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
    zeroed = linearize_near_linear(surgery.model, list(calibration.split(36)), min_fraction)
    steps.update()

    steps.set_postfix_str("FinalizeReLU")
    surgery = surgeon.apply(surgery, FinalizeReLU())
    surgery.recipe.source = {"model": "efficientnet_lite0"}
    with torch.no_grad():
        final = surgery.model(images)
        final_views = surgery.model(views).argmax(-1)
    held_out = _held_out_agreement(view_labels, original_views, final_views)
    log(f"held-out photos {', '.join(HELD_OUT_PHOTOS)} (never calibrated on; {len(view_labels)} views): top-1 "
        f"agreement with the original {held_out['agreement']:.1%} ({held_out['agreeing_views']}/{len(view_labels)})")
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
        "min_fraction": min_fraction,
        "calibration_photos": list(CALIBRATION_PHOTOS),
        "calibration_views": int(calibration.shape[0]),
        "held_out": held_out,
        "export_seconds": round(exported.seconds, 1),
        "verify": {"passed": check.passed, "max_abs": check.max_abs},
        "out_dir": str(out),
    }
    result["provenance"] = provenance(counts={"calibration_photos": len(CALIBRATION_PHOTOS),
                                              "calibration_views": int(calibration.shape[0]),
                                              "held_out_photos": len(HELD_OUT_PHOTOS), "held_out_views": len(view_labels)})
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    if results is not None:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        Path(results).write_text(json.dumps({**result, "out_dir": None}, indent=2) + "\n")
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
        print(f"calibration photos: {', '.join(CALIBRATION_PHOTOS)} ({result['calibration_views']} views)")
        print(f"held-out photos:    {', '.join(HELD_OUT_PHOTOS)} ({held_out['views']} views, never calibrated on): "
              f"top-1 agreement with the original {held_out['agreement']:.1%} "
              f"({held_out['agreeing_views']}/{held_out['views']}; per photo "
              + ", ".join(f"{p} {a:.0%}" for p, a in held_out["per_photo"].items()) + ")")
        print(f"onnxruntime parity: {'PASSED' if check.passed else 'FAILED'} (max abs {check.max_abs:.2e}); "
              f"outputs in {out}/")
    return result
