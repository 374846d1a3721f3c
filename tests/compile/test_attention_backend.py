"""LinearizeAttention inside torch.compile: ``surgeon.backend`` on Hugging Face and hand-written models.

The eager surgery (module swap on Hugging Face attention, FX rewrite on hand-written attention) is
saved with ``surgeon.save``; the compiled *unchanged* model then runs the same linear attention with
the saved (here: perturbed, as if trained) parameters, and its outputs match ``surgeon.restore``'s.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.passes import LinearizeAttention

from attention_graphs import Blocks, NoAttention, SdpaCausal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from attention_models import (  # noqa: E402
    VOCAB,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    tiny_qwen3,
    tiny_vit,
)

torch.set_num_threads(1)

HEDGEHOG = LinearizeAttention(feature_map="hedgehog", window=4, sinks=1)  # window + sink < 7 tokens: linear terms count
LLAMA_SITES = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def _trained(surgery: surgeon.Surgery) -> surgeon.Surgery:
    """Perturb every added parameter, as distillation would (init values would hide a loading bug)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in surgery.model.named_parameters():
            if "feature_" in name or "window_logit" in name or "linear_log_weight" in name:
                p.add_(0.3 * torch.randn_like(p))
    return surgery


def _ids(t: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, (2, t))


@pytest.fixture(scope="module")
def llama_recipes(tmp_path_factory):
    """Per attention implementation: (base model, recipe dir, eager surgered model)."""
    out = {}
    for impl in ("sdpa", "eager"):
        base = tiny_llama(attn_implementation=impl)
        directory = tmp_path_factory.mktemp(f"llama_{impl}")
        surgeon.save(_trained(surgeon.apply(base, HEDGEHOG)), directory)
        out[impl] = (base, directory, surgeon.restore(base, directory).eval())
    return out


def _check_llama(impl, llama_recipes, then):
    base, directory, eager = llama_recipes[impl]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    torch._dynamo.reset()
    backend = surgeon.backend(HEDGEHOG, recipe=directory, then=then)
    compiled = torch.compile(base, backend=backend)
    errors = {}
    with torch.no_grad():
        for t in (7, 11, 16):  # 7 compiles; 11 recompiles with dynamic sizes; 16 reuses that graph
            ids = _ids(t, t)
            got, want = compiled(ids).logits, eager(ids).logits
            errors[t] = (got - want).abs().max().item()
            assert (got - base(ids).logits).abs().max().item() > 1e-2, "compiled model still runs softmax attention"
        ids, mask = _ids(13, 13), torch.ones(2, 13, dtype=torch.long)
        mask[0, :4] = 0  # left padding: a data-dependent mask, kept and read as a key-padding mask
        errors["13 padded"] = (compiled(ids, attention_mask=mask).logits
                               - eager(ids, attention_mask=mask).logits).abs().max().item()
    print(f"{impl} -> {then}: max |compiled − eager surgery| per length: {errors}")
    # then="eager" runs the same kernels in the same order: bit-identical (README: "to 0")
    assert max(errors.values()) <= (0.0 if then == "eager" else 1.5e-7), errors
    report = backend.report
    assert [g.sites["LinearizeAttention"] for g in report.graphs] == [LLAMA_SITES] * len(report.graphs)
    assert all(g.loaded == 8 for g in report.graphs)  # 2 layers x (feature_q, feature_k, window_logit, linear_log_weight)
    assert report.recompilations <= 2 and report.graph_breaks == {}
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), "the model was changed"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_through_the_backend_matches_the_eager_surgery(impl, llama_recipes):
    _check_llama(impl, llama_recipes, "eager")


@pytest.mark.parametrize("family,build,sites", [
    ("qwen2", tiny_qwen2, LLAMA_SITES),                               # q/k/v biases
    ("qwen3", tiny_qwen3, LLAMA_SITES),                               # per-head q/k norms, explicit head_dim
    ("mistral", tiny_mistral, LLAMA_SITES),                           # config.sliding_window set
    ("gpt2", tiny_gpt2, ["transformer.h.0.attn", "transformer.h.1.attn"]),  # fused c_attn, absolute positions
])
def test_other_families_through_the_backend(family, build, sites, tmp_path):
    base = build()
    surgeon.save(_trained(surgeon.apply(base, HEDGEHOG)), tmp_path)
    eager = surgeon.restore(base, tmp_path).eval()
    torch._dynamo.reset()
    backend = surgeon.backend(HEDGEHOG, recipe=tmp_path, then="eager")
    compiled = torch.compile(base, backend=backend)
    with torch.no_grad():
        errors = [(compiled(ids).logits - eager(ids).logits).abs().max().item() for ids in (_ids(7, 0), _ids(11, 1))]
    assert max(errors) == 0.0, (family, errors)
    assert backend.report.graphs[0].sites == {"LinearizeAttention": sites} and backend.report.graphs[0].loaded == 8


def _bert_inputs(t: int) -> dict:
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, -3:] = 0  # right padding: a data-dependent mask
    return {"input_ids": _ids(t, t), "attention_mask": mask}


@pytest.mark.parametrize("family,build,inputs,sites", [
    ("bert", tiny_bert, _bert_inputs, ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]),
    ("vit", tiny_vit, lambda t: {"pixel_values": torch.randn(2, 3, 32, 32)}, ["layers.0.attention", "layers.1.attention"]),
])
def test_bidirectional_models_with_local_windows_through_the_backend(family, build, inputs, sites, tmp_path):
    """Encoders: bidirectional linear attention + softmax in a local window (2-D over ViT's patch grid)."""
    base = build()
    config = LinearizeAttention(feature_map="hedgehog", window=2, local=True)
    surgeon.save(_trained(surgeon.apply(base, config)), tmp_path)
    eager = surgeon.restore(base, tmp_path).eval()
    torch._dynamo.reset()
    backend = surgeon.backend(config, recipe=tmp_path, then="eager")
    compiled = torch.compile(base, backend=backend)
    with torch.no_grad():
        errors = [(compiled(**kw).last_hidden_state - eager(**kw).last_hidden_state).abs().max().item()
                  for kw in (inputs(7), inputs(11))]
    assert max(errors) <= 1e-4, (family, errors)
    assert backend.report.graphs[0].sites == {"LinearizeAttention": sites}


@pytest.mark.slow
def test_hf_llama_through_the_backend_with_inductor(llama_recipes):
    _check_llama("sdpa", llama_recipes, "inductor")


def test_hand_written_attention_recipe_from_the_fx_surgery(tmp_path):
    """A recipe of the symbolic_trace rewrite supplies the dynamo graph's units (same site names and paths)."""
    torch.manual_seed(0)
    model = Blocks(SdpaCausal).eval()
    x = torch.randn(2, 6, 32)
    surgeon.save(_trained(surgeon.apply(model, HEDGEHOG, example_inputs=(x,))), tmp_path)
    eager = surgeon.restore(model, tmp_path)
    torch._dynamo.reset()
    backend = surgeon.backend(HEDGEHOG, recipe=tmp_path, then="eager")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for shape in ((2, 6), (3, 9), (1, 17)):
            x = torch.randn(*shape, 32)
            err = (compiled(x) - eager(x)).abs().max().item()
            assert err <= 1e-5, (shape, err)
    g = backend.report.graphs[0]
    assert g.sites == {"LinearizeAttention": ["blocks.0.sdpa", "blocks.1.sdpa"]} and g.loaded == 8


def test_a_decode_step_is_refused_with_a_reason(llama_recipes):
    """One query against cached keys: the graph unit has no recurrent state, so the backend says so."""
    base, directory, _ = llama_recipes["sdpa"]
    torch._dynamo.reset()
    compiled = torch.compile(base, backend=surgeon.backend(HEDGEHOG, recipe=directory, then="eager"))
    ids = _ids(6, 0)
    with torch.no_grad():
        cache = compiled(ids, use_cache=True).past_key_values
        with pytest.raises(Exception, match="1 queries to 7 keys: a decode step"):
            compiled(ids[:, -1:], past_key_values=cache, use_cache=True)


def test_surgeon_compile_takes_passes_and_layers_from_the_recipe(tmp_path):
    """Only layer 1 was linearized eagerly: the compiled model rewrites exactly that layer."""
    base = tiny_llama()
    surgeon.save(_trained(surgeon.apply(base, LinearizeAttention(feature_map="hedgehog", window=4, layers=[1]))),
                 tmp_path)
    eager = surgeon.restore(base, tmp_path).eval()
    torch._dynamo.reset()
    compiled = surgeon.compile(base, recipe=tmp_path, then="eager")
    with torch.no_grad():
        for t in (7, 12):
            ids = _ids(t, t)
            assert (compiled(ids).logits - eager(ids).logits).abs().max().item() <= 1e-4
    graphs = compiled.surgeon_backend.report.graphs
    assert [g.sites for g in graphs] == [{"LinearizeAttention": ["model.layers.1.self_attn"]}] * len(graphs)
    assert all(g.loaded == 4 for g in graphs)


def test_backend_without_recipe_for_trained_parameters_fails_and_changes_nothing():
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = _ids(5, 0)
    with torch.no_grad():
        logits = base(ids).logits
    with pytest.raises(ConfigError) as err:
        surgeon.compile(base, HEDGEHOG, then="eager")
    message = str(err.value)
    assert "hedgehog feature maps" in message and "model.layers.0.self_attn" in message and "recipe" in message
    with pytest.raises(ConfigError, match="no recipe was given"):
        surgeon.backend(LinearizeAttention(feature_map="elu1", window=8))   # the window's mixing factors
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with torch.no_grad():
        assert torch.equal(base(ids).logits, logits)


def test_backend_on_a_model_without_attention_reports_zero_sites():
    torch.manual_seed(0)
    model = NoAttention().eval()
    torch._dynamo.reset()
    backend = surgeon.backend(LinearizeAttention(feature_map="elu1", window=0), then="eager")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    graphs = backend.report.graphs
    assert len(graphs) == 1 and graphs[0].sites == {"LinearizeAttention": []} and backend.report.changed == 0


@pytest.mark.slow
def test_smollm2_through_the_backend(tmp_path):
    """Real weights (30 layers, 9 q / 3 kv heads): no graph break, every layer rewritten, exact recipe parity."""
    from surgeon.models.smollm2 import load_smollm2

    base, tok = load_smollm2()
    base.eval()
    config = LinearizeAttention(feature_map="hedgehog", window=64)
    surgeon.save(_trained(surgeon.apply(base, config)), tmp_path)
    eager = surgeon.restore(base, tmp_path).eval()
    torch._dynamo.reset()
    backend = surgeon.backend(config, recipe=tmp_path, then="eager", model=base)
    compiled = torch.compile(base, backend=backend)
    ids = tok("The capital of France is Paris. " * 40, return_tensors="pt").input_ids
    errors = {}
    with torch.no_grad():
        for t in (96, 160, 200):
            errors[t] = (compiled(ids[:, :t]).logits - eager(ids[:, :t]).logits).abs().max().item()
    print(f"SmolLM2 max |compiled − eager surgery|: {errors}; graph breaks: {backend.report.graph_breaks}")
    assert max(errors.values()) == 0.0, errors             # then="eager": the same kernels (README: exact parity)
    assert backend.report.graph_breaks == {} and backend.report.recompilations <= 1
    expected = [f"model.layers.{i}.self_attn" for i in range(30)]
    assert all(g.sites["LinearizeAttention"] == expected and g.loaded == 120 for g in backend.report.graphs)
