"""Run ONNX models under FHE with Concrete ML (Zama). Runs in ``.venv-fhe`` (``scripts/setup_private_engine.sh``).

Reads ``manifest.json`` + ``data.npz`` + ``*.onnx`` from a folder that ``private_inference.py`` wrote, and for
each model: compiles it (post-training quantization, ``--n-bits``, accumulators rounded to ``--rounding-bits``),
reads the circuit's programmable-bootstrapping (PBS) count and key sizes, scores accuracy in FHE simulation on
the test split, then (``--execute N``) generates keys and runs N test images encrypted, timing each and comparing
the decrypted prediction with simulation. ``--pbs-probe`` times a lone lookup-table circuit at the same precision
(the per-PBS time our estimate uses). A graph the engine cannot take is reported (the engine's error and the ONNX
ops it names), not raised. Writes ``engine.json`` in the folder.

    .venv-fhe/bin/python benchmarks/private_fhe_engine.py out/private_cnn [--execute 2] [--n-bits 6]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np


def onnx_ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def named_ops(message: str, ops: list[str]) -> list[str]:
    """The graph's op types that the engine's message names (e.g. the unimplemented ones)."""
    return sorted({op for op in ops if re.search(rf"\b{re.escape(op)}\b", message.split("Available ONNX operators")[0])})


def compile_model(path: Path, calib: np.ndarray, n_bits: int, rounding_bits: int, p_error: float):
    """(quantized module, None) or (None, {"error", "ops", ...}) when the engine refuses the graph."""
    import onnx
    from concrete.ml.torch.compile import compile_onnx_model

    ops = onnx_ops(path)
    try:
        q = compile_onnx_model(onnx.load(str(path)), calib, n_bits=n_bits,
                               rounding_threshold_bits={"n_bits": rounding_bits, "method": "approximate"},
                               p_error=p_error)
    except Exception as e:  # noqa: BLE001 - the engine's own error is the result here
        msg = f"{type(e).__name__}: {e}"
        return None, {"error": msg.split("\nAvailable ONNX operators")[0][:600], "ops_named": named_ops(msg, ops),
                      "graph_ops": sorted(set(ops))}
    return q, None


def pbs_probe(rounding_bits: int, size: int, repeats: int) -> dict:
    """Seconds per PBS of a lone univariate lookup on ``size`` encrypted ``rounding_bits``-bit integers."""
    from concrete import fhe

    table = fhe.LookupTable([max(v - 2 ** (rounding_bits - 1), 0) for v in range(2 ** rounding_bits)])

    @fhe.compiler({"x": "encrypted"})
    def f(x):
        return table[x]

    inputs = [np.random.default_rng(i).integers(0, 2 ** rounding_bits, size) for i in range(8)]
    circuit = f.compile(inputs)
    circuit.keygen()
    times, cpu = [], []
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = circuit.encrypt_run_decrypt(inputs[i % len(inputs)])
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert np.array_equal(out, np.array([table[int(v)] for v in inputs[i % len(inputs)]]))
    return {"size": size, "bits": rounding_bits, "pbs": circuit.programmable_bootstrap_count,
            "seconds": times, "cpu_seconds": cpu,
            "seconds_per_pbs": float(np.median(times)) / circuit.programmable_bootstrap_count,
            "cpu_seconds_per_pbs": float(np.median(cpu)) / circuit.programmable_bootstrap_count,
            "parameters": {str(k): int(v) for k, v in
                           circuit.statistics["programmable_bootstrap_count_per_parameter"].items()},
            "loadavg": list(os.getloadavg())}


def run_model(entry: dict, folder: Path, data, args) -> dict:
    out = {"name": entry["name"], "onnx_ops": sorted(set(onnx_ops(folder / entry["onnx"])))}
    t0 = time.perf_counter()
    q, err = compile_model(folder / entry["onnx"], data["x_calib"], args.n_bits, args.rounding_bits, args.p_error)
    if err:
        print(f"  {entry['name']}: the engine refused the graph: {err['error']} (ops {err['ops_named']})", flush=True)
        return {**out, "compiled": False, **err}
    c = q.fhe_circuit
    stats = c.statistics
    out.update({"compiled": True, "compile_s": time.perf_counter() - t0, "pbs": int(c.programmable_bootstrap_count),
                "complexity": float(c.complexity), "key_switch_count": int(stats["key_switch_count"]),
                "bootstrap_key_MB": stats["size_of_bootstrap_keys"] / 1e6,
                "keyswitch_key_MB": stats["size_of_keyswitch_keys"] / 1e6,
                "input_ciphertext_KB": stats["size_of_inputs"] / 1e3, "p_error": float(stats["p_error"]),
                "pbs_parameters": {str(k): int(v) for k, v in stats["programmable_bootstrap_count_per_parameter"].items()}})
    x, y = data["x_test"][:args.sim_examples], data["y_test"][:args.sim_examples]
    t0 = time.perf_counter()
    clear = q.forward(x, fhe="disable")
    sim = q.forward(x, fhe="simulate")
    out.update({"quantized_clear_accuracy": float((clear.argmax(1) == y).mean()),
                "simulation_accuracy": float((sim.argmax(1) == y).mean()), "simulation_s": time.perf_counter() - t0,
                "test_examples": int(len(y))})
    print(f"  {entry['name']}: {out['pbs']} PBS, compile {out['compile_s']:.0f} s, accuracy quantized "
          f"{100 * out['quantized_clear_accuracy']:.2f}% / simulation {100 * out['simulation_accuracy']:.2f}%", flush=True)
    if args.execute:
        t0 = time.perf_counter()
        c.keygen()
        out["keygen_s"] = time.perf_counter() - t0
        runs = []
        for i in range(args.execute):
            load = os.getloadavg()
            t0, c0 = time.perf_counter(), time.process_time()
            enc = q.forward(x[i:i + 1], fhe="execute")
            runs.append({"index": i, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                         "label": int(y[i]),
                         "encrypted_pred": int(enc.argmax(1)[0]), "simulation_pred": int(sim[i].argmax()),
                         "max_abs_vs_simulation": float(np.abs(enc[0] - sim[i]).max()), "loadavg_before": list(load),
                         "loadavg_after": list(os.getloadavg())})
            print(f"    encrypted #{i}: {runs[-1]['seconds']:.1f} s ({runs[-1]['cpu_seconds']:.1f} s CPU), pred {runs[-1]['encrypted_pred']} "
                  f"(simulation {runs[-1]['simulation_pred']}, label {y[i]})", flush=True)
        out["executions"] = runs
        out["execute_s_median"] = float(np.median([r["seconds"] for r in runs]))
        out["execute_cpu_s_median"] = float(np.median([r["cpu_seconds"] for r in runs]))
        out["encrypted_agrees_with_simulation"] = sum(r["encrypted_pred"] == r["simulation_pred"] for r in runs)
        out["encrypted_correct"] = sum(r["encrypted_pred"] == r["label"] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--execute", type=int, default=2, help="encrypted test images per model (0 = simulation only)")
    ap.add_argument("--execute-models", nargs="*", default=None, help="names to execute encrypted (default all)")
    ap.add_argument("--n-bits", type=int, default=6)
    ap.add_argument("--rounding-bits", type=int, default=6)
    ap.add_argument("--p-error", type=float, default=0.01)
    ap.add_argument("--pbs-probe", type=int, default=256, help="lookups in the per-PBS timing circuit (0 = skip)")
    ap.add_argument("--json", default="engine.json", help="result file name inside the folder")
    ap.add_argument("--sim-examples", type=int, default=200, help="test images scored in FHE simulation")
    ap.add_argument("--only", nargs="*", default=None, help="model names to run (default all)")
    args = ap.parse_args()
    folder = Path(args.folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = dict(np.load(folder / "data.npz"))
    import concrete.ml

    result = {"engine": "concrete-ml", "version": concrete.ml.__version__, "python": platform.python_version(),
              "settings": vars(args), "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "models": []}
    if args.pbs_probe:
        result["pbs_probe"] = pbs_probe(args.rounding_bits, args.pbs_probe, 3)
        print(f"  lone-lookup probe: {1e3 * result['pbs_probe']['seconds_per_pbs']:.2f} ms per PBS", flush=True)
    base_execute = args.execute
    for entry in manifest["models"]:
        if args.only and entry["name"] not in args.only:
            continue
        args.execute = base_execute if args.execute_models is None or entry["name"] in args.execute_models else 0
        result["models"].append(run_model(entry, folder, data, args))
        (folder / args.json).write_text(json.dumps(result, indent=2))
    result["loadavg_end"] = list(os.getloadavg())
    (folder / args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
