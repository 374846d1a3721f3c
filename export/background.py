"""Export a surgery in another process while this one keeps training it.

Tracing a 30-layer linearized causal LM to ONNX takes minutes of one core, and distillation changes
weights, never the graph. So the graph can be traced from the model *before* training, in a child
process (``surgeon export``), while the parent distils; :meth:`BackgroundExport.finish` then waits
for it and writes the trained weights into the finished export (:func:`surgeon.export.weights.update_weights`,
seconds), which then verifies against the trained model like a fresh export.

Example:
    >>> import surgeon
    >>> from surgeon.export.background import BackgroundExport
    >>> from surgeon.models.smollm2 import load_smollm2
    >>> from surgeon.passes import LinearizeAttention
    >>> surgery = surgeon.apply(load_smollm2()[0], LinearizeAttention(window=64))      # doctest: +SKIP
    >>> surgery.recipe.source = {"model": "smollm2"}        # the child rebuilds it    # doctest: +SKIP
    >>> job = BackgroundExport.start(surgery, "out/onnx")                              # doctest: +SKIP
    >>> _ = surgeon.distill(surgery, data="pydoc", tokenizer=load_smollm2()[1])        # doctest: +SKIP
    >>> update = job.finish(surgery.model)       # waits, then writes the distilled weights # doctest: +SKIP
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from surgeon.core.errors import ConfigError, ExportError
from surgeon.export.weights import WeightUpdate, update_weights


class BackgroundExport:
    """A ``surgeon export`` child process writing ``out_dir``; ``finish(model)`` loads ``model``'s weights into it."""

    def __init__(self, process: subprocess.Popen, out_dir: Path, log_path: Path) -> None:
        self.process, self.out_dir, self.log_path = process, out_dir, log_path
        self.started = time.perf_counter()
        self.export_seconds: float | None = None

    @classmethod
    def start(cls, surgery: Any, out_dir: str | Path, *, saved_dir: str | Path | None = None,
              threads: int = 1) -> "BackgroundExport":
        """Save ``surgery`` (to ``saved_dir``, default ``<out_dir>.surgery``) and start exporting it with ``threads``
        torch threads. The surgery's recipe must name its base model (``recipe.source = {"model": ...}``)."""
        import surgeon

        if not (getattr(surgery.recipe, "source", None) or {}).get("model"):
            raise ConfigError("BackgroundExport needs a surgery whose recipe names its base model "
                              "(surgery.recipe.source = {'model': <built-in name>}), so the child process can "
                              "rebuild it; export in this process with surgeon.export.to_onnx instead")
        out_dir = Path(out_dir)
        saved = Path(saved_dir) if saved_dir is not None else out_dir.with_name(out_dir.name + ".surgery")
        surgeon.save(surgery, saved)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = out_dir.with_name(out_dir.name + ".export.log")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "surgeon.cli.commands", "export", str(saved),
                                        "--out", str(out_dir), "--overwrite"], stdout=log, stderr=subprocess.STDOUT,
                                       env=env)
        job = cls(process, out_dir, log_path)
        atexit.register(job.cancel)        # a parent that dies (error, Ctrl-C) takes its child with it
        return job

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float | None = None) -> float:
        """Wait for the export; its wall-clock seconds. Raises :class:`ExportError` (with the log's end) if it failed."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise ExportError(f"the background export to {self.out_dir} is still running after {timeout} s "
                              f"(log: {self.log_path})") from e
        if self.export_seconds is None:
            self.export_seconds = time.perf_counter() - self.started
        if code != 0:
            tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
            raise ExportError(f"the background export to {self.out_dir} failed (exit {code}); the end of "
                              f"{self.log_path}:\n{tail}")
        return self.export_seconds

    def finish(self, model: nn.Module, timeout: float | None = None) -> WeightUpdate:
        """Wait for the export, then write ``model``'s current weights into it (checked by name and value)."""
        self.wait(timeout)
        return update_weights(self.out_dir, model)

    def cancel(self) -> None:
        """Stop the child process if it still runs (the export folder is then left as the exporter leaves it)."""
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> "BackgroundExport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


__all__ = ["BackgroundExport"]
