"""ReLU linearization on EfficientNet-Lite0: ReLU budget vs. accuracy proxy vs. onnxruntime latency.

For each calibration threshold, the ReLU6 channels that are linear on at least that fraction of the
calibration photos (and their mirror images) are linearized and the model is finalized, exported
and timed in onnxruntime. Agreement is measured on held-out views (crops the calibration never saw).

    python benchmarks/relu_linearization.py [--thresholds 1.0 0.99 0.95 0.9 0.8] [--out benchmarks/results]

Prints a table and writes ``relu_linearization.json`` and ``relu_linearization.png``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import surgeon
import surgeon.export
from surgeon.models import efficientnet_lite0, imagenet_batch
from surgeon.passes import FinalizeReLU, LinearizeReLU, linearize_near_linear
from surgeon.core.report import Report
from surgeon.core.provenance import provenance

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


def held_out_views(photos: torch.Tensor) -> torch.Tensor:
    """Zoomed centre crops resized back to 224: views the calibration never saw."""
    crop = photos[..., 28:196, 28:196]
    return F.interpolate(crop, size=photos.shape[-2:], mode="bilinear", align_corners=False)


def measure(threshold: float, base: torch.nn.Module, calibration: list[torch.Tensor], held_out: torch.Tensor,
            reference: torch.Tensor, workdir: Path) -> dict:
    s = surgeon.apply(base, LinearizeReLU(granularity="channel"), example_inputs=(calibration[0][:2],))
    zeroed = linearize_near_linear(s.model, calibration, threshold) if threshold <= 1.0 else {}
    f = surgeon.apply(s, FinalizeReLU())
    with torch.no_grad():
        logits = f.model(held_out)
    summary = {r["metric"]: r for r in f.report["model (per example)"].rows}
    out = workdir / f"t{threshold}"
    surgeon.export.to_onnx(f.model, out, (calibration[0][:2],))
    check = surgeon.export.verify(out, f.model, [(held_out[:1],), (held_out,)], atol=1e-4, rtol=1e-4,
                                  repeats=10, raise_on_failure=False)
    kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    return {
        "min_fraction": threshold,
        "channels_linearized": int(sum(zeroed.values())),
        "relu_count": summary["relu_count"]["after"],
        "relu_sites": summary["relu_sites"]["after"],
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "kl_to_original": float(kl),
        "ort_ms_batch1": check.rows[0].ort_ms,
        "torch_ms_batch1": check.rows[0].torch_ms,
        "ort_parity_max_abs": check.max_abs,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    relus = [r["relu_count"] / 1e6 for r in rows]
    ax.plot(relus, [r["kl_to_original"] for r in rows], "o-")
    for r, x in zip(rows, relus):
        ax.annotate(f"{r['min_fraction']:g}", (x, r["kl_to_original"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("ReLU count per image (millions)")
    ax.set_ylabel("KL(original ‖ linearized), held-out views")
    ax.set_title("EfficientNet-Lite0: ReLU budget vs. distortion")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.01, 1.0, 0.99, 0.95, 0.9, 0.8, 0.7])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    base = efficientnet_lite0(pretrained=True).eval()
    photos = imagenet_batch(PHOTOS)
    calibration = [photos, photos.flip(-1)]
    held_out = held_out_views(photos)
    with torch.no_grad():
        reference = base(held_out)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in tqdm(args.thresholds, desc="thresholds", unit="setting"):
            rows.append(measure(t, base, calibration, held_out, reference, Path(tmp)))

    table = Report("relu_linearization (EfficientNet-Lite0, 224x224; min_fraction 1.01 = nothing linearized)",
                   columns=list(rows[0]), rows=rows)
    print(table)
    (out / "relu_linearization.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows, "provenance": provenance(
        counts={"thresholds": args.thresholds, "calibration_photos": list(PHOTOS),
                "held_out_views": len(PHOTOS), "verify_repeats": 10})}, indent=2))
    plot(rows, out / "relu_linearization.png")
    print(f"\nwrote {out / 'relu_linearization.json'} and {out / 'relu_linearization.png'}")


if __name__ == "__main__":
    main()
