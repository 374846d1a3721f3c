"""The module-swap path on a real (tiny, randomly initialised) Hugging Face Llama.

A small pass defined here wraps every MLP block (found structurally: gate/up/down projections) in a
unit with a learnable output scale initialised to 1, and records the change in the HF config. It
must be exact at init, keep ``generate()`` working, roll back bit-identically on failure, and replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import surgeon
import surgeon.core.handler as pass_api
from surgeon.core.config import PassConfig


class ScaledBlock(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * self.inner(x)


@dataclass(kw_only=True)
class ScaleMLPs(PassConfig):
    targets: str | list[str] | None = None


@surgeon.register_pass(ScaleMLPs)
class ScaleMLPsHandler(surgeon.ModuleSwapHandler):
    def matches(self, module, fqn, config):
        return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))

    def replacement(self, module, site, config, ctx):
        return ScaledBlock(module)

    def rewrite(self, model, config, plan, ctx):
        model = super().rewrite(model, config, plan, ctx)
        model.config.scaled_mlps = [s.name for s in plan.sites]
        return model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_swap_is_exact_and_generate_still_works():
    model = tiny_llama()
    ids = torch.randint(3, 97, (2, 11))
    ref = model(ids).logits
    s = surgeon.apply(model, ScaleMLPs())
    assert [site.name for site in s.recipe.entries[0].sites] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert isinstance(s.model.model.layers[1].mlp, ScaledBlock)
    assert s.model.model.layers[1].mlp.inner.gate_proj is not model.model.layers[1].mlp.gate_proj  # a copy
    assert torch.equal(s.model(ids).logits, ref)
    out_ref = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    out = s.model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, out_ref)
    assert s.model.config.scaled_mlps == ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]
    assert not hasattr(model.config, "scaled_mlps")


def test_targets_select_modules_and_unknown_target_lists_names():
    model = tiny_llama()
    s = surgeon.apply(model, ScaleMLPs(targets=["layers.1.mlp"]))
    assert [site.name for site in s.recipe.entries[0].sites] == ["model.layers.1.mlp"]
    with pytest.raises(surgeon.SelectionError, match=r"model.layers.0.mlp, model.layers.1.mlp, model.layers.2.mlp"):
        surgeon.apply(model, ScaleMLPs(targets=["layers.7.mlp"]))


def test_fault_at_every_swap_rolls_back_in_place(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(3, 97, (2, 9))
    ref = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    for index in range(3):
        calls = {"n": 0}
        real = pass_api.set_submodule

        def flaky(root, path, module, _index=index, _calls=calls, _real=real):
            if _calls["n"] == _index:
                raise RuntimeError(f"disk full at swap {_index}")
            _calls["n"] += 1
            _real(root, path, module)

        with monkeypatch.context() as mp:
            mp.setattr(pass_api, "set_submodule", flaky)
            with pytest.raises(surgeon.RewriteError, match=f"disk full at swap {index}"):
                surgeon.apply(model, ScaleMLPs(), inplace=True)
        assert [(n, type(m).__name__) for n, m in model.named_modules()] == tree
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert torch.equal(model(ids).logits, ref)
        assert not hasattr(model.config, "scaled_mlps")

    with monkeypatch.context() as mp:  # a failure after the swap (in the config edit) also rolls back
        mp.setattr(ScaleMLPsHandler, "rewrite",
                   lambda self, m, c, p, ctx: (surgeon.ModuleSwapHandler.rewrite(self, m, c, p, ctx), 1 / 0))
        with pytest.raises(surgeon.RewriteError, match="ZeroDivisionError"):
            surgeon.apply(model, ScaleMLPs(), inplace=True)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == tree
    assert torch.equal(model(ids).logits, ref)


def test_module_swap_replays_from_a_recipe(tmp_path):
    s = surgeon.apply(tiny_llama(), ScaleMLPs())
    with torch.no_grad():
        for i, layer in enumerate(s.model.model.layers):
            layer.mlp.scale.fill_(0.5 + i)
    surgeon.save(s, tmp_path)
    restored = surgeon.restore(tiny_llama(seed=5), tmp_path)
    ids = torch.randint(3, 97, (3, 7))
    assert torch.equal(restored(ids).logits, s.model(ids).logits)
    assert restored.config.scaled_mlps == s.model.config.scaled_mlps
