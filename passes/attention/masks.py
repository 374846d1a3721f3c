"""Attention masks in the one form the swapped module reads: a tensor (or None).

transformers builds a ``BlockMask`` for ``attn_implementation="flex_attention"``; its token-level
mask is its ``mask_mod`` evaluated on the (query, key) grid, materialised here as a boolean
(B, 1, Q, K) tensor (True = may attend), which the module reads like SDPA's boolean masks.

Example:
    >>> import torch
    >>> from torch.nn.attention.flex_attention import create_block_mask
    >>> block = create_block_mask(lambda b, h, q, k: q >= k, B=None, H=None, Q_LEN=4, KV_LEN=4, device="cpu")
    >>> dense_mask(block)[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    >>> dense_mask(None) is None
    True
"""
from __future__ import annotations

from typing import Any

import torch


def dense_mask(mask: Any) -> Any:
    """A flex-attention ``BlockMask`` as a bool (B, 1, Q, K) tensor; anything else unchanged."""
    if type(mask).__name__ != "BlockMask" or not hasattr(mask, "mask_mod"):
        return mask
    from torch.nn.attention.flex_attention import create_mask

    q_len, kv_len = mask.seq_lengths
    batch = mask.kv_num_blocks.shape[0]
    device = mask.kv_num_blocks.device
    return create_mask(mask.mask_mod, batch, 1, q_len, kv_len, device=device).to(torch.bool)
