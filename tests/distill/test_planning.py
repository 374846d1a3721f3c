"""Hybrid planning under a decode-state budget, from transfer errors measured on a real (tiny) model."""
from __future__ import annotations

import pytest
import torch
import transformers

from surgeon.core.errors import ConfigError
from surgeon.distill.planning import measure_errors, pareto, plan_hybrid, state_bytes_fn


def tiny_llama(layers: int = 3) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_plan_fits_the_budget_and_prefers_lower_measured_error():
    model = tiny_llama()
    packs = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    errors = measure_errors(model, packs, [4, 16], feature_map="elu1", sinks=2)
    assert set(errors) == {4, 16} and set(errors[4]) == {0, 1, 2}
    # a longer window leaves fewer pairs to the (untrained) linear branch: less error in every layer
    assert all(errors[16][layer] < errors[4][layer] for layer in errors[4])
    state = state_bytes_fn(3, 4, 2, 8, 8, sinks=2, context=1024)
    budget = state(16, ())
    plans = plan_hybrid(errors, state, budget)
    assert all(p.state_bytes <= budget for p in plans)
    assert plans[0].window == 16 and plans[0].softmax_layers == ()
    assert plans[0].error == pytest.approx(sum(errors[16].values()))
    generous = plan_hybrid(errors, state, state(16, (0, 1, 2)))
    assert generous[0].error == 0.0 and generous[0].softmax_layers == (0, 1, 2)   # all softmax: exact
    front = pareto(generous)
    assert [o.state_bytes for o in front] == sorted(o.state_bytes for o in front)
    assert [o.error for o in front] == sorted((o.error for o in front), reverse=True)


def test_a_budget_nothing_meets_lists_the_closest_options():
    errors = {4: {0: 1.0, 1: 2.0}, 8: {0: 0.5, 1: 1.0}}
    state = state_bytes_fn(2, 4, 2, 8, 8, sinks=2, context=1024)
    with pytest.raises(ConfigError, match=r"no hybrid configuration fits a decode state of 10 bytes; the closest: "
                                          r"window 4, softmax layers \[\]"):
        plan_hybrid(errors, state, 10)


def test_measure_retrieval_keeps_one_layer_softmax_at_a_time():
    """scores[L] is exactly the probe score of a model where every layer but L is linearized; with a window
    longer than the probes every layer scores the original's 1.0; the input model is never changed."""
    import surgeon
    from surgeon.distill.evaluate import exact_continuation
    from surgeon.distill.planning import measure_retrieval
    from surgeon.passes import LinearizeAttention

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = torch.randint(0, 64, (6, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():                      # probes the original answers exactly: its own greedy continuation
        full = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, do_sample=False,
                              pad_token_id=0)
    trials = [(row, 30) for row in full]
    kw = dict(feature_map="hedgehog", sinks=1, linear_weight_init=1.0)
    wide = measure_retrieval(model, trials, window=64, progress=False, **kw)
    assert wide == {-1: 1.0, 0: 1.0, 1: 1.0, 2: 1.0}
    narrow = measure_retrieval(model, trials, window=4, progress=False, **kw)
    assert set(narrow) == {-1, 0, 1, 2}
    for kept in (0, 2):
        others = surgeon.apply(model, LinearizeAttention(window=4, layers=[i for i in range(3) if i != kept], **kw)).model
        with torch.no_grad():
            direct = sum(exact_continuation(others, ids, start) for ids, start in trials) / len(trials)
        assert narrow[kept] == direct
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ConfigError, match="no trials"):
        measure_retrieval(model, [], window=4)


def test_retrieval_scores_of_layer_sets_and_bad_layers():
    from surgeon.distill.planning import retrieval_scores

    model = tiny_llama()
    prompts = torch.randint(0, 64, (4, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3, do_sample=False,
                              pad_token_id=0)
    trials = [(row, 30) for row in full]
    kw = dict(feature_map="hedgehog", sinks=1, linear_weight_init=1.0)
    scores = retrieval_scores(model, trials, window=4, sets=[(), (0, 1, 2)], progress=False, **kw)
    assert scores[(0, 1, 2)] == 1.0                 # every layer softmax again: the original, which answers exactly
    with pytest.raises(ConfigError, match=r"layers \[7\] are not linearized"):
        retrieval_scores(model, trials, window=4, sets=[(7,)], progress=False, **kw)


def test_plan_memory_moves_slots_to_retrieval_layers_at_equal_state():
    """The layer that restores recall most gets boost × slots, a weaker one in proportion, the others give
    the difference evenly: the total (the decode state) is unchanged; no gain leaves every layer uniform."""
    from surgeon.distill.planning import plan_memory

    scores = {-1: 0.25, 0: 0.25, 1: 0.75, 2: 0.5, 3: 0.0, 4: 0.25}
    alloc = plan_memory(scores, slots=64, boost=2.0)
    assert alloc == [32, 128, 96, 32, 32] and sum(alloc) == 5 * 64
    odd = plan_memory(scores, slots=63, boost=1.5)
    assert sum(odd) == 5 * 63 and odd[1] == round(63 * 1.5) and max(odd[i] for i in (0, 3, 4)) - min(
        odd[i] for i in (0, 3, 4)) <= 1
    assert plan_memory({-1: 0.5, 0: 0.5, 1: 0.25}, slots=16) == [16, 16]
    with pytest.raises(ConfigError, match="lower boost"):
        plan_memory(scores, slots=64, boost=4.0)
    with pytest.raises(ConfigError, match="boost must be >= 1"):
        plan_memory(scores, slots=64, boost=0.5)
    with pytest.raises(ConfigError, match="no layer in the retrieval scores"):
        plan_memory({-1: 0.0}, slots=8)
    # attention-mass scores (no -1 entry): only layers within `threshold` of the best count
    mass = {0: 0.1, 1: 0.8, 2: 0.6, 3: 0.2}
    assert plan_memory(mass, slots=8, boost=2.0) == [1, 16, 14, 1]
    assert plan_memory(mass, slots=8, boost=2.0, threshold=0.9) == [5, 16, 5, 6]
    with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\]"):
        plan_memory(mass, slots=8, threshold=0.0)
