"""Sharded parameters for one training phase: torch FSDP2 (``fully_shard``) on, then off again.

``DistillConfig(shard="fsdp")`` under ``torchrun`` / ``accelerate launch`` with N processes: for the
length of a phase every repeated block of the model (the decoder layers) and the model root are
``fully_shard``-ed over all processes, so each process holds 1/N of every weight, frozen and trainable
(FSDP all-gathers a block's weights for its forward and backward, then frees them again), and
gradients are reduce-scattered (averaged) by FSDP instead of all-reduced. At the end of the phase the
full weights are gathered back into the *same* ``nn.Parameter`` objects and FSDP is taken off the
modules again (hooks, class, state), so the stage that follows (peft ``merge_and_unload``, layer
reports, export) sees a plain model. With one process nothing is sharded.

Only stage 2 (LoRA + KD) is sharded. FSDP reduces gradients from autograd hooks on its modules' outputs;
stage 1's loss is read from inside the attention layers (their linear output against the softmax one,
while the layers pass the teacher's softmax output on, which needs no gradient), so FSDP would never see
its backward: stage 1 runs replicated (gradients all-reduced), in every ``transfer_mode``.

Example (which modules become their own FSDP unit: the elements of repeated-block lists):
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Embedding(5, 4), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    >>> [type(b).__name__ for b in shard_units(net)]
    ['Linear', 'Linear']
"""
from __future__ import annotations

import torch
import torch.nn as nn

from surgeon.core.errors import SurgeonError


def shard_units(root: nn.Module) -> list[nn.Module]:
    """The FSDP units below ``root``: every element of every ``nn.ModuleList`` of same-typed modules
    (outermost lists only), e.g. a transformer's decoder layers. The rest stays in the root's unit."""
    units: list[nn.Module] = []
    taken: set[int] = set()
    for _, module in root.named_modules():
        if id(module) in taken:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            units.extend(module)
            taken.update(id(m) for child in module for m in child.modules())
    return units


def _hook_keys(module: nn.Module) -> dict[str, set]:
    return {k: set(v) for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)}


class ShardedParameters:
    """Context manager: ``fully_shard`` ``root`` (its ``shard_units`` first) over all processes; yields the
    sharded counterparts of ``params`` (same order). On exit the full values are gathered back into the
    original ``params`` objects and ``root`` is a plain module again.

    Usage (in every process of a ``torchrun`` launch)::

        with ShardedParameters(model, trainable, "cpu") as sharded:
            opt = torch.optim.AdamW(sharded)
            ...   # forward / backward / opt.step(): gradients are reduce-scattered by FSDP
        # model holds the trained full weights, trainable[i] is the same Parameter as before
    """

    def __init__(self, root: nn.Module, params: list[nn.Parameter], device_type: str) -> None:
        self.root = root
        self.params = params
        self.device_type = device_type
        self.fsdp_modules: list[nn.Module] = []
        # every parameter slot (module, name, Parameter): where FSDP puts its DTensor, where we put it back
        self._slots = [(m, n, p) for m in root.modules() for n, p in m._parameters.items() if p is not None]
        self._before: list[tuple[nn.Module, type, set, dict[str, set]]] = []
        self._added: list[tuple[nn.Module, type, set, dict[str, set]]] = []

    def __enter__(self) -> list[nn.Parameter]:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_available() or not dist.is_initialized():
            raise SurgeonError("DistillConfig(shard='fsdp') needs a process group: launch with torchrun or "
                               "accelerate launch (one process shards nothing)")
        where = {id(p): i for i, (_, _, p) in enumerate(self._slots)}
        missing = [i for i, p in enumerate(self.params) if id(p) not in where]
        if missing:
            raise SurgeonError(f"trainable parameter #{missing[0]} is not inside {type(self.root).__name__}, "
                               "so it cannot be sharded with it")
        modules = list(self.root.modules())
        self._before = [(m, type(m), set(vars(m)), _hook_keys(m)) for m in modules]
        mesh = init_device_mesh(self.device_type, (dist.get_world_size(),))
        for unit in shard_units(self.root):
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
            self.fsdp_modules.append(unit)
        fully_shard(self.root, mesh=mesh, reshard_after_forward=True)   # embeddings / head sharded between uses too
        self.fsdp_modules.append(self.root)
        # what FSDP added to each module (attributes, hooks): exactly what __exit__ takes away
        self._added = []
        for m, cls, keys, hooks in self._before:
            now = _hook_keys(m)
            self._added.append((m, cls, set(vars(m)) - keys, {k: v - hooks.get(k, set()) for k, v in now.items()}))
        # the original full tensors were copied into the shards: free them (they come back in __exit__)
        with torch.no_grad():
            for _, _, p in self._slots:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        return [self._slots[where[id(p)]][0]._parameters[self._slots[where[id(p)]][1]] for p in self.params]

    def __exit__(self, *exc) -> None:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.tensor import DTensor

        for m in reversed(self.fsdp_modules):
            m.reshard()                      # every module holds its sharded DTensor parameters again
        full: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for module, name, orig in self._slots:   # same order on every process: the all-gathers pair up
                cur = module._parameters[name]
                if id(cur) not in full:
                    full[id(cur)] = cur.full_tensor() if isinstance(cur, DTensor) else cur.detach()
                orig.data = full[id(cur)]
                module._parameters[name] = orig
        for m, cls, keys, hooks in self._added:
            m.__class__ = cls
            for k in keys:
                vars(m).pop(k, None)
            for k, ids in hooks.items():
                for i in ids:
                    getattr(m, k).pop(i, None)
            _module_state_mapping.pop(m, None)
        self.fsdp_modules = []
        left = [n for n, p in self.root.named_parameters() if isinstance(p, DTensor)]
        if left:
            raise SurgeonError(f"FSDP left sharded parameters behind in {type(self.root).__name__} ({left[0]}); "
                               "this torch version's fully_shard internals differ from those surgeon expects")


__all__ = ["ShardedParameters", "shard_units"]
