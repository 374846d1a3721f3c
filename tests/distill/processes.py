"""Launching the distillation workers of the multi-process tests: ``torchrun`` on a free port, one thread each."""
from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(args: list[str]) -> None:
    """``python *args`` with OMP_NUM_THREADS=1; fails the test with the worker's stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def torchrun(worker: str, *args: str, processes: int = 2) -> None:
    run_python(["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()),
                worker, *args])
