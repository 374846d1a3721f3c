"""surgeon.distill on tiny models: both stages, exact resume, data splits, layer selection, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import surgeon
from surgeon.distill import DistillConfig, DistillError, original_attention
from surgeon.distill.data import ngram_overlap, pack, pydoc_texts, topic_split
from surgeon.distill.transfer import layer_errors, linear_units, new_parameters
from surgeon.core.errors import ConfigError
from surgeon.passes import LinearizeAttention

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: tiny matmuls on a shared 2-core box run ~15x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(layers: int = 2, seed: int = 0, vocab: int = VOCAB, **kw) -> transformers.LlamaForCausalLM:
    cfg = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=6,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def linearized(layers: int = 2, **kw):
    base = tiny(layers)
    teacher = tiny(layers)
    s = surgeon.apply(base, LinearizeAttention(feature_map="hedgehog", window=4, **kw))
    return s.model, teacher


def tokens(n: int = 16, length: int = 32, seed: int = 0) -> torch.Tensor:
    # a learnable pattern (repeated random motifs) so the student's KL to the teacher is meaningful
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randint(0, VOCAB, (6, 8), generator=g)
    rows = [torch.cat([motifs[i] for i in torch.randint(0, 6, (length // 8,), generator=g)]) for _ in range(n)]
    return torch.stack(rows)


def cfg(**kw) -> DistillConfig:
    base = dict(seq_len=32, transfer_steps=30, lora_steps=20, progress=False, lora_lr=3e-3, transfer_lr=5e-2)
    return DistillConfig(**{**base, **kw})


def projections(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj"))}


# -- stage 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,block", [("layer", 1), ("block", 2), ("joint", 1)])
def test_stage1_reduces_transfer_mse_and_trains_only_new_parameters(mode, block):
    model, _ = linearized(3)
    frozen = projections(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if not any(k in n for k in ("feature_q", "feature_k", "window_logit", "linear_log_weight"))}
    data = tokens(16)
    new = {n: p.detach().clone() for n, p in model.named_parameters() if n not in others}
    before = layer_errors(model, data[:4])
    res = surgeon.distill(model, data=data, config=cfg(stages=["transfer"], transfer_mode=mode, block_size=block))
    after = layer_errors(model, data[:4])
    for name in before:
        assert after[name] < before[name] / 3, (name, before[name], after[name])   # ≥ 3× lower MSE per layer
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n            # projections, MLPs, norms, embeddings bit-identical
    assert set(frozen) <= set(others)
    assert [r["layer"] for r in res.layers] == [0, 1, 2]
    assert all(r["reduction"] > 3 for r in res.layers)
    params = dict(model.named_parameters())
    changed = {n for n, p in new.items() if not torch.equal(params[n], p)}
    assert new and changed == set(new), sorted(set(new) - changed)      # every new parameter was trained


def test_cached_layer_inputs_are_the_teachers_activations():
    """Layer mode trains on cached inputs: the captured inputs equal the teacher's activations exactly."""
    model, teacher = linearized(2)
    data = tokens(4)
    from surgeon.distill.transfer import LayerInputs

    inputs = LayerInputs()
    inputs.capture(model, linear_units(model), data, batch=2)
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    hook = teacher.model.layers[1].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        teacher(input_ids=data[2:3], use_cache=False)
    hook.remove()
    args, kwargs = inputs.batch("model.layers.1.self_attn", [2])
    cached = args[0] if args else kwargs["hidden_states"]
    torch.testing.assert_close(cached, seen["x"], rtol=0, atol=1e-6)


# -- stage 2 -----------------------------------------------------------------------------------------
def test_stage2_lora_kl_decreases_and_merge_is_exact():
    from surgeon.distill.lora import kd_loss

    teacher = tiny(2, initializer_range=0.2)              # peaked attention: a real gap to close
    model = surgeon.apply(tiny(2, initializer_range=0.2), LinearizeAttention(feature_map="hedgehog", window=4)).model
    data = tokens(16)

    def kl(m):
        with torch.no_grad():
            return float(kd_loss(m(input_ids=data[:8]).logits, teacher(input_ids=data[:8]).logits, 1.0))

    before = kl(model)
    res = surgeon.distill(model, data=data, config=cfg(stages=["lora"], merge=False, lora_steps=30, lora_lr=1e-2,
                                                       batch_size=4))
    peft_model = res.model
    after = kl(peft_model)
    assert after < 0.6 * before, (before, after)          # measured: 0.92 -> 0.44
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    assert all(("lora_" in n) == p.requires_grad or not p.requires_grad for n, p in peft_model.named_parameters())
    ids = data[:2]
    with torch.no_grad():
        adapter = peft_model(input_ids=ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged, adapter, rtol=0, atol=1e-5)


def test_stage2_linear_branch_only_keeps_prompts_within_the_window_exact():
    """lora_targets=[] + lora_train_feature_maps: KD trains only what stage 1 added, so every original weight is
    bit-identical and prompts no longer than the window still give the original's logits."""
    from surgeon.distill.lora import kd_loss

    teacher = tiny(2, initializer_range=0.2)
    model = surgeon.apply(tiny(2, initializer_range=0.2),
                          LinearizeAttention(feature_map="hedgehog", window=8, sinks=2)).model
    original = {n: p.detach().clone() for n, p in model.named_parameters()
                if not any(k in n for k in ("feature_q", "feature_k", "window_logit", "linear_log_weight"))}
    data = tokens(16)

    def kl(m, ids):
        with torch.no_grad():
            return float(kd_loss(m(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))

    before = kl(model, data[:8])
    res = surgeon.distill(model, data=data, config=cfg(stages=["lora"], lora_targets=[], lora_train_feature_maps=True,
                                                       lora_steps=30, lora_lr=5e-2, batch_size=4))
    assert res.model is model and not any("lora" in n for n, _ in model.named_parameters())
    after = kl(model, data[:8])
    assert after < 0.7 * before, (before, after)          # measured: 0.64 -> 0.34
    for n, p in model.named_parameters():
        if n in original:
            assert torch.equal(p, original[n]), n
    with torch.no_grad():
        for length in (3, 7, 8):                       # within the window: the linear branch sees no token
            ids = tokens(2, 40, seed=5)[:, :length]
            torch.testing.assert_close(model(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="trains nothing"):
        DistillConfig(lora_targets=[]).validate()


def test_stage2_with_explicit_teacher_and_ce_and_default_merge():
    model, teacher = linearized(2)
    data = tokens(8)
    res = surgeon.distill(model, data=data, teacher=teacher, config=cfg(stages=["lora"], lora_steps=5, ce_weight=0.5))
    assert res.model is model                                  # merged in place, plain model
    assert not any("lora" in n for n, _ in model.named_parameters())
    rows = [h for h in res.history if h["stage"] == "lora"]
    assert "loss/ce" in rows[0] and "loss/kd" in rows[0]
    assert res.tokens["lora"] == 5 * 32


def test_self_teacher_equals_the_original_model():
    """Stage 2's teacher is the same model with adapters off and softmax teacher-forced: exactly the original."""
    from surgeon.distill.lora import add_lora, teacher_logits

    model, teacher = linearized(2)
    peft_model = add_lora(model, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()                                    # adapters that do change the output
    ids = tokens(2)
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits
    torch.testing.assert_close(teacher_logits(peft_model, None, ids), ref, rtol=0, atol=1e-5)


# -- keep_softmax ----------------------------------------------------------------------------------------
def test_keep_softmax_restores_the_worst_layers_exactly():
    model, teacher = linearized(3)
    data = tokens(8)
    res = surgeon.distill(model, data=data, config=cfg(stages=["transfer"], transfer_steps=5, keep_softmax=1))
    worst = max(res.layers, key=lambda r: r["mse_after"])
    assert res.kept_softmax == [worst["site"]] and worst["kept_softmax"]
    restored = model.get_submodule(worst["site"])
    assert type(restored).__name__ == "LlamaAttention"
    assert len(linear_units(model)) == 2
    # the restored module computes exactly what the teacher's does on the same input
    x = torch.randn(1, 10, 48)
    pos = model.model.rotary_emb(x, torch.arange(10)[None])
    with torch.no_grad():
        a = restored(x, pos, None)[0]
        b = teacher.get_submodule(worst["site"])(x, pos, None)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_keep_softmax_is_recorded_so_save_and_restore_replay_it(tmp_path):
    base, teacher = tiny(3), tiny(3)
    surgery = surgeon.apply(base, LinearizeAttention(feature_map="hedgehog", window=4))
    res = surgeon.distill(surgery, data=tokens(8), config=cfg(stages=["transfer"], transfer_steps=5, keep_softmax=1))
    sites = [s.name for s in surgery.recipe.entries[0].sites]
    assert res.kept_softmax[0] not in sites and len(sites) == 2
    surgeon.save(surgery, tmp_path / "s")
    restored = surgeon.restore(teacher, tmp_path / "s")
    assert type(restored.get_submodule(res.kept_softmax[0])).__name__ == "LlamaAttention"
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, surgery.model(ids).logits, rtol=0, atol=1e-6)


def test_original_attention_shares_projections():
    model, _ = linearized(2)
    unit = model.model.layers[0].self_attn
    orig = original_attention(model, "model.layers.0.self_attn")
    assert orig.q_proj is unit.q_proj and orig.o_proj is unit.o_proj


# -- exact resume ----------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stop_at", [("transfer", 1, 4), ("lora", 0, 6)])
def test_resume_after_a_crash_continues_bit_for_bit(tmp_path, stop_at):
    data = tokens(12)
    config = dict(stages=["transfer", "lora"], transfer_steps=8, lora_steps=10, checkpoint_every=2, grad_accum=2,
                  batch_size=2, lora_dropout=0.1, scheduler="cosine", warmup_steps=2)
    ref_model, _ = linearized(2)
    ref = surgeon.distill(ref_model, data=data, config=cfg(**config, checkpoint_dir=str(tmp_path / "a")))

    def crash(info):
        if (info["stage"], info["phase"], info["step"]) == stop_at:
            raise Stop

    model, _ = linearized(2)
    with pytest.raises(Stop):
        surgeon.distill(model, data=data, config=cfg(**config, checkpoint_dir=str(tmp_path / "b")), callbacks=[crash])
    fresh, _ = linearized(2)
    res = surgeon.distill(fresh, data=data, config=cfg(**config, checkpoint_dir=str(tmp_path / "b"), resume=True))
    assert res.resumed_from is not None
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    a, b = _params(ref.model), _params(res.model)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_resume_with_a_different_configuration_is_refused(tmp_path):
    data = tokens(8)
    model, _ = linearized(2)
    surgeon.distill(model, data=data, config=cfg(stages=["transfer"], transfer_steps=4, checkpoint_dir=str(tmp_path)))
    before = len(list(tmp_path.glob("ckpt-*.pt")))
    fresh, _ = linearized(2)
    state = _params(fresh)
    with pytest.raises(ConfigError, match=r"transfer_lr: checkpoint 0.05 vs now 0.02"):
        surgeon.distill(fresh, data=data, config=cfg(stages=["transfer"], transfer_steps=4, transfer_lr=2e-2,
                                                     checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(ConfigError, match="training data differs"):
        surgeon.distill(fresh, data=tokens(8, seed=5), config=cfg(stages=["transfer"], transfer_steps=4,
                                                                  checkpoint_dir=str(tmp_path), resume=True))
    assert len(list(tmp_path.glob("ckpt-*.pt"))) == before          # nothing written, nothing lost
    assert all(torch.equal(p, state[n]) for n, p in fresh.named_parameters())


# -- NaN ------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_names_the_layer_and_keeps_the_last_good_checkpoint(tmp_path):
    model, _ = linearized(2)
    data = tokens(8)
    unit = model.model.layers[1].self_attn
    handle = []

    def poison(info):
        if info["step"] == 4 and not handle:     # layer 1's feature map starts producing NaN
            handle.append(unit.feature_q.register_forward_hook(lambda m, a, out: out * float("nan")))

    config = cfg(stages=["transfer"], transfer_mode="joint", transfer_steps=10, checkpoint_every=2,
                 checkpoint_dir=str(tmp_path))
    with pytest.raises(DistillError, match=r"step 5 in layer 1.*ckpt-000002\.pt") as err:
        surgeon.distill(model, data=data, config=config, callbacks=[poison])
    assert "not finite" in str(err.value)
    handle[0].remove()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ck = torch.load(tmp_path / "ckpt-000002.pt", weights_only=False)
    assert ck["step"] == 4
    for name, value in ck["stage1"].items():
        assert torch.equal(value, model.get_parameter(name)), name     # model = last good state


# -- data ---------------------------------------------------------------------------------------------
def test_held_out_topics_are_never_in_training_packs():
    tok = _byte_tokenizer()
    train = pack(pydoc_texts("train"), 256, tok)
    held = pack(pydoc_texts("held_out"), 256, tok)
    train_names, held_names = topic_split()
    assert not set(train_names) & set(held_names) and len(held_names) >= 10
    assert ngram_overlap(train, held, n=80) == 0          # no 80-byte (~16-word) span is shared


def test_pack_layout_and_errors():
    assert pack([[1, 2, 3], [4, 5, 6, 7]], seq_len=4, eos_token_id=0).tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    with pytest.raises(ConfigError, match="empty"):
        pack([], seq_len=8)
    with pytest.raises(ConfigError, match="fewer than one training sequence of seq_len=64"):
        pack([[1, 2, 3]], seq_len=64)


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error_and_changes_nothing():
    model, teacher = linearized(2)
    state = _params(model)
    with pytest.raises(ConfigError, match="empty"):
        surgeon.distill(model, data=[], config=cfg())
    with pytest.raises(ConfigError, match="fewer than one training sequence"):
        surgeon.distill(model, data=[[1, 2, 3, 4]], config=cfg())
    with pytest.raises(ConfigError, match="no linearized attention layer.*LinearizeAttention"):
        surgeon.distill(tiny(2), data=tokens(4), config=cfg())
    with pytest.raises(ConfigError, match="vocabulary .*differs"):
        surgeon.distill(model, data=tokens(4), teacher=tiny(2, vocab=120), config=cfg())
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        surgeon.distill(model, data=torch.full((2, 32), 500), config=cfg())
    with pytest.raises(ConfigError, match="lora_targets"):
        surgeon.distill(model, data=tokens(4), config=cfg(stages=["lora"], lora_targets=["query"]))
    with pytest.raises(ConfigError, match="must be >= 1"):
        surgeon.distill(model, data=tokens(4), config=cfg(seq_len=0))
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), n
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_outputs_curves_and_report(tmp_path):
    model, _ = linearized(2)
    res = surgeon.distill(model, data=tokens(8), config=cfg(transfer_steps=3, lora_steps=3,
                                                            output_dir=str(tmp_path)))
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    curves = json.loads((tmp_path / "loss_curves.json").read_text())
    assert {c["stage"] for c in curves} == {"transfer", "lora"}
    saved = json.loads((tmp_path / "distill.json").read_text())
    assert saved["tokens"]["lora"] == 3 * 32
    text = str(res.report)
    assert "attention transfer" in text and "mse_before" in text


def test_bf16_mixed_precision_runs():
    model, _ = linearized(2)
    res = surgeon.distill(model, data=tokens(8), config=cfg(transfer_steps=3, lora_steps=3, mixed_precision="bf16"))
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert next(model.parameters()).dtype == torch.float32


def test_surgeon_distill_is_callable_and_a_package():
    assert callable(surgeon.distill) and surgeon.DistillConfig is DistillConfig
    assert surgeon.distill.DistillConfig is DistillConfig


def test_evaluate_teacher_vs_student_tiny(tmp_path):
    model, teacher = linearized(2)
    data = tokens(4, length=64)
    r = surgeon.evaluate(model, teacher=teacher, data=data, context=64, n_windows=4, niah_context=64, mqar_trials=4,
                         niah_trials=1, niah_depths=(0.0, 0.5, 1.0), out_dir=tmp_path)
    assert r.perplexity["ratio"] != 1.0 and 0 <= r.agreement["top1"] <= 1
    assert len(r.niah["student"]) == 3 and 0 <= r.mqar["teacher"] <= 1
    assert (tmp_path / "eval.md").read_text().startswith("| metric |")
    same = surgeon.evaluate(teacher, teacher=teacher, data=data, context=64, n_windows=4, mqar_trials=4, niah_trials=1,
                            niah_context=64, niah_depths=(0.0, 0.5, 1.0), generation=True)
    assert same.perplexity["ratio"] == 1.0 and same.agreement["top1"] == 1.0 and same.agreement["generation"] == 1.0
    # the recall probes are deterministic: the teacher scored as its own student scores exactly the same
    assert same.mqar["student"] == same.mqar["teacher"] == r.mqar["teacher"]
    assert same.niah["student"] == same.niah["teacher"] == r.niah["teacher"]


class _ByteTok:
    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [b + 1 for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def _byte_tokenizer():
    return _ByteTok()
