"""The original model (every layer softmax) through the stateful prefill/decode export
(``export_causal_lm(softmax_only=True)``), so benchmarks run both models in one runtime: onnxruntime
prefill + decode equal the Hugging Face forward at lengths and batch sizes other than the export's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from surgeon.export import OnnxGenerator
from surgeon.export.causal_lm import export_causal_lm


@pytest.fixture(scope="module")
def original_export(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=100)
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("softmax_only")
    export_causal_lm(model, out, softmax_only=True, last_logits_only=True)
    return model, OnnxGenerator(out)


@pytest.mark.parametrize("batch,prompt", [(1, 45), (3, 70)])
def test_prefill_and_decode_equal_the_hf_forward(original_export, batch, prompt):
    model, gen = original_export
    steps = 4
    ids = torch.randint(0, 100, (batch, prompt + steps), generator=torch.Generator().manual_seed(prompt))
    with torch.no_grad():
        want = model(ids).logits                          # one forward over prompt + decoded tokens
    logits, state = gen.run_prefill(ids[:, :prompt])
    assert logits.shape == (batch, 1, 100)               # last_logits_only
    scale = float(want.abs().max())
    np.testing.assert_allclose(logits[:, -1], want[:, prompt - 1].numpy(), atol=1e-5 * scale, rtol=0)
    for t in range(prompt, prompt + steps):
        logits, state = gen.run_decode(ids[:, t:t + 1].numpy(), np.full((batch, 1), t), state)
        np.testing.assert_allclose(logits[:, -1], want[:, t].numpy(), atol=1e-5 * scale, rtol=0)
    assert gen.state_bytes(context=prompt + steps) > gen.state_bytes(context=prompt)   # the KV cache grows
