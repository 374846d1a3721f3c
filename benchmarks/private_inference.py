"""Private inference, for real: the ReLU-reduced digits CNN run under FHE (Concrete ML), and the 2PC cost of a
transformer per token, softmax vs linearized attention.

Part 1 (CNN). The digits ResNet of ``relu_budget.py`` is trained, searched (AutoReP, pixel masks) at several
ReLU budgets, finalized and exported to ONNX (opset 14, the version Concrete ML reads). In the separate
``.venv-fhe`` (``bash scripts/setup_private_engine.sh``), ``private_fhe_engine.py`` compiles each graph with
Concrete ML, reports its programmable-bootstrapping (PBS) count, accuracy in FHE simulation over the test
split and real encrypted execution of a few test images (latency, agreement with simulation). Beside it: our
estimates, the TFHE model of :mod:`surgeon.costs.fhe` (PBS count from the graph × a per-PBS time measured on a
one-lookup circuit) and the DELPHI 2PC model of :mod:`surgeon.costs.private`.

Part 2 (transformer). :func:`surgeon.costs.transformer_private.transformer_private_costs` on the SmolLM2-135M
shape (its config, no weights) per decoded token vs context length, original vs linearized attention.

    python benchmarks/private_inference.py [--budgets 1.0 0.5 0.2 0.05 0.0] [--execute 3] [--skip-engine]
                                           [--n-bits 4] [--out benchmarks/results]

Writes ``private_inference.json`` and ``private_inference.png``. FHE work runs under ``nice -n 15``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import surgeon  # noqa: E402
from surgeon.core.provenance import provenance  # noqa: E402
from surgeon.core.report import Report  # noqa: E402
from surgeon.costs.fhe import fhe_pbs_estimate  # noqa: E402
from surgeon.costs.private import private_costs  # noqa: E402
from surgeon.costs.transformer_private import transformer_private_costs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FHE_PYTHON = REPO / ".venv-fhe" / "bin" / "python"
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0)   # HuggingFaceTB/SmolLM2-135M config.json


# ------------------------------------------------------------------------------------------- part 1: CNN


def prepare_cnn(workdir: Path, budgets: list[float], width: int, train_epochs: int, search_epochs: int,
                finetune_epochs: int, seed: int = 0) -> dict:
    """Train the digits ResNet, search each ReLU budget, export ONNX (opset 14) + data for the FHE venv."""
    from relu_budget import DigitsResNet, accuracy, batches, digits_split, train

    from surgeon.passes import BudgetSearchConfig, FinalizeReLU, LinearizeReLU, search_relu_budget

    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = digits_split(seed)
    data = batches(xtr, ytr, 128)
    base = train(DigitsResNet(width=width), data, epochs=train_epochs, seed=seed)
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(workdir / "data.npz", x_calib=xtr[:200].numpy(), x_test=xte.numpy(), y_test=yte.numpy())
    x0 = xtr[:2]
    models = []
    for budget in budgets:
        t0 = time.perf_counter()
        if budget >= 1.0:
            model, kept, total = base, None, None
        else:
            s = surgeon.apply(base, LinearizeReLU(granularity="pixel", budget=budget), example_inputs=x0)
            r = search_relu_budget(s, data, method="autorep",
                                   config=BudgetSearchConfig(epochs=search_epochs, finetune_epochs=finetune_epochs))
            model, kept, total = surgeon.apply(s, FinalizeReLU(fold=True)).model, r.kept, r.total
        model.eval()
        costs = private_costs(model, x0)
        pbs = fhe_pbs_estimate(model, x0[:1])["pbs"]
        name = f"budget_{budget:g}"
        path = workdir / f"{name}.onnx"
        export_opset14(model, x0[:1], path)
        models.append({"name": name, "budget_fraction": budget, "onnx": path.name,
                       "relus": costs.summary["relus"], "total_relus": total or costs.summary["relus"],
                       "kept": kept, "torch_accuracy": accuracy(model, xte, yte),
                       "delphi_online_ms": costs.summary["online_ms"], "delphi_comm_MB": costs.summary["comm_MB"],
                       "macs": costs.summary["macs"], "fhe_pbs_estimate": pbs, "search_seconds": time.perf_counter() - t0})
        print(f"  budget {budget:5.0%}: {costs.summary['relus']} ReLUs, torch accuracy "
              f"{100 * models[-1]['torch_accuracy']:.2f}% -> {path.name}", flush=True)
    # bad input kept on purpose: the plain export (global mean = ReduceMean, which Concrete ML 1.9 lacks)
    export_opset14(base, x0[:1], workdir / "unsupported_reducemean.onnx", rewrite_mean=False)
    models.append({"name": "unsupported_reducemean", "budget_fraction": 1.0, "onnx": "unsupported_reducemean.onnx",
                   "expect_refusal": True})
    manifest = {"models": models, "width": width, "train_epochs": train_epochs, "search_epochs": search_epochs,
                "finetune_epochs": finetune_epochs, "seed": seed, "test_examples": len(yte)}
    (workdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def export_opset14(model: torch.nn.Module, x: torch.Tensor, path: Path, rewrite_mean: bool = True) -> None:
    """ONNX opset 14 with fixed shapes (Concrete ML reads opset 14 only); checked against torch in onnxruntime.

    ``rewrite_mean`` turns the global average (``ReduceMean`` over H, W, which Concrete ML 1.9 does not
    implement) into ``AveragePool`` + ``Flatten`` (the same function).
    """
    import onnx
    import onnxruntime as ort

    torch.onnx.export(model, (x,), str(path), opset_version=14, dynamo=False, input_names=["x"],
                      output_names=["logits"])
    graph = onnx.load(str(path))
    if rewrite_mean:
        spatial_mean_to_avgpool(graph)
        onnx.save(graph, str(path))
    onnx.checker.check_model(graph)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(x).numpy()
    got = sess.run(None, {"x": x.numpy()})[0]
    if not np.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{path.name}: onnxruntime differs from torch by {np.abs(got - want).max():.2e}")


def spatial_mean_to_avgpool(graph) -> int:
    """Replace ``ReduceMean(axes=[2, 3], keepdims=0)`` of an (N, C, H, W) tensor by AveragePool(H×W) + Flatten."""
    from onnx import helper, shape_inference

    inferred = shape_inference.infer_shapes(graph)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    nodes, changed = [], 0
    for node in graph.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "ReduceMean" and list(attrs.get("axes", [])) == [2, 3] and attrs.get("keepdims", 1) == 0:
            pooled = node.output[0] + "_pooled"
            nodes.append(helper.make_node("AveragePool", [node.input[0]], [pooled], kernel_shape=shapes[node.input[0]][2:],
                                          pads=[0, 0, 0, 0], strides=shapes[node.input[0]][2:]))
            nodes.append(helper.make_node("Flatten", [pooled], list(node.output), axis=1))
            changed += 1
        else:
            nodes.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    return changed


def run_engine(workdir: Path, args) -> dict:
    """``private_fhe_engine.py`` in ``.venv-fhe`` (niced); its engine.json, or the reason it could not run."""
    if not FHE_PYTHON.is_file():
        return {"error": f"{FHE_PYTHON} is missing: run `bash scripts/setup_private_engine.sh` first"}
    cmd = ["nice", "-n", "15", str(FHE_PYTHON), str(REPO / "benchmarks" / "private_fhe_engine.py"), str(workdir),
           "--execute", str(args.execute), "--n-bits", str(args.n_bits), "--rounding-bits", str(args.rounding_bits),
           "--sim-examples", str(args.sim_examples), "--pbs-probe", str(args.pbs_probe)]
    if args.execute_models:
        cmd += ["--execute-models", *args.execute_models]
    proc = subprocess.run(cmd, text=True, capture_output=True)
    print("\n".join(line for line in proc.stdout.splitlines() if line.strip()))
    if proc.returncode:
        return {"error": f"engine run failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads((workdir / "engine.json").read_text())


def combine_cnn(manifest: dict, engine: dict) -> list[dict]:
    """One row per ReLU budget: our estimates beside the engine's measurements."""
    from relu_budget import DigitsResNet

    by_name = {m["name"]: m for m in engine.get("models", [])}
    probe = engine.get("pbs_probe") or {}
    arch_pbs = fhe_pbs_estimate(DigitsResNet(width=manifest["width"]), torch.zeros(1, 1, 8, 8))["pbs"]
    rows = []
    for m in manifest["models"]:
        if not m.get("expect_refusal"):
            m = {"fhe_pbs_estimate": arch_pbs, **m}   # the estimate reads conv / pool / add nodes only
        e = by_name.get(m["name"], {})
        row = {**m, **{f"engine_{k}": v for k, v in e.items() if k not in ("name", "executions")}}
        if e.get("executions"):
            row["engine_executions"] = e["executions"]
        if "fhe_pbs_estimate" in m and probe:
            row["estimate_s"] = m["fhe_pbs_estimate"] * probe["seconds_per_pbs"]
            row["estimate_cpu_s"] = m["fhe_pbs_estimate"] * probe["cpu_seconds_per_pbs"]
            if e.get("pbs"):
                row["pbs_estimate_over_engine"] = m["fhe_pbs_estimate"] / e["pbs"]
            if e.get("execute_s_median"):
                row["latency_estimate_over_measured"] = row["estimate_s"] / e["execute_s_median"]
                row["cpu_estimate_over_measured"] = row["estimate_cpu_s"] / e["execute_cpu_s_median"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- part 2: transformer


def transformer_part(contexts: list[int], attentions: dict[str, dict]) -> dict:
    """Per-token 2PC cost of the SmolLM2-135M shape vs context, original and linearized variants."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SMOLLM2_135M)
    rows = []
    for n in contexts:
        for name, att in {"original": None, **attentions}.items():
            r = transformer_private_costs(cfg, context=n, attention=att)
            rows.append({"variant": name, "context": n, **{k: r.summary[k] for k in (
                "exp_per_token", "reciprocal_per_token", "compare_per_token", "sigmoid_per_token", "rsqrt_per_token",
                "mul_per_token", "macs_secret_per_token", "comm_MB_per_token", "rounds_per_token",
                "time_s_per_token")}})
    return {"config": SMOLLM2_135M, "attention_variants": attentions, "rows": rows,
            "protocol": transformer_private_costs(cfg, context=1).summary["protocol"],
            "network": transformer_private_costs(cfg, context=1).summary["network"]}


def plot(cnn_rows: list[dict], tr: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    rs = [r for r in cnn_rows if not r.get("expect_refusal")]
    xs = [r["relus"] for r in rs]
    ax.plot(xs, [r["delphi_online_ms"] / 1e3 for r in rs], "s--", label="DELPHI 2PC estimate (online, ReLU-driven)")
    if any("estimate_s" in r for r in rs):
        ax.plot(xs, [r.get("estimate_s") for r in rs], "o--", label="our TFHE estimate (PBS x probe time)")
    done = [r for r in rs if r.get("engine_execute_s_median")]
    if done:
        ax.plot([r["relus"] for r in done], [r["engine_execute_s_median"] for r in done], "D", ms=9,
                label="Concrete ML encrypted run (measured)")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("log")
    ax.set_xlabel("ReLUs per example (budget)")
    ax.set_ylabel("seconds per image")
    ax.set_title("digits CNN: private latency vs ReLU budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in dict.fromkeys(r["variant"] for r in tr["rows"]):
        pts = [r for r in tr["rows"] if r["variant"] == name]
        ax.plot([r["context"] for r in pts], [r["comm_MB_per_token"] for r in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens in cache)")
    ax.set_ylabel("online MB per decoded token (CrypTen 2PC)")
    ax.set_title("SmolLM2-135M shape: 2PC cost per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "private_inference.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.2, 0.05])
    ap.add_argument("--width", type=int, default=8, help="digits ResNet width (relu_budget.py uses 16)")
    ap.add_argument("--train-epochs", type=int, default=30)
    ap.add_argument("--search-epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--execute", type=int, default=1, help="encrypted test images per executed model")
    ap.add_argument("--execute-models", nargs="*", default=["budget_1", "budget_0.05"])
    ap.add_argument("--n-bits", type=int, default=6)
    ap.add_argument("--rounding-bits", type=int, default=6)
    ap.add_argument("--sim-examples", type=int, default=200)
    ap.add_argument("--pbs-probe", type=int, default=32)
    ap.add_argument("--skip-engine", action="store_true", help="estimates only (no .venv-fhe needed)")
    ap.add_argument("--reuse", action="store_true", help="reuse out/private_cnn (manifest + engine.json) if present")
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    ap.add_argument("--workdir", default="out/private_cnn")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out, workdir = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.reuse and (workdir / "manifest.json").is_file():
        manifest = json.loads((workdir / "manifest.json").read_text())
    else:
        manifest = prepare_cnn(workdir, args.budgets, args.width, args.train_epochs, args.search_epochs,
                               args.finetune_epochs)
    if args.skip_engine:
        engine = {"skipped": True}
    elif args.reuse and (workdir / "engine.json").is_file():
        engine = json.loads((workdir / "engine.json").read_text())
        if (workdir / "engine_exec.json").is_file():   # encrypted runs made in a second, separate engine call
            runs = json.loads((workdir / "engine_exec.json").read_text())
            engine["execution_call"] = {k: v for k, v in runs.items() if k != "models"}
            done = {m["name"]: m for m in runs["models"] if m.get("executions")}
            for m in engine["models"]:
                if m["name"] in done:
                    m.update({k: v for k, v in done[m["name"]].items() if k.startswith(("execut", "encrypted", "keygen"))
                              or k == "pbs_execution_compile"})
                    m["pbs_execution_compile"] = done[m["name"]]["pbs"]
    else:
        engine = run_engine(workdir, args)
    cnn_rows = combine_cnn(manifest, engine)
    print(Report("digits CNN under FHE (Concrete ML) vs our estimates, per image",
                 ["name", "relus", "torch_accuracy", "engine_simulation_accuracy", "fhe_pbs_estimate", "engine_pbs",
                  "estimate_s", "engine_execute_s_median", "engine_execute_cpu_s_median", "delphi_online_ms"],
                 [{k: (v if not isinstance(v, float) else round(v, 4)) for k, v in r.items()} for r in cnn_rows]))
    attentions = {"hybrid w64+4 sinks (hedgehog f16)": {"window": 64, "sinks": 4, "feature_map": "hedgehog",
                                                          "feature_dim": 16},
                  "hybrid w256+4 sinks (hedgehog f16)": {"window": 256, "sinks": 4, "feature_map": "hedgehog",
                                                           "feature_dim": 16},
                  "pure linear (elu1)": {"window": 0, "sinks": 0, "feature_map": "elu1"}}
    tr = transformer_part(args.contexts, attentions)
    print(Report("SmolLM2-135M shape: 2PC (CrypTen) online cost per decoded token",
                 ["variant", "context", "exp_per_token", "compare_per_token", "comm_MB_per_token", "rounds_per_token",
                  "time_s_per_token"], tr["rows"]))
    plot(cnn_rows, tr, out)
    executed = sum(len(r.get("engine_executions", [])) for r in cnn_rows)
    result = {"settings": vars(args), "cnn": {"manifest": {k: v for k, v in manifest.items() if k != "models"},
                                              "engine": {k: v for k, v in engine.items() if k != "models"},
                                              "rows": cnn_rows},
              "transformer": tr, "wall_seconds": time.perf_counter() - t0,
              "provenance": provenance(counts={"cnn_models": len(manifest["models"]), "encrypted_runs": executed,
                                               "simulation_examples": engine.get("settings", {}).get(
                                                   "sim_examples", args.sim_examples),
                                               "contexts": len(args.contexts)},
                                       loadavg_engine=[engine.get("loadavg_start"), engine.get("loadavg_end")])}
    (out / "private_inference.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out / 'private_inference.json'} and {out / 'private_inference.png'}")


if __name__ == "__main__":
    main()
