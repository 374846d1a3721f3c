"""Feature maps φ for linear attention: φ(q)·φ(k) stands in for exp(q·k).

Inputs are queries or keys already multiplied by √scale (scale is the model's attention scaling,
usually 1/√d), so q·k is the scaled score s. Every map gives φ(q)·φ(k) ≥ 0, which keeps the
denominators of normalised linear attention positive. Queries and keys use separate instances.

| kind       | φ(x)                                                        | out_dim          |
|------------|-------------------------------------------------------------|------------------|
| "elu1"     | 1 + elu(x)                                                  | D                |
| "relu"     | relu(x)                                                     | D                |
| "hedgehog" | [softmax(x W_h), softmax(−x W_h)], W_h learnable (D, f)     | 2f               |
| "taylor2"  | [1, x, x_i x_j (i<j), x_i²/√2]: φ(q)·φ(k) = 1 + s + s²/2     | 1 + D + D(D+1)/2 |

Hedgehog initialisation: W_h = 1.5·D^¼·I (identity tiled or cut to f columns), the same for the
query and key maps. On random q, k with score std 0.7–1.5 this gain gave the lowest KL between
normalised linear and softmax attention weights of the gains tried (0.5–3.0 ·D^¼, D = 32/64/128):
about 25–45% below elu1 (random orthogonal or Gaussian W, independent for q and k, were worse than
elu1). ``tests/ops/test_feature_maps.py`` checks it stays better than elu1.

Example:
    >>> import torch
    >>> fm = make_feature_map("hedgehog", n_heads=2, head_dim=8, feature_dim=4)
    >>> fm(torch.randn(1, 2, 5, 8)).shape, fm.out_dim
    (torch.Size([1, 2, 5, 8]), 8)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from surgeon.core.errors import ConfigError

FEATURE_MAP_KINDS = ("elu1", "relu", "hedgehog", "taylor2")
HEDGEHOG_EPS = 1e-12
HEDGEHOG_INIT_GAIN = 1.5


def feature_dim_of(kind: str, head_dim: int, feature_dim: int | None = None) -> int:
    """Output size F of a feature map (what the recurrent state's third axis holds).

    Example:
        >>> feature_dim_of("taylor2", 64), feature_dim_of("hedgehog", 64), feature_dim_of("elu1", 64)
        (2145, 128, 64)
    """
    _check_kind(kind)
    if kind == "hedgehog":
        return 2 * (feature_dim or head_dim)
    if kind == "taylor2":
        return 1 + head_dim + head_dim * (head_dim + 1) // 2
    return head_dim


def hedgehog_init(n_heads: int, head_dim: int, feature_dim: int) -> Tensor:
    """Per-head projections (n_heads, D, f): HEDGEHOG_INIT_GAIN·D^¼ times the identity (tiled or cut to f).

    Deterministic, so the separate query and key maps start equal.

    Example:
        >>> w = hedgehog_init(2, 4, 6)
        >>> w.shape, round(w[0, 1, 5].item(), 3), w[0, 1, 4].item()
        (torch.Size([2, 4, 6]), 2.121, 0.0)
    """
    cols = torch.arange(feature_dim) % head_dim
    eye = torch.eye(head_dim)[:, cols] * HEDGEHOG_INIT_GAIN * head_dim ** 0.25
    return eye.expand(n_heads, head_dim, feature_dim).clone()


class FeatureMap(nn.Module):
    """φ applied per head: (B, n_heads, T, head_dim) -> (B, n_heads, T, out_dim).

    Build with :func:`make_feature_map`. Only "hedgehog" has parameters (``weight``, (n_heads, D, f)).

    Example:
        >>> import torch
        >>> fm = FeatureMap("taylor2", n_heads=1, head_dim=3)
        >>> q, k = torch.randn(2, 1, 1, 1, 3, dtype=torch.float64)
        >>> s = (q * k).sum()
        >>> bool(torch.isclose((fm(q) * fm(k)).sum(), 1 + s + s**2 / 2))
        True
    """

    def __init__(self, kind: str, n_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        _check_kind(kind)
        _check_positive("n_heads", n_heads)
        _check_positive("head_dim", head_dim)
        if feature_dim is not None:
            _check_positive("feature_dim", feature_dim)
            if kind != "hedgehog":
                raise ConfigError(f"feature_dim={feature_dim} only applies to kind='hedgehog' (got kind={kind!r}); "
                                  "leave feature_dim=None")
        self.kind, self.n_heads, self.head_dim = kind, n_heads, head_dim
        self.out_dim = feature_dim_of(kind, head_dim, feature_dim)
        if kind == "hedgehog":
            self.weight = nn.Parameter(hedgehog_init(n_heads, head_dim, feature_dim or head_dim))
        if kind == "taylor2":
            i, j = torch.triu_indices(head_dim, head_dim)
            self.register_buffer("_rows", i, persistent=False)
            self.register_buffer("_cols", j, persistent=False)
            self.register_buffer("_diagonal", i == j, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.n_heads or x.shape[-1] != self.head_dim:
            raise ConfigError(f"FeatureMap({self.kind!r}) expects (B, {self.n_heads}, T, {self.head_dim}); "
                              f"got {tuple(x.shape)}: pass per-head q or k (heads on dim 1)")
        if self.kind == "elu1":
            return 1 + F.elu(x)
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind == "hedgehog":
            return self._hedgehog(x)
        return self._taylor2(x)

    def _hedgehog(self, x: Tensor) -> Tensor:
        """Computed in float32 at least (bf16 exponents of |z| ≈ 10 lose ~1e-2), returned in x.dtype."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        z = torch.einsum("bhtd,hdf->bhtf", x.to(dtype), self.weight.to(dtype))
        phi = torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1).clamp_min(HEDGEHOG_EPS)
        return phi.to(x.dtype)

    def _taylor2(self, x: Tensor) -> Tensor:
        pairs = x[..., self._rows] * x[..., self._cols]
        pairs = torch.where(self._diagonal, pairs * 0.5 ** 0.5, pairs)   # x_i²/√2 on the diagonal
        return torch.cat([torch.ones_like(x[..., :1]), x, pairs], dim=-1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_heads={self.n_heads}, head_dim={self.head_dim}, out_dim={self.out_dim}"


def make_feature_map(kind: str, n_heads: int, head_dim: int, feature_dim: int | None = None) -> FeatureMap:
    """A feature map of the given kind ("elu1", "relu", "hedgehog", "taylor2") for n_heads heads.

    ``feature_dim`` (hedgehog only) is f, the size of each softmax half (default head_dim).

    Example:
        >>> make_feature_map("elu1", n_heads=3, head_dim=64)
        FeatureMap(kind='elu1', n_heads=3, head_dim=64, out_dim=64)
    """
    return FeatureMap(kind, n_heads, head_dim, feature_dim)


def _check_kind(kind: object) -> None:
    if kind not in FEATURE_MAP_KINDS:
        raise ConfigError(f"unknown feature map kind={kind!r}; choose one of {', '.join(map(repr, FEATURE_MAP_KINDS))}")


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
