"""Training losses shared by the passes that fit on data and by ``surgeon.distill``.

Example:
    >>> import torch
    >>> logits = torch.randn(3, 5)
    >>> float(distillation_kl(logits, logits, temperature=2.0).abs().max()) < 1e-6
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``τ² · KL(teacher ‖ student)`` at temperature ``τ`` per position (logits ``(..., classes)``, computed in
    float32 or wider; reduce it yourself)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1) * temperature ** 2
