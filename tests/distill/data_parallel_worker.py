"""One distillation run for the data-parallel test: ``accelerate launch ... data_parallel_worker.py OUT BATCH``.

Every process saves its final parameters and loss history to ``OUT.rank{r}.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distill import cfg, linearized, tokens  # noqa: E402

import surgeon  # noqa: E402


def main(out: str, batch_size: int) -> None:
    from accelerate import PartialState

    torch.set_num_threads(1)
    model, _ = linearized(2)
    config = cfg(stages=["transfer", "lora"], transfer_steps=5, lora_steps=5, batch_size=batch_size,
                 lora_dropout=0.0)
    result = surgeon.distill(model, data=tokens(16), config=config)
    state = PartialState()
    torch.save({"params": {n: p.detach().clone() for n, p in result.model.named_parameters()},
                "losses": [h["loss"] for h in result.history], "tokens": [h["tokens"] for h in result.history],
                "world": state.num_processes}, f"{out}.rank{state.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
