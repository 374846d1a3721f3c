"""surgeon.distill data-parallel: 2 processes (torchrun / accelerate's MULTI_CPU, gloo) x batch 1 = 1 process x batch 2."""
from __future__ import annotations

from pathlib import Path

import torch
from processes import run_python, torchrun

WORKER = Path(__file__).parent / "data_parallel_worker.py"


def test_two_processes_train_exactly_like_one_with_the_global_batch(tmp_path):
    torchrun(str(WORKER), str(tmp_path / "two"), "1")
    run_python([str(WORKER), str(tmp_path / "one"), "2"])
    rank0, rank1 = (torch.load(tmp_path / f"two.rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "one.rank0.pt")
    assert (rank0["world"], rank1["world"], single["world"]) == (2, 2, 1)
    # gradients are averaged across processes: both ranks hold the same model after every step
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])
    # each process took its half of the same global batch, so the run matches one process with batch 2
    assert rank0["tokens"] == single["tokens"]                        # tokens count all processes
    assert len(rank0["losses"]) == len(single["losses"]) == 15        # 5 steps x 2 transfer layers + 5 LoRA
    for a, b in zip(rank0["losses"], single["losses"]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (a, b)
    worst = max((rank0["params"][n] - single["params"][n]).abs().max().item() for n in single["params"])
    assert worst <= 1e-5, worst
