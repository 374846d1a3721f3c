"""``surgeon export-hf``: the command line writes the same folder as surgeon.export.to_hf."""
from __future__ import annotations

import torch
import transformers

import surgeon
from surgeon.cli.commands import main


def test_export_hf_from_a_saved_surgery(tmp_path, capsys):
    spec = "test_hf_folder:tiny_llama"                  # a package.module:factory the registry builds
    assert main(["apply", "--model", spec, "--pass", "LinearizeAttention", "--config", '{"window": 5}',
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["export-hf", str(tmp_path / "s"), "--out", str(tmp_path / "hf")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    from test_hf_folder import tiny_llama

    want = surgeon.restore(tiny_llama(), tmp_path / "s")
    ids = torch.randint(0, 64, (1, 15), generator=torch.Generator().manual_seed(0))
    assert torch.equal(lm(ids).logits, want(ids).logits)
