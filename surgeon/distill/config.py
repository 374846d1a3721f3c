"""``DistillConfig``: the two-stage recovery of a linearized model (attention transfer, then LoRA + KD).

Stage 1 (attention transfer, LoLCATs): every ``LinearAttention`` layer computes the original softmax
attention inside itself under ``no_grad`` and its new parameters (feature maps, window weights,
gates) are trained to match it: ``mse_weight · MSE(y_linear, y_softmax)`` on the per-head outputs
before ``o_proj``. Layer inputs are the teacher's activations (teacher forcing), so layers train
independently: ``transfer_mode="layer"`` / ``"block"`` caches each layer's inputs once and trains one
layer (or ``block_size`` layers) at a time; ``"joint"`` runs the whole model per step.

Stage 2 (LoRA, peft): adapters on ``lora_targets``; loss = ``kd_weight · τ² · KL(teacher ‖ student)``
at temperature τ, optionally ``+ ce_weight · next-token CE``. The teacher is the same model with
adapters disabled and softmax attention teacher-forced (no second copy), or an explicit ``teacher``.

Example:
    >>> cfg = DistillConfig(transfer_steps=10, lora_steps=5, seq_len=64)
    >>> cfg.validate(); cfg.to_dict()["lora_r"], cfg.lora_alpha, cfg.lora_targets
    (8, 16.0, ['q_proj', 'k_proj', 'v_proj', 'o_proj'])
    >>> DistillConfig(transfer_mode="sometimes").validate()
    Traceback (most recent call last):
    ...
    surgeon.core.errors.ConfigError: DistillConfig.transfer_mode: 'sometimes' is not one of ['layer', 'block', 'joint']
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from surgeon.core.config import TypedConfig
from surgeon.core.errors import ConfigError

Stage = Literal["transfer", "lora"]

# fields that do not change what is computed: a checkpoint stays valid when they change
NON_SEMANTIC = {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "progress", "log_every",
                "output_dir", "max_minutes", "cache_gb"}


@dataclass(kw_only=True)
class DistillConfig(TypedConfig):
    """Configuration of ``surgeon.distill``; every field has a LoLCATs-like default.

    Args:
        stages: which stages run, in order (``["transfer", "lora"]``).
        seq_len: tokens per packed training sequence.
        batch_size: sequences per micro-batch (per process).
        grad_accum: micro-batches per optimizer step.
        seed: seeds data order, LoRA init and dropout (everything random).
        transfer_steps: at most this many optimizer steps of stage 1 per layer block ("layer"/"block") or in
            total ("joint"); a block stops earlier when its held-out MSE plateaus.
        transfer_heldout: fraction of the cached sequences held out to decide when a block has converged
            (layer/block mode; at least one sequence).
        transfer_eval_every / transfer_patience / transfer_min_delta: the held-out MSE is checked every
            ``transfer_eval_every`` steps; a block stops after ``transfer_patience`` checks without a
            relative improvement of ``transfer_min_delta``, keeping its best parameters.
        transfer_lr: stage-1 learning rate (LoLCATs: 1e-2).
        transfer_mode: ``layer`` (one layer at a time on cached inputs), ``block`` (``block_size`` layers
            at a time), ``joint`` (all layers, one model forward per step).
        block_size: layers per block for ``transfer_mode="block"``.
        transfer_packs: sequences whose layer inputs are cached for ``layer``/``block`` mode (``None``:
            ``transfer_steps · batch_size · grad_accum``, i.e. one pass over fresh data).
        mse_weight: multiplier of the attention-output MSE (LoLCATs: 1000).
        cache_gb: memory for cached layer inputs; layers are captured in as many passes as needed.
        keep_softmax: after stage 1, restore the k layers with the highest transfer error to their
            original softmax attention.
        lora_steps: optimizer steps of stage 2.
        lora_lr: stage-2 learning rate.
        lora_r / lora_alpha / lora_dropout / lora_targets: the peft ``LoraConfig`` (LoLCATs: r=8, α=16,
            dropout 0, q/k/v/o).
        lora_train_feature_maps: also train the stage-1 parameters in stage 2 (LoLCATs freezes them).
            With ``lora_targets=[]`` stage 2 trains *only* them (no adapters): every weight the original
            model had stays untouched, so on prompts no longer than the window (where the linear branch
            sees no token) the distilled model still computes the original exactly.
        temperature: softmax temperature of the KD loss (the KL is scaled by τ²).
        kd_weight / ce_weight: weights of the KL-to-teacher and next-token cross-entropy terms.
        merge: ``merge_and_unload`` the adapters at the end (plain model, ready for export).
        weight_decay / warmup_steps / scheduler / max_grad_norm: optimizer (AdamW) settings;
            ``scheduler`` is ``constant``, ``cosine`` (after linear warm-up) or ``plateau``
            (ReduceLROnPlateau on the step loss, as LoLCATs stage 1).
        mixed_precision: ``no`` or ``bf16`` (accelerate autocast; weights stay fp32).
        shard: ``None`` (every process holds the whole model; gradients all-reduced) or ``"fsdp"``: under
            ``torchrun`` / ``accelerate launch`` with N processes, stage 2 and ``transfer_mode="joint"``
            run on parameters sharded by torch FSDP2 ``fully_shard`` (each process holds 1/N of every
            weight; gradients reduce-scattered); ``layer`` / ``block`` stage 1 (cached layer inputs) stays
            replicated. The model comes in and goes out whole. One process: no effect.
        checkpoint_dir / checkpoint_every / keep_checkpoints: where and how often (optimizer steps) to
            checkpoint; ``resume=True`` continues from the newest checkpoint there.
        max_minutes: wall-clock training budget per stage (stops early, recorded in the result; stage 1's
            capture of layer inputs comes on top); ``None``: none.
        output_dir: where loss curves (JSON + PNG) and the per-layer transfer report are written.
        log_every: loss-curve resolution in optimizer steps; progress: tqdm bars.
    """

    stages: list[Stage] = field(default_factory=lambda: ["transfer", "lora"])
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    # stage 1
    transfer_steps: int = 100
    transfer_lr: float = 1e-2
    transfer_mode: Literal["layer", "block", "joint"] = "layer"
    block_size: int = 1
    transfer_packs: int | None = None
    transfer_heldout: float = 0.1
    transfer_eval_every: int = 10
    transfer_patience: int = 3
    transfer_min_delta: float = 0.01
    mse_weight: float = 1000.0
    cache_gb: float = 4.0
    keep_softmax: int = 0
    # stage 2
    lora_steps: int = 100
    lora_lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_train_feature_maps: bool = False
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    merge: bool = True
    # optimizer
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: Literal["constant", "cosine", "plateau"] = "constant"
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16"] = "no"
    shard: Literal["fsdp"] | None = None
    # bookkeeping
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    max_minutes: float | None = None
    output_dir: str | None = None
    log_every: int = 1
    progress: bool = True

    def check(self) -> None:
        if not self.stages:
            raise ConfigError("DistillConfig.stages is empty: use ['transfer'], ['lora'] or ['transfer', 'lora']")
        if len(set(self.stages)) != len(self.stages) or self.stages not in (["transfer"], ["lora"],
                                                                           ["transfer", "lora"]):
            raise ConfigError(f"DistillConfig.stages={self.stages}: use ['transfer'], ['lora'] or "
                              "['transfer', 'lora'] (transfer always runs before LoRA)")
        for name in ("seq_len", "batch_size", "grad_accum", "block_size", "lora_r", "log_every", "keep_checkpoints",
                     "checkpoint_every", "transfer_eval_every", "transfer_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("transfer_steps", "lora_steps", "keep_softmax", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("transfer_lr", "lora_lr", "temperature", "lora_alpha", "cache_gb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"DistillConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("mse_weight", "kd_weight", "ce_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.kd_weight == 0 and self.ce_weight == 0 and "lora" in self.stages:
            raise ConfigError("DistillConfig: kd_weight and ce_weight are both 0, so stage 2 has no loss; "
                              "set kd_weight > 0 (distillation) and/or ce_weight > 0 (next-token loss)")
        if not 0.0 < self.transfer_heldout < 1.0:
            raise ConfigError(f"DistillConfig.transfer_heldout must be in (0, 1), got {self.transfer_heldout}")
        if self.transfer_min_delta < 0:
            raise ConfigError(f"DistillConfig.transfer_min_delta must be >= 0, got {self.transfer_min_delta}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"DistillConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets and not self.lora_train_feature_maps:
            raise ConfigError("DistillConfig.lora_targets is empty and lora_train_feature_maps=False, so stage 2 "
                              "trains nothing: name the projections to adapt, e.g. ['q_proj', 'k_proj', 'v_proj', "
                              "'o_proj'], or set lora_train_feature_maps=True to train only the linear branch")
        if self.transfer_packs is not None and self.transfer_packs < 1:
            raise ConfigError(f"DistillConfig.transfer_packs must be >= 1 or None, got {self.transfer_packs}")
        if self.transfer_mode != "block" and self.block_size != 1:
            raise ConfigError(f"DistillConfig.block_size={self.block_size} is used only with transfer_mode='block' "
                              f"(got transfer_mode={self.transfer_mode!r})")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"DistillConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"DistillConfig.max_minutes must be > 0 or None, got {self.max_minutes}")
        if self.shard is not None and self.checkpoint_dir:
            raise ConfigError("DistillConfig(shard='fsdp') cannot checkpoint yet (each process holds only its "
                              "shards): set checkpoint_dir=None, or shard=None to checkpoint a replicated run")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("DistillConfig.resume=True needs checkpoint_dir (where the checkpoints are)")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change what training computes (a checkpoint is only valid for the same ones)."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_SEMANTIC}

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


STAGE2_RECIPES = ("lora", "linear-branch")


def stage2_fields(recipe: str) -> dict[str, Any]:
    """The ``DistillConfig`` fields of a stage-2 recipe: ``"lora"`` (the defaults: adapters on q/k/v/o) or
    ``"linear-branch"`` (no adapters; only the parameters stage 1 added train).

    Example:
        >>> stage2_fields("linear-branch")
        {'lora_targets': [], 'lora_train_feature_maps': True}
    """
    if recipe not in STAGE2_RECIPES:
        raise ConfigError(f"stage 2 recipe {recipe!r}: use 'linear-branch' (only the linear branch trains) or 'lora' "
                          "(LoRA adapters on q/k/v/o)")
    return {"lora_targets": [], "lora_train_feature_maps": True} if recipe == "linear-branch" else {}


__all__ = ["DistillConfig", "stage2_fields", "STAGE2_RECIPES"]
