"""Stage 2: LoRA adapters (peft) trained by knowledge distillation from the softmax teacher.

The teacher costs no second copy of the model: with the adapters disabled and every linearized layer
in transfer mode, the same model computes exactly the original softmax model's logits. An explicit
``teacher`` model works too (its vocabulary must match). Loss per token:
``kd_weight · τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) + ce_weight · CE(s, next token)``.

Example:
    >>> t = torch.tensor([[[2.0, 0.0, -1.0]]]); s = torch.tensor([[[1.0, 0.5, -1.0]]])
    >>> round(float(kd_loss(s, t, temperature=1.0)), 4), float(kd_loss(t, t, temperature=2.0))
    (0.1718, 0.0)
"""
from __future__ import annotations

import contextlib
import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.distill.transfer import linear_units, new_parameters, set_transfer
from surgeon.ops.losses import distillation_kl
from surgeon.core.errors import ConfigError


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · KL(teacher ‖ student) at temperature τ, mean over tokens (logits ``(..., vocab)``)."""
    return distillation_kl(student, teacher, temperature).mean()


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def linear_module_suffixes(model: nn.Module) -> list[str]:
    return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str], seed: int):
    """Wrap ``model`` with peft LoRA adapters on ``targets`` (module-name suffixes, as peft matches them)."""
    from peft import LoraConfig, get_peft_model

    present = linear_module_suffixes(model)
    missing = [t for t in targets if t not in present]
    if len(missing) == len(targets):
        raise ConfigError(f"lora_targets {targets} match no linear module of {type(model).__name__}; its linear "
                          f"modules end in {present}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=[t for t in targets if t in present],
                     bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    return peft_model


def lora_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


def unfreeze_feature_maps(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for _, unit in linear_units(model):
        for p in new_parameters(unit).values():
            p.requires_grad_(True)
            params.append(p)
    return params


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """A teacher must share the student's vocabulary (same logit dimension, same size)."""
    def vocab(m: nn.Module) -> int | None:
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        if head is not None and hasattr(head, "out_features"):
            return head.out_features
        return getattr(getattr(m, "config", None), "vocab_size", None)

    vs, vt = vocab(student), vocab(teacher)
    if vs is None or vt is None or vs != vt:
        raise ConfigError(f"the teacher's vocabulary ({vt} tokens, {type(teacher).__name__}) differs from the "
                          f"student's ({vs} tokens): knowledge distillation compares logits token by token, so "
                          "the teacher must use the same tokenizer; pass the original model the student was "
                          "linearized from (or teacher=None to use the student's own softmax attention)")


@contextlib.contextmanager
def self_teacher(peft_model: nn.Module):
    """Inside: the model computes the original softmax model (adapters off, attention teacher-forced)."""
    disable = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()
    with disable:
        set_transfer(peft_model, True)
        try:
            yield
        finally:
            set_transfer(peft_model, False)


@torch.no_grad()
def teacher_logits(peft_model: nn.Module, teacher: nn.Module | None, ids: torch.Tensor) -> torch.Tensor:
    if teacher is not None:
        return teacher(input_ids=ids, use_cache=False).logits
    with self_teacher(peft_model):
        was = peft_model.training
        peft_model.eval()
        try:
            return peft_model(input_ids=ids, use_cache=False).logits
        finally:
            peft_model.train(was)


def merge(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the projections and return the plain model (peft ``merge_and_unload``)."""
    return peft_model.merge_and_unload()


__all__ = ["kd_loss", "next_token_ce", "add_lora", "lora_parameters", "check_teacher", "teacher_logits", "merge",
           "self_teacher", "unfreeze_feature_maps"]

