"""Fold linear ops that became adjacent once ReLUs were removed (exact, eval-mode).

* ``BatchNorm`` (running statistics) directly after a convolution / linear layer whose output
  nothing else reads: scaled into its weight and bias.
* Two consecutive linear layers, or a convolution followed by a 1×1 convolution (stride 1, no
  padding, groups 1, no dilation), with nothing between them and the first output read only by the
  second: one layer with ``W₂W₁`` and ``W₂b₁ + b₂`` — only where that does not add MACs.

``fold_linear_ops(gm)`` edits a ``GraphModule`` in place and returns what it folded;
``FinalizeReLU(fold=True)`` calls it after freezing masks.

Example:
    >>> import torch, torch.nn as nn, torch.fx as fx
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)).eval()
    >>> gm = fx.symbolic_trace(net); x = torch.randn(2, 3, 6, 6); ref = net(x)
    >>> fold_linear_ops(gm)
    ['bn 1 -> 0', '0 + 2']
    >>> torch.allclose(gm(x), ref, atol=1e-5)
    True
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fold_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    w = layer.weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w * scale.reshape(shape))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype))
        layer.bias.copy_(bias * scale + shift)


def _plain_1x1(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _compose(first: nn.Module, second: nn.Module) -> nn.Module | None:
    """``second ∘ first`` as one layer, or None when not exact / would add MACs."""
    if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
        if first.in_features * second.out_features > first.weight.numel() + second.weight.numel():
            return None
        new = nn.Linear(first.in_features, second.out_features)
        w = second.weight @ first.weight
    elif isinstance(first, nn.Conv2d) and _plain_1x1(second) and first.groups == 1:
        w2 = second.weight[:, :, 0, 0]
        if first.weight[0].numel() * second.out_channels > first.weight.numel() + w2.numel():
            return None
        new = nn.Conv2d(first.in_channels, second.out_channels, first.kernel_size, first.stride, first.padding,
                        first.dilation, 1, True, first.padding_mode)
        w = torch.einsum("oc,cikl->oikl", w2, first.weight)
    else:
        return None
    b1 = first.bias if first.bias is not None else torch.zeros(first.weight.shape[0])
    b2 = second.bias if second.bias is not None else torch.zeros(w.shape[0])
    w2m = second.weight.reshape(second.weight.shape[0], -1)
    with torch.no_grad():
        new.weight.copy_(w.detach())
        new.bias.copy_((w2m @ b1.detach()) + b2.detach())
    return new.to(first.weight.dtype)


def fold_linear_ops(gm: fx.GraphModule) -> list[str]:
    """Fold BN into conv/linear and merge consecutive linear / (conv, 1×1 conv) layers; in place."""
    done: list[str] = []
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            layer = _module(gm, node)
            if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            user = _single_user(node)
            nxt = _module(gm, user) if user is not None else None
            bn_ok = (isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.running_mean is not None
                     and (not isinstance(layer, nn.Linear) or isinstance(nxt, nn.BatchNorm1d)))
            if bn_ok:
                _fold_bn(layer, nxt)
                user.replace_all_uses_with(node)
                gm.graph.erase_node(user)
                done.append(f"bn {user.target} -> {node.target}")
                changed = True
                break
            if nxt is not None and len(user.args) == 1:
                new = _compose(layer, nxt)
                if new is not None:
                    gm.add_submodule(str(node.target), new)
                    user.replace_all_uses_with(node)
                    gm.graph.erase_node(user)
                    done.append(f"{node.target} + {user.target}")
                    changed = True
                    break
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return done
