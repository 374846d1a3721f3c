"""ReLU budgets on real data: a ResNet-style CNN trained on scikit-learn's digits, then SNL / AutoReP /
calibration searches at 50/20/10/5/2 % of its ReLUs; an imbalanced split for the fairness check; and
EfficientNet-Lite0 (real ImageNet weights) through search + cost report + sparse-ReLU export.

    python benchmarks/relu_budget.py [--budgets 0.5 0.2 0.1 0.05 0.02] [--methods snl autorep calibration]
                                     [--skip-efficientnet] [--out benchmarks/results]

Prints tables and writes ``relu_budget.json`` and ``relu_budget.png`` (accuracy vs ReLU count and vs
estimated DELPHI online latency).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import surgeon
import surgeon.export
from surgeon.passes import BudgetSearchConfig, FinalizeReLU, LinearizeReLU, search_relu_budget
from surgeon.costs.private import private_costs
from surgeon.core.report import Report, group_accuracy


# ------------------------------------------------------------------------------------------- data / model


def digits_split(seed: int = 0, imbalanced: bool = False, minority=(3, 5, 8), keep: float = 0.15):
    """Fixed seeded split of sklearn's 1,797 digits: 2/3 train, 1/3 test (inputs scaled to [0, 1]).

    ``imbalanced`` keeps only ``keep`` of the training samples of the ``minority`` classes.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_train = 2 * len(y) // 3
    tr, te = perm[:n_train], perm[n_train:]
    if imbalanced:
        drop = torch.zeros(len(y), dtype=torch.bool)
        for c in minority:
            idx = tr[y[tr] == c]
            drop[idx[int(keep * len(idx)):]] = True
        tr = tr[~drop[tr]]
    return (x[tr], y[tr]), (x[te], y[te])


def batches(x, y, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    return [(x[perm[i:i + size]], y[perm[i:i + size]]) for i in range(0, len(y), size)]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.short(x))


class DigitsResNet(nn.Module):
    """ResNet-style CNN for 8×8 digits: stem + 2 residual blocks; 4,096 ReLUs per example."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def train(model: nn.Module, data, epochs: int = 40, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(data))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(data), generator=g).tolist():
            x, y = data[i]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


# ------------------------------------------------------------------------------------------- runs


def run_budget(base, train_data, test, budget, method, cfg, granularity="pixel", units="identity", groups=None):
    x0 = train_data[0][0][:2]
    t0 = time.perf_counter()
    s = surgeon.apply(base, LinearizeReLU(granularity=granularity, budget=budget, units=units), example_inputs=x0)
    r = search_relu_budget(s, train_data, method=method, config=cfg, groups=groups)
    f = surgeon.apply(s, FinalizeReLU(fold=True))
    costs = private_costs(f.model, x0)
    per_class = group_accuracy(f.model, test)
    return {
        "method": method, "granularity": granularity, "units": units, "budget_fraction": budget,
        "budget": r.budget, "kept": r.kept, "total": r.total,
        "accuracy": accuracy(f.model, *test), "per_class": {row["group"]: row["accuracy"] for row in per_class.rows},
        "worst_class_acc": per_class.summary["worst_accuracy"], "class_gap": per_class.summary["gap"],
        "poly": costs.summary["poly_units"], "online_ms": costs.summary["online_ms"],
        "comm_MB": costs.summary["comm_MB"], "seconds": time.perf_counter() - t0,
        "search_epochs": sum(1 for h in r.history if h["phase"] == "search"),
    }


def efficientnet_part(out: Path) -> dict:
    from surgeon.export.sparse_relu import count_relu_elements, to_sparse_onnx
    from surgeon.models import efficientnet_lite0, imagenet_batch

    net = efficientnet_lite0().eval()
    photos = imagenet_batch(("chelsea", "coffee", "rocket", "astronaut"))
    views = [photos, photos.flip(-1)]
    with torch.no_grad():
        teacher_logits = net(photos)
    data = [(v, teacher_logits.argmax(-1)) for v in views]  # teacher labels: KD only really
    res = {}
    before = private_costs(net, photos[:2])
    s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=0.1), example_inputs=photos[:2])
    cfg = BudgetSearchConfig(epochs=2, finetune_epochs=1, lr=1e-5, finetune_lr=1e-5, mask_lr=0.05, kd_alpha=1.0)
    t0 = time.perf_counter()
    r = search_relu_budget(s, data, method="autorep", config=cfg)
    res["search_seconds"] = time.perf_counter() - t0
    f = surgeon.apply(s, FinalizeReLU(fold=True))
    after = private_costs(f.model, photos[:2])
    with torch.no_grad():
        logits = f.model(photos)
    latency = {}
    with tempfile.TemporaryDirectory() as tmp:
        exp = to_sparse_onnx(f.model, Path(tmp) / "effnet", photos[:2])
        check = surgeon.export.verify(exp.onnx_path.parent, exp.model, [(photos[:1],), (photos[:3],)], atol=1e-4,
                                      rtol=1e-4, repeats=10, raise_on_failure=False)
        onnx_count = count_relu_elements(exp.onnx_path)
        latency["sparse_ms_batch1"] = check.rows[0].ort_ms
        import onnxruntime as ort

        sess = ort.InferenceSession(str(exp.onnx_path), providers=["CPUExecutionProvider"])
        views = photos[:3].flip(-2)  # batch 3, unseen view
        got = sess.run(None, {sess.get_inputs()[0].name: views.numpy()})[0]
        with torch.no_grad():
            want = exp.model(views).numpy()
        res["ort_parity_relative"] = float(np.abs(got - want).max() / np.abs(want).max())
        res["logit_max_abs"] = float(np.abs(want).max())
        for name, m in (("original", net), ("dense_masked", f.model)):
            surgeon.export.to_onnx(m, Path(tmp) / name, photos[:2])
            c = surgeon.export.verify(Path(tmp) / name, m, [(photos[:1],)], atol=1e-4, rtol=1e-4, repeats=10,
                                      raise_on_failure=False)
            latency[f"{name}_ms_batch1"] = c.rows[0].ort_ms
            latency[f"{name}_relu_elements"] = count_relu_elements(Path(tmp) / name)
    res["ort_latency"] = latency
    print("EfficientNet-Lite0 onnxruntime batch-1 latency / Relu elements in the file:", latency)
    res.update({"total_relus": r.total, "budget": r.budget, "kept": r.kept, "onnx_relu_elements": onnx_count,
                "ort_parity_max_abs": check.max_abs, "ort_passed": check.passed,
                "top1_agreement_with_original": float((logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()),
                "before": before.summary, "after": after.summary,
                "folded": f.report["FinalizeReLU"].notes})
    after.save(out / "relu_budget_efficientnet_costs.json")
    print(before.title + " (original)")
    print("\n".join(f"  {k}: {v}" for k, v in before.summary.items()))
    print(after)
    return res


def plot(rows, base_acc, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in sorted({r["method"] for r in rows}):
        for units in sorted({r["units"] for r in rows}):
            rs = sorted([r for r in rows if r["method"] == method and r["units"] == units], key=lambda r: r["kept"])
            if not rs:
                continue
            label = f"{method} ({units})"
            axes[0].plot([r["kept"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=label)
            axes[1].plot([r["online_ms"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=label)
    for ax, xl in zip(axes, ["ReLUs per example (kept)", "estimated DELPHI online ms (ReLU + poly)"]):
        ax.axhline(100 * base_acc, color="gray", ls="--", label="all ReLUs")
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("digits ResNet: accuracy vs ReLU budget")
    fig.tight_layout()
    fig.savefig(out / "relu_budget.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.02])
    ap.add_argument("--methods", nargs="+", default=["snl", "autorep", "calibration"])
    ap.add_argument("--poly", action="store_true", help="also run AutoReP with polynomial units")
    ap.add_argument("--search-epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--train-epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--skip-efficientnet", action="store_true")
    ap.add_argument("--skip-fairness", action="store_true")
    ap.add_argument("--only-efficientnet", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    t_start = time.perf_counter()

    if args.only_efficientnet:
        e = efficientnet_part(out)
        (out / "relu_budget_efficientnet.json").write_text(json.dumps(e, indent=2, default=str))
        print(json.dumps({k: v for k, v in e.items() if k not in ("before", "after")}, indent=1, default=str))
        return
    (xtr, ytr), test = digits_split()
    train_data = batches(xtr, ytr, args.batch)
    base = train(DigitsResNet(), train_data, epochs=args.train_epochs)
    base_acc = accuracy(base, *test)
    print(f"digits ResNet: {len(ytr)} train / {len(test[1])} test, test accuracy {100 * base_acc:.2f}%, "
          f"{private_costs(base, xtr[:2]).totals['relus']} ReLUs per example")
    cfg = BudgetSearchConfig(epochs=args.search_epochs, finetune_epochs=args.finetune_epochs)
    rows = []
    runs = [(m, "identity") for m in args.methods] + ([("autorep", "poly")] if args.poly else [])
    for budget in args.budgets:
        for method, units in runs:
            row = run_budget(base, train_data, test, budget, method, cfg, units=units)
            row["drop_points"] = 100 * (base_acc - row["accuracy"])
            rows.append(row)
            print(f"  {method:11s} {units:8s} {budget:5.0%}: kept {row['kept']:5d}/{row['total']} "
                  f"acc {100 * row['accuracy']:.2f}% (drop {row['drop_points']:+.2f}) worst class "
                  f"{100 * row['worst_class_acc']:.1f}% [{row['seconds']:.0f} s]", flush=True)
    table = Report("digits ResNet: test accuracy per ReLU budget (pixel masks, KD fine-tune)",
                   ["method", "units", "budget", "kept", "accuracy", "drop_points", "worst_class_acc", "online_ms"],
                   [{**r, "budget": f"{r['budget_fraction']:.0%}", "accuracy": 100 * r["accuracy"],
                     "worst_class_acc": 100 * r["worst_class_acc"]} for r in rows],
                   summary={"baseline_accuracy": 100 * base_acc})
    print(table)
    plot(rows, base_acc, out)
    result = {"settings": vars(args), "baseline_accuracy": base_acc, "rows": rows}

    if not args.skip_fairness:
        (xi, yi), test_i = digits_split(imbalanced=True)
        data_i = batches(xi, yi, args.batch)
        base_i = train(DigitsResNet(), data_i, epochs=args.train_epochs)
        fair = {"teacher": group_accuracy(base_i, test_i).summary}
        for penalty in (False, True):
            c = BudgetSearchConfig(epochs=args.search_epochs, finetune_epochs=args.finetune_epochs,
                                   group_penalty=penalty, group_mu=0.05)
            row = run_budget(base_i, data_i, test_i, 0.05, "autorep", c)
            fair["penalty" if penalty else "plain"] = {k: row[k] for k in ("accuracy", "worst_class_acc", "class_gap",
                                                                           "per_class")}
        print("fairness (imbalanced digits, minority classes 3/5/8 keep 15% of train, 5% ReLUs, AutoReP):")
        for k, v in fair.items():
            if k == "teacher":
                print(f"  teacher: acc {100 * v['accuracy']:.2f}% worst {100 * v['worst_accuracy']:.1f}% gap {100 * v['gap']:.1f}")
            else:
                print(f"  {k:7s}: acc {100 * v['accuracy']:.2f}% worst {100 * v['worst_class_acc']:.1f}% "
                      f"gap {100 * v['class_gap']:.1f}")
        result["fairness"] = fair

    if not args.skip_efficientnet:
        result["efficientnet"] = efficientnet_part(out)
        e = result["efficientnet"]
        print(f"EfficientNet-Lite0: {e['kept']}/{e['total_relus']} ReLUs kept; ONNX Relu elements "
              f"{e['onnx_relu_elements']}; ORT parity {e['ort_parity_max_abs']:.2e}; top-1 agreement "
              f"{e['top1_agreement_with_original']:.2f}; search {e['search_seconds']:.0f} s")
    result["wall_seconds"] = time.perf_counter() - t_start
    (out / "relu_budget.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out / 'relu_budget.json'} and {out / 'relu_budget.png'} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
