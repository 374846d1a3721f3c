"""One distillation run for the sharded test: ``torchrun ... sharded_worker.py OUT BATCH``.

Both stages with ``DistillConfig(shard="fsdp")``: stage 1 (layer mode) runs replicated, stage 2 (LoRA + KD)
sharded. At the first step
of each stage a callback records what this process holds of every parameter: ``(local elements, full
elements, type)``. Every process saves that, its final parameters and its loss history to ``OUT.rank{r}.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distill import cfg, linearized, tokens  # noqa: E402

import surgeon  # noqa: E402


def holdings(model: torch.nn.Module) -> dict[str, tuple[int, int, str]]:
    return {n: (p.to_local().numel() if hasattr(p, "to_local") else p.numel(), p.numel(), type(p).__name__)
            for n, p in model.named_parameters()}


def gradients(model: torch.nn.Module, world: int, rank: int) -> dict[str, torch.Tensor]:
    """Next-token CE gradients of the q/gate projections on sequences 0 and 1: one process takes both, two
    processes one each with FSDP (gathered after its reduce-scatter)."""
    from surgeon.distill.sharding import ShardedParameters

    named = {n: p for n, p in model.named_parameters() if "q_proj" in n or "gate_proj" in n}
    for p in named.values():
        p.requires_grad_(True)
    ids = tokens(16)[:2]

    def loss(x: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    if world == 1:
        loss(ids).backward()
        grads = {n: p.grad.clone() for n, p in named.items()}
    else:
        with ShardedParameters(model, list(named.values()), "cpu") as sharded:
            loss(ids[rank:rank + 1]).backward()
            grads = {n: p.grad.full_tensor() for n, p in zip(named, sharded)}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return grads


def main(out: str, batch_size: int) -> None:
    from accelerate import PartialState

    torch.set_num_threads(1)
    model, _ = linearized(2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = PartialState(cpu=not torch.cuda.is_available())   # what surgeon.distill's Accelerator uses
    grads = gradients(model, state.num_processes, state.process_index)
    config = cfg(stages=["transfer", "lora"], transfer_steps=5, lora_steps=5,
                 batch_size=batch_size, lora_dropout=0.0, shard="fsdp")
    seen: dict[str, dict] = {}

    def record(info: dict) -> None:
        seen.setdefault(info["stage"], holdings(model))

    result = surgeon.distill(model, data=tokens(16), config=config, callbacks=[record])
    torch.save({"params": {n: p.detach().clone() for n, p in result.model.named_parameters()},
                "after": holdings(result.model), "model_type": type(result.model).__name__,
                "layer_type": type(result.model.model.layers[0]).__name__, "held": seen,
                "initial": initial, "grads": grads, "losses": [h["loss"] for h in result.history],
                "tokens": [h["tokens"] for h in result.history],
                "world": state.num_processes}, f"{out}.rank{state.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
