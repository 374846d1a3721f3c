"""One attention pattern description, three graph sources: symbolic_trace, dynamo (a torch.compile
backend's graph) and torch.export (before and after run_decompositions).

For each hand-written attention module the graph rewrite must find the same sites with the same names,
heads, GQA grouping and causality, leave no softmax / SDPA behind, and compute what the eager
``surgeon.apply`` (symbolic_trace) result computes, in float64, at a shape the graph never saw.
"""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.fx import patterns as graph_patterns
from surgeon.core.errors import PlanError
from surgeon.core.handler import PassContext, handler_for
from surgeon.passes import LinearizeAttention

from attention_graphs import CAUSAL, MODELS, SOURCES, NoAttention, build, first, graph_of, inputs_for

torch.set_num_threads(1)

SEEN, UNSEEN = (2, 6), (3, 9)  # (batch, tokens) of the example input / of the parity check

# name -> (site leaf per source family, heads/kv_heads, spelling in the traced graph)
EXPECTED = {
    "matmul_causal_gqa": ("softmax", (4, 2), "matmul/transpose/additive/softmax/matmul"),
    "einsum_bidirectional": ("softmax", (4, 4), "einsum/softmax/einsum"),
    "sdpa_causal_gqa": ("sdpa", (4, 2), "sdpa/is_causal"),
    "sdpa_bool_mask": ("sdpa", (4, 4), "sdpa/mask"),
}
CASES = [(m, s) for m in MODELS for s in SOURCES]


def _config(name: str) -> LinearizeAttention:
    return LinearizeAttention(feature_map="hedgehog", window=3 if CAUSAL[name] else 0)


def _x(shape: tuple[int, int], seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape, 32, dtype=torch.float64)


def rewrite(gm, config, inputs):
    """What surgeon.backend does with a captured graph: plan, then rewrite (same handler as surgeon.apply)."""
    handler = handler_for(config)
    ctx = PassContext(example_inputs=inputs)
    plan = handler.plan(gm, config, ctx)
    return handler.rewrite(gm, config, plan, ctx), plan


@pytest.mark.parametrize("name,source", CASES)
def test_same_sites_and_parity_on_every_graph_source(name, source):
    model = build(name)
    x, x_new = _x(SEEN, 0), _x(UNSEEN, 1)
    config = _config(name)
    eager = surgeon.apply(model, config, example_inputs=(x,))   # symbolic_trace path, the reference
    want = eager.model(x_new)

    graph, inputs = graph_of(source, model, x)
    out, plan = rewrite(graph, config, inputs)

    leaf, (heads, kv_heads), spelling = EXPECTED[name]
    if source == "export_decomposed":  # core ATen: matmul is bmm on views, SDPA decomposes into its math
        leaf = "softmax"   # core-ATen einsum: size-1 dims unsqueezed and permuted around the bmm
        spelling = "bmm/view/softmax/bmm" if name.startswith("einsum") else "bmm/permute/additive/softmax/bmm"
    assert plan.names == [f"blocks.0.{leaf}", f"blocks.1.{leaf}"]
    for site in plan.sites:
        assert (site.data["heads"], site.data["kv_heads"], site.data["causal"]) == (heads, kv_heads, CAUSAL[name])
        assert site.data["unit"] == site.scope + ".linear_attention"
        if spelling is not None:
            assert site.data["spelling"] == spelling
    left = [n for n in out.graph.nodes if graph_patterns.is_op(n, "softmax") or graph_patterns.is_op(n, "sdpa")]
    assert left == [], f"softmax attention left in the {source} graph: {left}"

    # same unit paths as the eager surgery: its trained parameters load by name
    ours = {k: v for k, v in out.state_dict().items() if "linear_attention" in k}
    theirs = {k: v for k, v in eager.model.state_dict().items() if "linear_attention" in k}
    assert sorted(ours) == sorted(theirs) and len(ours) >= 4
    with torch.no_grad():
        for key, value in theirs.items():
            ours[key].copy_(value)
    got = first(out(*inputs_for(source, model, x_new)))
    assert got.shape == want.shape == (*UNSEEN, 32)
    err = (got - want).abs().max().item()
    assert err <= 1e-10, f"{name} on {source}: max |graph − eager| = {err:.3e}"
    changed = (got - model(x_new)).abs().max().item()
    assert changed > 1e-3, "the rewritten graph still computes softmax attention"


@pytest.mark.parametrize("source", ["dynamo", "export"])
def test_gqa_keys_are_read_before_repeat_kv(source):
    """The unit takes (B, H_kv, T, D) keys: one feature map per key head, as the module-swap path."""
    model = build("matmul_causal_gqa")
    x = _x(SEEN, 0)
    graph, inputs = graph_of(source, model, x)
    out, plan = rewrite(graph, _config("matmul_causal_gqa"), inputs)
    assert [s.data["repeat_kv"] for s in plan.sites] == [2, 2]
    units = [m for m in out.modules() if type(m).__name__ == "FxLinearAttention"]
    assert [(u.n_heads, u.n_kv_heads, u.feature_k.weight.shape[0]) for u in units] == [(4, 2, 2)] * 2


@pytest.mark.parametrize("source", ["dynamo", "export", "export_decomposed"])
def test_a_graph_without_attention(source):
    """No attention: the backend's allow_empty gives zero sites; without it, a clear error."""
    torch.manual_seed(0)
    model = NoAttention().double().eval()
    x = _x(SEEN, 0)
    graph, inputs = graph_of(source, model, x)
    config = LinearizeAttention(feature_map="elu1", window=0, causal=None)
    plan = handler_for(config).plan(graph, config, PassContext(example_inputs=inputs, allow_empty=True))
    assert plan.sites == [] and plan.state["bases"] == []
    with pytest.raises(PlanError, match="found no attention"):
        handler_for(config).plan(graph, config, PassContext(example_inputs=inputs))


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(ids, use_cache=False).logits


@pytest.mark.parametrize("impl,decompose", [("sdpa", False), ("eager", True)])
def test_hf_llama_export_graph_matches_the_module_swap(impl, decompose):
    """torch.export of a tiny Llama: sites named by the attention modules, GQA undone, the built causal mask
    recognised and dropped; with the module swap's trained units copied over, the logits agree."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
    from attention_models import tiny_llama

    base = tiny_llama(attn_implementation=impl)
    config = LinearizeAttention(feature_map="hedgehog", window=4)
    swapped = surgeon.apply(base, config).model
    torch.manual_seed(0)
    ids, ids_new = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 12))
    tokens = torch.export.Dim("tokens", min=2, max=256)
    ep = torch.export.export(_Logits(base).eval(), (ids,), dynamic_shapes=({1: tokens},))
    gm = (ep.run_decompositions() if decompose else ep).module()
    s = surgeon.apply(gm, config, example_inputs=(ids,))
    sites = s.recipe.entries[0].sites
    assert [x.name for x in sites] == ["m.model.layers.0.self_attn", "m.model.layers.1.self_attn"]
    assert all(x.op == "LlamaAttention" and x.data["kv_heads"] == 2 and x.data["repeat_kv"] in (1, 3)
               and x.data["causal"] and x.data["masks"] == [] for x in sites)
    with torch.no_grad():
        for x in sites:
            unit = s.model.get_submodule(x.data["unit"])
            trained = swapped.get_submodule(x.data["module"].removeprefix("m."))
            unit.load_state_dict({k: v for k, v in trained.state_dict().items()
                                  if k.startswith(("feature_", "window_logit", "linear_log_weight"))})
        err = (s.model(ids_new) - swapped(ids_new, use_cache=False).logits).abs().max().item()
    assert err <= 1e-4, err


class _TransposedWeights(torch.nn.Module):
    """softmax(q kᵀ)ᵀ @ v: looks like attention but reorders the weights; must not be rewritten."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = k = v = x.view(b, t, 4, 8).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1)
        return (p.transpose(-2, -1) @ v).transpose(1, 2).reshape(b, t, 32)


@pytest.mark.parametrize("source", SOURCES)
def test_reordered_attention_weights_are_not_matched(source):
    x = _x(SEEN, 0)
    graph, inputs = graph_of(source, _TransposedWeights().eval(), x)
    config = LinearizeAttention(feature_map="elu1", window=0)
    plan = handler_for(config).plan(graph, config, PassContext(example_inputs=inputs, allow_empty=True))
    assert plan.sites == []
