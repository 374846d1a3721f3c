"""lm-eval's own ONNX model classes with HFLM's context truncation (imported only when lm-eval is installed).

lm-eval 0.4.13's ``onnxruntime-genai`` / ``onnxruntime`` models (``_ONNXLMBase``) keep the last
``max_length`` tokens of context + continuation and then score one continuation token fewer, while
``HFLM`` keeps ``max_length + 1`` tokens and feeds all but the last. Every full rolling-perplexity
window is cut, so the two disagree on any text longer than ``max_length``. These subclasses change
only that rule (forward passes still see at most ``max_length`` tokens), so every route scores the
same tokens; they are registered with lm-eval as ``surgeon-onnxruntime-genai`` and
``surgeon-onnxruntime``.

Example:
    >>> from lm_eval.api.registry import get_model
    >>> get_model("surgeon-onnxruntime-genai").__name__
    'SurgeonGenaiLM'
"""
from __future__ import annotations

from typing import Any

import numpy as np
from lm_eval.api.registry import register_model
from lm_eval.models.onnxruntime_genai import ONNXRuntimeGenAILM
from lm_eval.models.onnxruntime_ort import ONNXRuntimeLM


class HFTruncation:
    """Mixin: HFLM's truncation of log-likelihood requests for an ``_ONNXLMBase`` model."""

    max_length: int

    def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False, override_bs: Any = None) -> Any:
        self._feed_limit = self.max_length
        self.max_length += 1                      # the base keeps the last max_length + 1 tokens ...
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)   # type: ignore[misc]
        finally:
            self.max_length = self._feed_limit
            del self._feed_limit

    def _forward_logits(self, tokens: list[int]) -> np.ndarray:
        limit = getattr(self, "_feed_limit", None)
        if limit is None or len(tokens) <= limit:
            return super()._forward_logits(tokens)                                    # type: ignore[misc]
        logits = super()._forward_logits(tokens[:-1])     # ... and feeds all but the last (its row is never read)
        return np.concatenate([logits, np.zeros_like(logits[-1:])], axis=0)


@register_model("surgeon-onnxruntime-genai")
class SurgeonGenaiLM(HFTruncation, ONNXRuntimeGenAILM):
    """lm-eval's ``onnxruntime-genai`` model with HFLM's truncation."""


@register_model("surgeon-onnxruntime")
class SurgeonOrtLM(HFTruncation, ONNXRuntimeLM):
    """lm-eval's ``onnxruntime`` model with HFLM's truncation."""
