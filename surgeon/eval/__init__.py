"""surgeon.eval: lm-evaluation-harness on the original model, the surgered model and its exports.

Every route goes through lm-eval's own model classes (in-memory ``HFLM``, ``hf`` on the
``to_hf`` folder, ``onnxruntime-genai`` on the ``to_genai`` folder, ``onnxruntime`` on
``prefill.onnx``); local offline tasks ship in ``surgeon/eval/tasks``. Needs ``pip install
'surgeon[clients]'``.

Example:
    >>> from surgeon.eval import LOCAL_TASKS, Route
    >>> "surgeon_pydoc_ppl" in LOCAL_TASKS
    True
"""
from surgeon.eval.harness import LOCAL_TASKS, evaluate, max_difference, task_manager
from surgeon.eval.prepare import DEFAULT_ROUTES, ROUTE_NAMES, routes_for
from surgeon.eval.report import EvalReport
from surgeon.eval.routes import INSTALL_HINT, Route, make_lm

__all__ = ["evaluate", "EvalReport", "Route", "routes_for", "make_lm", "task_manager", "max_difference",
           "LOCAL_TASKS", "ROUTE_NAMES", "DEFAULT_ROUTES", "INSTALL_HINT"]
