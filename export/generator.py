"""Text generation on onnxruntime over a prefill/decode export, in memory independent of the context.

Example:
    >>> import torch, transformers, surgeon, surgeon.export
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> lm = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4)).model
    >>> _ = surgeon.export.to_onnx(lm, "/tmp/doc_gen", overwrite=True)
    >>> gen = OnnxGenerator("/tmp/doc_gen")
    >>> out = gen.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    >>> torch.equal(out, lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False))
    True
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from surgeon.core.errors import ExportError
from surgeon.export.causal_lm import load_causal_lm_manifest

_NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bool": np.bool_,
          "int64": np.int64, "bfloat16": np.float32}


class OnnxGenerator:
    """Greedy / sampling generation with ``prefill.onnx`` + ``decode.onnx`` in onnxruntime.

    Each session uses the graph optimization level the manifest records for its graph
    (:func:`surgeon.export.optimize`; onnxruntime's default when none), or ``level`` when given.

    ``io_binding`` keeps the decode state in onnxruntime's own buffers between steps (``OrtValue``
    outputs bound straight back as the next step's inputs): no copy to and from numpy per token, and
    on a GPU provider the state never leaves the device. Default: on for any provider other than
    the CPU, off on the CPU (where host copies are cheap; both paths give the same tokens).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, level: str | None = None, io_binding: bool | None = None) -> None:
        from surgeon.export.ort_optimize import make_session, parse_level

        self.manifest = load_causal_lm_manifest(path)
        forced = parse_level(level) if level is not None else None
        #: graph -> onnxruntime graph optimization level its session uses (None: onnxruntime's default)
        self.levels = {g: forced or self.manifest.graph(g).ort_level for g in ("prefill", "decode")}
        self.prefill = make_session(self.manifest.graph_path("prefill"), self.levels["prefill"], threads, providers)
        self.decode = make_session(self.manifest.graph_path("decode"), self.levels["decode"], threads, providers)
        self.chunk = int(self.manifest.exporter["chunk"])
        self.state_specs = self.manifest.exporter["state"]
        self.state_names = [s["name"].replace("state.", "state_in.") for s in self.state_specs]
        self._check_manifest_state()
        used = self.decode.get_providers()
        self.device = "cuda" if used and used[0] == "CUDAExecutionProvider" else "cpu"
        self.io_binding = (used[0] != "CPUExecutionProvider") if io_binding is None else bool(io_binding)

    def _check_manifest_state(self) -> None:
        """The manifest's state specs match decode.onnx's state inputs (names and fixed dims)."""
        graph = {i.name: i for i in self.decode.get_inputs()}
        for spec, name in zip(self.state_specs, self.state_names):
            got = graph.get(name)
            want = spec["shape"]
            fixed_differs = got is not None and (len(got.shape) != len(want) or any(
                isinstance(w, int) and g != w for g, w in zip(got.shape, want)))
            if got is None or fixed_differs:
                found = "no such input" if got is None else f"shape {got.shape}"
                raise ExportError(f"{self.manifest.root / 'manifest.json'} says decode.onnx takes {name} of shape {want} "
                                  f"({spec['kind']} of layer {spec['layer']}), but the graph has {found}: the manifest "
                                  "and the graphs come from different exports; re-export into an empty folder")

    # -- the two graphs ---------------------------------------------------------------------------
    def run_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run ``prefill.onnx`` (left-padded to a multiple of the chunk here unless the graph pads itself):
        (logits, state); logits of the last position only when the export says ``last_logits_only``."""
        ids = torch.as_tensor(input_ids)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if self.manifest.exporter.get("prefill_blocks"):
            return self._run_blocks(ids, mask, int(self.manifest.exporter["prefill_blocks"]))
        pad = 0 if self.manifest.exporter.get("prefill_pads") else (-ids.shape[1]) % self.chunk
        if pad:
            ids = torch.nn.functional.pad(ids, (pad, 0))
            mask = torch.nn.functional.pad(mask, (pad, 0))
        out = self.prefill.run(None, {"input_ids": ids.long().numpy(), "attention_mask": mask.long().numpy()})
        return (out[0] if self.manifest.exporter.get("last_logits_only") else out[0][:, pad:]), out[1:]

    def _run_blocks(self, ids: torch.Tensor, mask: torch.Tensor, block: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Memory slots: the prompt in blocks of ``block`` tokens from its first (padded) position, as the PyTorch
        forward splits it, each a ``prefill.onnx`` call carrying the state (a last block of one token: decode.onnx)."""
        batch, length = ids.shape
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0).numpy()
        pad = int(self.manifest.exporter.get("kv_cache_pad", 0))
        state = [np.zeros((batch, *[pad if d == "past" else d for d in spec["shape"][1:]]), dtype=_NUMPY[spec["dtype"]])
                 for spec in self.state_specs]
        logits = []
        for lo in range(0, length, block):
            hi = min(lo + block, length)
            if hi - lo == 1:
                if not bool(mask[:, lo].all()):
                    raise ExportError(f"the prompt's last token (position {lo}) is padding in some rows: pad prompts on "
                                      "the left")
                out, state = self.run_decode(ids[:, lo:hi].numpy(), positions[:, lo:hi], state)
            else:
                feeds = {"input_ids": ids[:, lo:hi].long().numpy(), "attention_mask": mask[:, lo:hi].long().numpy(),
                         "position_ids": positions[:, lo:hi]}
                feeds.update({name: value.astype(_NUMPY[spec["dtype"]], copy=False)
                              for spec, name, value in zip(self.state_specs, self.state_names, state)})
                out, *state = self.prefill.run(None, feeds)
            logits.append(out)
        full = np.concatenate(logits, 1)
        return (full[:, -1:] if self.manifest.exporter.get("last_logits_only") else full), state

    def run_decode(self, token: np.ndarray, position: np.ndarray, state: list[np.ndarray]
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step of ``decode.onnx``; checks the state against the manifest first."""
        if len(state) != len(self.state_specs):
            raise ExportError(f"decode.onnx takes {len(self.state_specs)} state tensors, got {len(state)}")
        self._check_state(token.shape[0], state)
        feeds = {"input_ids": token.astype(np.int64), "position_ids": position.astype(np.int64)}
        for spec, name, value in zip(self.state_specs, self.state_names, state):
            feeds[name] = value.astype(_NUMPY[spec["dtype"]], copy=False)
        out = self.decode.run(None, feeds)
        return out[0], out[1:]

    def run_decode_bound(self, token: np.ndarray, position: np.ndarray, state: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """One decode step through IOBinding: ``state`` (numpy arrays or the ``OrtValue`` list this
        method returned) is bound as input, the new state comes back as ``OrtValue`` s on the device."""
        import onnxruntime as ort

        if len(state) != len(self.state_specs):
            raise ExportError(f"decode.onnx takes {len(self.state_specs)} state tensors, got {len(state)}")
        io = self.decode.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(token, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position, dtype=np.int64))
        for spec, name, value in zip(self.state_specs, self.state_names, state):
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(value, dtype=_NUMPY[spec["dtype"]]), self.device, 0)
            io.bind_ortvalue_input(name, value)
        outputs = [o.name for o in self.decode.get_outputs()]
        io.bind_output(outputs[0], "cpu")              # logits are read on the host every step
        for name in outputs[1:]:
            io.bind_output(name, self.device)
        self.decode.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])

    def _check_state(self, batch: int, state: list[np.ndarray]) -> None:
        """Every state tensor has the shape decode.onnx takes (softmax KV caches: one shared length)."""
        past = None
        for spec, name, value in zip(self.state_specs, self.state_names, state):
            want = (batch, *spec["shape"][1:])
            if "past" in want and len(value.shape) == len(want):   # a softmax layer's KV cache: any one length
                past = value.shape[want.index("past")] if past is None else past
                want = tuple(past if d == "past" else d for d in want)
            if tuple(value.shape) != want:
                raise ExportError(f"{name} has shape {tuple(value.shape)}, decode.onnx expects {want} "
                                  f"({spec['kind']} of layer {spec['layer']}); pass the state_out of the previous call")

    # -- generation -----------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 eos_token_id: int | None = None, seed: int = 0) -> torch.Tensor:
        """Prompt (left-padded batch allowed) + ``max_new_tokens`` tokens, like ``model.generate``."""
        ids = torch.as_tensor(input_ids)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        logits, state = self.run_prefill(ids, mask)
        if not np.isfinite(logits[:, -1]).all():
            raise ExportError("prefill.onnx produced NaN/inf logits for the prompt; run surgeon.export.verify "
                              "against the PyTorch model to see whether the model itself overflows")
        position = mask.sum(-1, keepdim=True).numpy()
        rng = np.random.default_rng(seed)
        done = np.zeros(ids.shape[0], dtype=bool)
        new = []
        for step in range(max_new_tokens):
            token = self._pick(logits[:, -1], do_sample, temperature, top_k, rng)
            if eos_token_id is not None:
                token = np.where(done, eos_token_id, token)
                done |= token == eos_token_id
            new.append(token)
            if step + 1 == max_new_tokens or done.all():
                break
            if self.io_binding:
                if step == 0:       # the prefill state, checked once against the manifest's shapes
                    self._check_state(ids.shape[0], state)
                logits, state = self.run_decode_bound(token[:, None], position, state)
            else:
                logits, state = self.run_decode(token[:, None], position, state)
            if not np.isfinite(logits).all():
                raise ExportError(f"decode.onnx produced NaN/inf logits at step {step + 1}")
            position = position + 1
        return torch.cat([ids, torch.from_numpy(np.stack(new, axis=1))], dim=1)

    @staticmethod
    def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int,
              rng: np.random.Generator) -> np.ndarray:
        if not do_sample:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / max(temperature, 1e-6)
        if top_k:
            cut = np.sort(z, axis=-1)[:, -top_k][:, None]
            z = np.where(z < cut, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])

    def state_bytes(self, batch: int = 1, context: int = 0) -> int:
        """Bytes of decode state for ``batch`` sequences at ``context`` tokens: constant when every layer is
        linear; layers kept as softmax attention add their KV cache (``kv_cache_bytes_per_token``)."""
        per_token = int(self.manifest.exporter.get("kv_cache_bytes_per_token", 0))
        return (int(self.manifest.exporter["state_bytes_per_sequence"]) + per_token * context) * batch
