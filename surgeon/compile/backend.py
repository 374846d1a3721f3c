"""``surgeon.backend`` / ``surgeon.compile``: run surgeon passes inside ``torch.compile``.

``torch.compile(model, backend=surgeon.backend(*passes, then="inductor"))`` rewrites every graph
dynamo captures with the same pass handlers ``surgeon.apply`` uses, records what it changed per graph
(sites, graph breaks, recompilations) and hands the rewritten graph to the next backend
(``"inductor"``, ``"eager"``, ``"aot_eager"`` or any backend callable). The model's code and weights
are never changed: dynamo's graph takes the parameters as inputs, and new units live on the graph.

Contract for pass handlers (how a pass plugs in; ``LinearizeReLU`` / ``FinalizeReLU`` follow it):

* ``plan(gm, config, ctx)`` / ``rewrite(gm, config, plan, ctx)`` receive dynamo's ``GraphModule``
  (torch-level calls, parameters as placeholders, ``node.meta['nn_module_stack']``, shapes in
  ``node.meta['example_value']``). Match ops with :mod:`surgeon.fx.patterns` and name sites with
  ``graph_patterns.module_path(node, gm)`` so names equal the eager ones. ``gm.meta
  [graph_patterns.MODULE_IDS_META]`` maps dynamo's module ids to FQNs when the model is known.
* ``ctx`` (a :class:`surgeon.PassContext`) has ``allow_empty=True`` (a graph without a site returns
  ``Plan([])``, it must not raise), ``name_offsets`` (a ``Counter`` of site bases seen in this frame's earlier graphs: a
  handler that numbers repeated calls ``base@k`` starts there, and returns the bases it found as
  ``plan.state['bases']``, so names after a graph break still equal the eager ones), ``from_recipe=True`` when parameters come from a recipe (skip checks that need the whole
  model, such as budgets), and, for a dry run on the eager model, ``sites_only=True`` (return the
  selected sites; shape checks may be skipped).
* ``handler.needs_recipe(config)`` returns a reason string when the rewrite adds *trained*
  parameters (``LinearizeReLU(budget=...)``, ``units="poly"``); the backend then refuses to run
  without ``recipe=DIR`` (a ``surgeon.save`` directory) and changes nothing.
* With a recipe, the backend plans once (``ctx.recorded_sites=None``), keeps the recipe's sites that
  this graph holds, and plans again with ``ctx.recorded_sites`` = those recorded sites (their
  ``data`` merged in, as ``surgeon.restore`` does). The handler must put each new module at the
  recorded ``site.data['unit']`` path, so its state-dict keys equal the eager surgered model's.
  After all passes ran on a graph, every tensor the passes added to the graph is loaded from the
  recipe's ``model.safetensors`` under the same key (``load_state_dict`` of the owning module, so a
  unit may adopt a saved shape); a missing key is an error naming the site.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> compiled = surgeon.compile(net, LinearizeReLU(granularity="channel", init=0.0), then="eager")
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(compiled(x), net[2](net[0](x)))   # ReLU linearized: Linear∘Linear
    True
    >>> g = compiled.surgeon_backend.report.graphs[0]
    >>> g.sites, g.changed
    ({'LinearizeReLU': ['1']}, 1)
"""
from __future__ import annotations

import copy
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.fx import patterns as graph_patterns
from surgeon.core.config import PassConfig
from surgeon.core.errors import ConfigError, RecipeError, SurgeonError
from surgeon.core.handler import PassContext, handler_for
from surgeon.core.persist import WEIGHTS_FILE, load_recipe
from surgeon.core.recipe import first_mismatch, fingerprint
from surgeon.core.report import Report, ReportGroup
from surgeon.core.sites import Site

Backend = Callable[[fx.GraphModule, list], Callable]


class RecompilationWarning(UserWarning):
    """A frame was recompiled more often than ``recompile_warn`` (dynamic shapes?)."""


def _short(reason: str) -> str:
    return reason.strip().splitlines()[0] if reason.strip() else reason


def _counter(name: str) -> Counter:
    from torch._dynamo.utils import counters

    return Counter(dict(counters.get(name, {})))


@dataclass
class GraphRecord:
    """What the backend did to one captured graph."""

    index: int
    compile_id: str
    frame: int | None
    recompile: int | None  # 0 for a frame's first compile, k for its k-th recompilation
    nodes: int
    sites: dict[str, list[str]] = field(default_factory=dict)   # pass name -> rewritten sites
    skipped: dict[str, list[str]] = field(default_factory=dict)  # found here but not in the recipe
    loaded: int = 0   # tensors taken from the recipe
    breaks_before: list[str] = field(default_factory=list)  # graph breaks dynamo hit since the last graph
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return sum(len(v) for v in self.sites.values())

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "compile_id": self.compile_id, "frame": self.frame,
                "recompile": self.recompile, "nodes": self.nodes, "sites": self.sites,
                "skipped": self.skipped, "changed": self.changed, "loaded": self.loaded,
                "breaks_before": self.breaks_before, "seconds": round(self.seconds, 4)}


@dataclass
class CompileReport:
    """Per-graph record of a :class:`SurgeonBackend`; prints as tables, ``to_dict()`` is JSON."""

    graphs: list[GraphRecord]
    graph_breaks: dict[str, int]          # reason (first line) -> count, since the backend was made
    recompilations: int                   # graphs compiled again for a frame already compiled
    recompiles_per_frame: dict[int, int]
    recompile_limit_hits: int             # frames dynamo stopped compiling (they then run eagerly)
    warnings: list[str]
    #: per pass, sites of the eager model (known when the backend got ``model=``) that no compiled
    #: graph contained: dynamo ran their frame eagerly (a graph break inside a loop, a skipped
    #: frame), so they were NOT rewritten
    missed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(g.changed for g in self.graphs)

    def tables(self) -> ReportGroup:
        passes = sorted({p for g in self.graphs for p in g.sites})
        rows = [{"graph": g.index, "compile_id": g.compile_id, "nodes": g.nodes,
                 **{p: len(g.sites.get(p, [])) for p in passes}, "loaded": g.loaded,
                 "sites": ", ".join(s for v in g.sites.values() for s in v)[:60] or "-"}
                for g in self.graphs]
        graphs = Report("surgeon.backend: graphs", ["graph", "compile_id", "nodes", *passes, "loaded", "sites"],
                        rows, {**{p: sum(r[p] for r in rows) for p in passes}},
                        notes=[f"recompilations: {self.recompilations}"
                               + (f"; frames past dynamo's recompile_limit (run eagerly, no surgery): "
                                  f"{self.recompile_limit_hits}" if self.recompile_limit_hits else "")]
                        + self.warnings)
        breaks = Report("graph breaks", ["reason", "count"],
                        [{"reason": r, "count": c} for r, c in self.graph_breaks.items()],
                        {"count": sum(self.graph_breaks.values())})
        return ReportGroup("torch.compile", [graphs, breaks])

    def __str__(self) -> str:
        return str(self.tables())

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": [g.to_dict() for g in self.graphs], "graph_breaks": self.graph_breaks,
                "recompilations": self.recompilations,
                "recompiles_per_frame": {str(k): v for k, v in self.recompiles_per_frame.items()},
                "recompile_limit_hits": self.recompile_limit_hits, "changed": self.changed,
                "missed": self.missed, "warnings": self.warnings}


class _RecipeWeights:
    """A ``surgeon.save`` directory: its recipe and lazy access to ``model.safetensors``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.recipe = load_recipe(self.directory)
        self.weights = self.directory / WEIGHTS_FILE
        if not self.weights.is_file():
            raise RecipeError(f"{self.weights} does not exist: recipe= needs a directory written by surgeon.save")
        from safetensors import safe_open

        with safe_open(str(self.weights), "pt") as f:
            self.keys = set(f.keys())

    def entry_for(self, config: PassConfig, occurrence: int):
        same = [e for e in self.recipe.entries if e.pass_name == config.pass_name]
        return same[occurrence] if occurrence < len(same) else None

    def tensors(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.weights), "pt") as f:
            return {k: f.get_tensor(k) for k in keys}


def _resolve_next(then: str | Backend) -> Backend:
    if callable(then):
        return then
    if not isinstance(then, str):
        raise ConfigError(f"then= must be a backend name or a callable, got {type(then).__name__}")
    from torch._dynamo import list_backends, lookup_backend

    try:
        return lookup_backend(then)
    except Exception:  # noqa: BLE001 - reworded below
        raise ConfigError(f"then={then!r} is not a torch.compile backend; known: "
                          f"{sorted(set(list_backends(exclude_tags=())) | {'eager'})}") from None


def record_is_first_graph(records: Sequence[GraphRecord]) -> bool:
    return not records


class SurgeonBackend:
    """A ``torch.compile`` backend that applies surgeon passes to each captured graph.

    Args:
        passes: pass configs, applied in order to every graph (default: the recipe's passes).
        then: the backend that compiles the rewritten graph.
        recipe: a ``surgeon.save`` directory whose trained parameters the rewritten graphs load.
        model: the model being compiled (optional): site names of resumed frames map to its FQNs,
            and errors list its sites. ``surgeon.compile`` passes it.
        recompile_warn: warn (``RecompilationWarning``) when one frame has been recompiled this
            many times.

    ``.report`` is a :class:`CompileReport`; ``.graphs`` the rewritten ``GraphModule``s. Graph
    breaks and recompile-limit hits come from dynamo's process-wide counters (counted from the
    backend's creation, so another model compiled meanwhile adds to them). The backend is meant for
    inference and deployment: masks and other new parameters live on dynamo's graphs, so train them
    eagerly (``surgeon.apply`` + training) and bring them in with ``recipe=``.
    """

    def __init__(self, *passes: PassConfig, then: str | Backend = "inductor", recipe: str | Path | None = None,
                 model: nn.Module | None = None, recompile_warn: int = 4) -> None:
        self.recipe = _RecipeWeights(recipe) if recipe is not None else None
        if not passes:
            if self.recipe is None:
                raise ConfigError("surgeon.backend needs passes (e.g. LinearizeReLU()) or recipe=DIR to take them from")
            passes = tuple(e.build_config() for e in self.recipe.recipe.entries)
        for p in passes:
            handler_for(p)
            p.validate()
        self.passes = list(passes)
        self.then_name = then if isinstance(then, str) else getattr(then, "__name__", type(then).__name__)
        self.next = _resolve_next(then)
        self.recompile_warn = recompile_warn
        self.module_ids = {str(id(m)): name for name, m in model.named_modules()} if model is not None else None
        if model is not None and self.recipe is not None:
            mismatch = first_mismatch(self.recipe.recipe.base, fingerprint(model))
            if mismatch:
                raise RecipeError(f"recipe {self.recipe.directory} does not fit this model: {mismatch}")
        self._check_recipe_needs(model)
        self.expected = self._expected_sites(model) if model is not None else {}
        self._weights_checked = False
        self._running: list[Counter] = [Counter() for _ in self.passes]
        self._frame_offsets: dict[int, list[Counter]] = {}
        self.graphs: list[fx.GraphModule] = []
        self.records: list[GraphRecord] = []
        self._breaks_at_start = _counter("graph_break")
        self._limit_at_start = self._limit_hits()
        self._breaks_seen = Counter(self._breaks_at_start)
        self._warnings: list[str] = []
        self._warned: set[int] = set()

    # ------------------------------------------------------------------ checks

    def _check_recipe_needs(self, model: nn.Module | None) -> None:
        seen: Counter[str] = Counter()
        for p in self.passes:
            k = seen[p.pass_name]
            seen[p.pass_name] += 1
            reason = handler_for(p).needs_recipe(p)
            if reason is None:
                continue
            if self.recipe is not None and self.recipe.entry_for(p, k) is not None:
                continue
            where = self._dry_sites(model, p)
            raise ConfigError(
                f"{type(p).__name__} needs trained parameters ({reason}) at {where}, and "
                + (f"the recipe {self.recipe.directory} has no {p.pass_name} entry"
                   if self.recipe is not None else "no recipe was given")
                + ". Train it eagerly (surgeon.apply + training), save it with surgeon.save(surgery, DIR), then "
                  "compile with surgeon.compile(model, ..., recipe=DIR) or surgeon.backend(..., recipe=DIR). "
                  "Nothing was changed.")

    def _expected_sites(self, model: nn.Module) -> dict[str, list[str]]:
        """Per pass, the sites a dry plan finds on the eager model (skipped when it does not trace)."""
        out: dict[str, list[str]] = {}
        for p in self.passes:
            try:
                plan = handler_for(p).plan(model, p, PassContext(sites_only=True, allow_empty=True,
                                                                  from_recipe=True))
            except Exception:  # noqa: BLE001 - untraceable model, or a pass that needs earlier passes
                continue
            out.setdefault(p.pass_name, plan.names)
        return out

    @staticmethod
    def _dry_sites(model: nn.Module | None, config: PassConfig) -> str:
        if model is None:
            return "every site it rewrites (pass model= to list them)"
        try:
            plan = handler_for(config).plan(model, config, PassContext(sites_only=True, allow_empty=True,
                                                                        from_recipe=True))
            names = plan.names
        except Exception:  # noqa: BLE001 - best effort: the model may not trace symbolically
            return "its sites (found when dynamo captures the model)"
        return f"sites {names[:8]}{' ...' if len(names) > 8 else ''}" if names else "no site of this model"

    # ------------------------------------------------------------------ the backend

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        t0 = time.perf_counter()
        cid = gm.meta.get("dynamo_compile_id")
        frame = getattr(cid, "frame_id", None)
        recompile = getattr(cid, "frame_compile_id", None)
        breaks = _counter("graph_break")
        new_breaks = [f"{_short(r)} (x{c})" for r, c in (breaks - self._breaks_seen).items()]
        self._breaks_seen = breaks
        frame_self = self._frame_self()
        if self.module_ids is None and frame_self is not None and record_is_first_graph(self.records):
            # the bare backend learns the model from the first frame dynamo compiles (its forward)
            self.module_ids = {str(id(m)): name for name, m in frame_self.named_modules()}
        if self.recipe is not None and not self._weights_checked and frame_self is not None and not self.records:
            self._weights_checked = True
            self._check_base_weights(frame_self)
        if self.module_ids is not None:
            gm.meta[graph_patterns.MODULE_IDS_META] = self.module_ids
            if frame_self is not None and str(id(frame_self)) in self.module_ids:
                gm.meta[graph_patterns.FRAME_SCOPE_META] = self.module_ids[str(id(frame_self))]
        record = GraphRecord(index=len(self.records), compile_id=str(cid) if cid is not None else "-",
                             frame=frame, recompile=recompile, nodes=len(gm.graph.nodes), breaks_before=new_breaks)
        before = set(gm.state_dict().keys())
        try:
            gm = self._rewrite(gm, record)
            if self.recipe is not None:
                record.loaded = self._load(gm, before, record)
        except SurgeonError as e:
            raise type(e)(f"surgeon.backend, graph {record.index} (compile id {record.compile_id}): {e}") from e
        self._register_new_tensors(gm, before)
        record.seconds = time.perf_counter() - t0
        self.records.append(record)
        self.graphs.append(gm)
        self._check_recompiles(record)
        return self.next(gm, example_inputs)

    def _offsets(self, record: GraphRecord) -> list[Counter]:
        """Per pass, the site bases counted in graphs before this one (graph breaks split a model).

        A frame's first compile continues from every frame compiled before it; a recompile of a
        frame reuses that frame's starting point.
        """
        if record.frame is not None and record.frame in self._frame_offsets:
            return self._frame_offsets[record.frame]
        start = [Counter(c) for c in self._running]
        if record.frame is not None:
            self._frame_offsets[record.frame] = start
        return start

    def _check_base_weights(self, model: nn.Module) -> None:
        """The compiled model must hold the recipe's values of its own weights (fine-tuning changes them)."""
        own = model.state_dict()
        keys = [k for k in own if k in self.recipe.keys]
        saved = self.recipe.tensors(keys)
        differ = [k for k in keys if saved[k].shape != own[k].shape or not torch.equal(saved[k], own[k].detach().cpu())]
        if differ:
            raise RecipeError(
                f"the model being compiled has other values than the recipe {self.recipe.directory} for "
                f"{differ[:6]} (the surgery fine-tuned them); the graphs would compute something else. Use "
                f"surgeon.compile(model, ..., recipe=DIR), which compiles a copy holding the recipe's weights, or "
                f"torch.compile(surgeon.compile.backend.with_recipe_weights(model, DIR), backend=...).")

    @staticmethod
    def _frame_self() -> nn.Module | None:
        """The module whose forward dynamo is compiling (``self`` of the captured frame), if any."""
        try:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            tx = InstructionTranslator.current_tx()
            local = dict(tx.f_locals) if tx is not None else {}
        except Exception:  # noqa: BLE001 - private API: no frame scope then
            return None
        # forward(self, ...); torch.compile's wrapper inner(*args, **kwargs) holds the module as fn
        for candidate in (local.get("self"), local.get("fn"), *(local.get("args") or ())[:1]):
            if isinstance(candidate, nn.Module):
                return candidate
        return None

    def _rewrite(self, gm: fx.GraphModule, record: GraphRecord) -> fx.GraphModule:
        seen: Counter[str] = Counter()
        offsets = self._offsets(record)
        first = record.frame is None or not record.recompile
        for i, config in enumerate(self.passes):
            k = seen[config.pass_name]
            seen[config.pass_name] += 1
            handler = handler_for(config)
            entry = self.recipe.entry_for(config, k) if self.recipe is not None else None
            ctx = PassContext(allow_empty=True, name_offsets=offsets[i], from_recipe=entry is not None)
            plan = handler.plan(gm, config, ctx)
            if first and "bases" in plan.state:
                self._running[i].update(plan.state["bases"])
            if entry is not None:
                here = set(plan.names)
                recorded = [Site.from_dict(copy.deepcopy(s.to_dict())) for s in entry.sites if s.name in here]
                record.skipped[config.pass_name] = sorted(here - {s.name for s in recorded})
                if not recorded:
                    record.sites[config.pass_name] = []
                    continue
                ctx = PassContext(recorded_sites=recorded, allow_empty=True, name_offsets=offsets[i], from_recipe=True)
                plan = handler.plan(gm, config, ctx)
            record.sites[config.pass_name] = plan.names
            if plan.sites:
                gm = handler.rewrite(gm, config, plan, ctx)
        return gm

    def _load(self, gm: fx.GraphModule, before: set[str], record: GraphRecord) -> int:
        """Copy the recipe's tensors into everything the passes added to ``gm``."""
        added = [k for k in gm.state_dict().keys() if k not in before]
        missing = [k for k in added if k not in self.recipe.keys]
        if missing:
            site = missing[0].rpartition(".")[0]
            raise RecipeError(
                f"the recipe {self.recipe.directory} has no saved value for {missing[0]!r} (unit {site!r}); "
                f"its weights file holds {sorted(k for k in self.recipe.keys if '.' in k)[:12]} ... "
                f"Was it saved from a surgery with the same passes on this model?")
        by_owner: dict[str, list[str]] = defaultdict(list)
        for key in added:
            by_owner[key.rpartition(".")[0]].append(key)
        values = self.recipe.tensors(added)
        for owner, keys in by_owner.items():
            module = gm.get_submodule(owner) if owner else gm
            local = {k.rpartition(".")[2]: values[k] for k in keys}
            module.load_state_dict(local, strict=False)
        return len(added)

    @staticmethod
    def _register_new_tensors(gm: fx.GraphModule, before: set[str]) -> None:
        """Tell AOTAutograd (inductor) where the tensors the passes added come from."""
        sources = getattr(gm, "_param_name_to_source", None)
        if sources is None:
            return
        from torch._dynamo.source import ConstantSource

        for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
            if name not in sources:
                sources[name] = ConstantSource("surgeon__" + name.replace(".", "__"))

    @staticmethod
    def _limit_hits() -> int:
        return sum(c for r, c in _counter("unimplemented").items() if "recompile_limit" in r or "recompile limit" in r)

    def _check_recompiles(self, record: GraphRecord) -> None:
        if record.frame is None or not record.recompile:
            return
        if record.recompile >= self.recompile_warn and record.frame not in self._warned:
            self._warned.add(record.frame)
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            msg = (f"surgeon.backend: frame {record.frame} was compiled {record.recompile + 1} times "
                   f"(last compile id {record.compile_id}); each new input shape recompiles it and re-runs the "
                   f"surgery. Use torch.compile(..., dynamic=True) or mark the varying dims with "
                   f"torch._dynamo.mark_dynamic; past recompile_limit={limit} dynamo runs the frame eagerly, "
                   f"without the surgery.")
            self._warnings.append(msg)
            warnings.warn(msg, RecompilationWarning, stacklevel=2)

    # ------------------------------------------------------------------ report

    @property
    def report(self) -> CompileReport:
        breaks = _counter("graph_break") - self._breaks_at_start
        per_frame: dict[int, int] = defaultdict(int)
        for r in self.records:
            if r.frame is not None and r.recompile:
                per_frame[r.frame] += 1
        hits = self._limit_hits() - self._limit_at_start
        notes = list(self._warnings)
        missed: dict[str, list[str]] = {}
        if self.records:
            for pass_name, names in self.expected.items():
                seen = {n for r in self.records for n in r.sites.get(pass_name, []) + r.skipped.get(pass_name, [])}
                lost = [n for n in names if n not in seen]
                if lost:
                    missed[pass_name] = lost
                    notes.append(f"{pass_name}: sites {lost[:8]} were in no compiled graph (dynamo ran their code "
                                 f"eagerly: a graph break inside a loop, or a skipped frame; or the graph spells "
                                 f"them in a way surgeon.fx.patterns does not match); they were NOT rewritten")
        if hits:
            notes.append(f"{hits} frame(s) hit dynamo's recompile_limit and now run eagerly, without the surgery")
        return CompileReport(
            graphs=list(self.records), graph_breaks={_short(r): c for r, c in breaks.items()},
            recompilations=sum(per_frame.values()), recompiles_per_frame=dict(per_frame),
            recompile_limit_hits=hits, warnings=notes, missed=missed)

    def explain(self, model: nn.Module, *inputs: Any) -> list[str]:
        """Graph breaks of ``model`` on ``inputs`` as ``torch._dynamo.explain`` lists them (reason + where)."""
        out = torch._dynamo.explain(model)(*inputs)
        lines = []
        for b in out.break_reasons:
            frame = b.user_stack[-1] if getattr(b, "user_stack", None) else None
            where = f" at {frame.filename}:{frame.lineno}" if frame is not None else ""
            lines.append(f"{_short(b.reason)}{where}")
        return lines

    def __repr__(self) -> str:
        return f"SurgeonBackend({', '.join(type(p).__name__ for p in self.passes)}, then={self.then_name!r})"


def with_recipe_weights(model: nn.Module, recipe: str | Path) -> nn.Module:
    """A copy of ``model`` holding the recipe's values of its own weights (fine-tuned / distilled).

    The passes' new tensors are not part of it (the backend loads those into the graphs). A recipe
    whose surgery removed weights of the model (``FinalizeReLU(fold=True)`` folding BatchNorm) cannot
    be compiled graph by graph: compile ``surgeon.restore(model, DIR)`` instead.

    Example:
        >>> import tempfile, torch, torch.nn as nn, surgeon
        >>> from surgeon.passes import LinearizeReLU
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> s = surgeon.apply(net, LinearizeReLU(granularity="layer"))
        >>> with torch.no_grad(): _ = s.model.get_submodule("0").weight.add_(1.0)   # "fine-tuned"
        >>> d = surgeon.save(s, tempfile.mkdtemp())
        >>> torch.equal(with_recipe_weights(net, d)[0].weight, net[0].weight + 1.0)
        True
    """
    weights = _RecipeWeights(recipe)
    own = model.state_dict()
    by_ptr: dict[int, list[str]] = defaultdict(list)
    for k, v in own.items():
        by_ptr[v.data_ptr()].append(k)
    missing = [k for k in own if k not in weights.keys
               and not any(t in weights.keys for t in by_ptr[own[k].data_ptr()])]  # tied weights saved once
    if missing:
        raise RecipeError(
            f"the recipe {weights.directory} has no value for {missing[:6]} of this model: its surgery changed "
            f"the model's own modules (e.g. FinalizeReLU(fold=True) folded BatchNorm), which a compile backend "
            f"cannot replay on dynamo's graphs. Compile the restored model instead: "
            f"torch.compile(surgeon.restore(model, DIR)).")
    present = [k for k in own if k in weights.keys]
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(weights.tensors(present), strict=False)
    return copy_


def backend(*passes: PassConfig, then: str | Backend = "inductor", recipe: str | Path | None = None,
            model: nn.Module | None = None, recompile_warn: int = 4) -> SurgeonBackend:
    """A ``torch.compile`` backend applying ``passes`` to every captured graph (see :class:`SurgeonBackend`).

    Example:
        >>> import torch, torch.nn as nn, surgeon
        >>> from surgeon.passes import LinearizeReLU
        >>> be = surgeon.backend(LinearizeReLU(granularity="layer"), then="eager")
        >>> net = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), backend=be)
        >>> _ = net(torch.randn(2, 4))
        >>> be.report.to_dict()["graphs"][0]["sites"]
        {'LinearizeReLU': ['1']}
    """
    return SurgeonBackend(*passes, then=then, recipe=recipe, model=model, recompile_warn=recompile_warn)


def compile(model: nn.Module, *passes: PassConfig, then: str | Backend = "inductor",  # noqa: A001
            recipe: str | Path | None = None, recompile_warn: int = 4, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile(model, backend=surgeon.backend(*passes, ...), **compile_kwargs)``.

    The returned module carries the backend as ``.surgeon_backend`` (``.surgeon_backend.report``).
    ``model`` itself is not changed: with ``recipe=DIR`` a copy holding the recipe's fine-tuned
    weights is compiled (:func:`with_recipe_weights`). Errors (a pass that needs ``recipe=``, a recipe made on another
    model) are raised here, before anything is compiled.

    Example:
        >>> import torch, torch.nn as nn, surgeon
        >>> from surgeon.passes import LinearizeReLU
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> c = surgeon.compile(net, LinearizeReLU(granularity="layer"), then="eager", dynamic=False)
        >>> torch.equal(c(torch.ones(2, 4)), net(torch.ones(2, 4)))   # masks start at 1: exact
        True
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"surgeon.compile needs an nn.Module, got {type(model).__name__}")
    be = SurgeonBackend(*passes, then=then, recipe=recipe, model=model, recompile_warn=recompile_warn)
    if recipe is not None:  # the recipe's fine-tuned weights, on a copy (the model stays as it is)
        model = with_recipe_weights(model, recipe)
        be.module_ids = {str(id(m)): name for name, m in model.named_modules()}
    compiled = torch.compile(model, backend=be, **compile_kwargs)
    compiled.surgeon_backend = be
    return compiled
