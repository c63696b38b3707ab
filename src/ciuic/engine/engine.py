"""The engine: saved_tensors_hooks whose pack decides, for each tensor autograd saves, how it is
kept, and whose unpack gives it back in backward.

Pack, in order: parameters and copies of them are references; tensors the policy never compresses
are kept as they are; bool masks go to 1 bit; "lossless" keeps every float tensor exact (one copy
per storage). Everything else is *stored*, in three steps: a storage already packed in this pass
is reused (dedupe), a cheap elementwise output is recomputed from what ciuic keeps, and the rest is
encoded at the precision the plan gives its site.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch

import ciuic_kernels
from ciuic_kernels import QuantSpec
from ciuic_kernels._pool import lending
from ciuic_kernels.specs import BitmaskSpec

from ..config import CompressionConfig
from ..policy import CLASS_LEVELS, EXACT, Site, classify, group_ranges_sq_sum
from . import recompute as _recompute
from . import stats as _stats
from .handles import CopyRef, ParamCast, Pack, Ref, View, is_kept, pack_key, source, storage_key, view_of
from .planner import PassState, Planner
from .tracking import (OpTracker, claim_module_hooks, compiling, note_saved, param_source, state,
                       unclaim_module_hooks)

_RECOMPUTE_CLASSES = ("elementwise", "linear_input", "conv_input", "norm")
_MASK = BitmaskSpec(check=False)  # bool, or a float mask verified two-valued once per site


def planner_for(config: CompressionConfig) -> Planner:
    """This thread's planner for ``config`` (created on first use)."""
    planners = state().planners
    planner = planners.get(config)
    if planner is None:
        planner = planners[config] = Planner(config)
    return planner


def _inline_context(config: CompressionConfig, pack: Callable, unpack: Callable) -> Any:
    """The hooks for compiled regions: ``ciuic.compiled.inline`` (quantization traced into the
    compiled graphs, with ``pack``/``unpack`` for everything saved eagerly) for the ratio modes it
    implements; None (the engine's own hooks, which see a compiled region's saved tensors at its
    boundary) for "lossless" (bit-identical either way), "auto" (a byte budget needs measured
    passes), stochastic rounding and ``keep_modules`` (not expressed in the inline plan)."""
    from .. import compiled

    if config.mode not in compiled.MODES or config.mode == "lossless" or config.rounding != "nearest" \
            or config.keep_modules:
        return None
    return compiled.inline(config.mode, min_numel=config.min_numel, group_size=config.group_size,
                           eager_hooks=(pack, unpack))


class Engine:
    """One compression context: the hooks of one configuration, entered and exited on one thread.
    Its plan lives in the thread's ``Planner`` for that configuration, so it outlives the context.
    Use through ``ciuic.compression``."""

    def __init__(self, config: CompressionConfig, model: Any = None,
                 prepare: Callable[[Any, CompressionConfig], Callable[[], None]] | None = None) -> None:
        self.config = config
        self.planner = planner_for(config)
        self._model = model
        self._prepare = prepare
        self._undo: Callable[[], None] | None = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._inline: Any = None  # ciuic.compiled.inline(...) while entered, for the ratio modes
        self._tracker = OpTracker()
        self._entered = False
        self._thread: int | None = None

    # -- context protocol ----------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        if self._entered:
            raise RuntimeError("this ciuic compression context is already active")
        if self._model is not None and self._prepare is not None:
            self._undo = self._prepare(self._model, self.config)
        claim_module_hooks()
        self._inline = _inline_context(self.config, self._pack, self._unpack)
        (self._inline or self._hooks).__enter__()
        self._tracker.__enter__()
        state().engines.append(self)
        self._entered = True
        self._thread = threading.get_ident()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._entered:
            return
        if threading.get_ident() != self._thread:
            raise RuntimeError("a ciuic compression context must be exited on the thread that entered it")
        st = state()
        if not st.engines or st.engines[-1] is not self:
            raise RuntimeError(
                "ciuic compression contexts must be exited in reverse order of entry "
                "(disable_compression() was called inside a ciuic.compression() block?)"
            )
        st.engines.pop()
        self._tracker.__exit__(*exc)
        inline, self._inline = self._inline, None
        (inline or self._hooks).__exit__(*exc)
        unclaim_module_hooks()
        self._entered = False
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()

    @property
    def active(self) -> bool:
        return self._entered

    # Read-only views of the planner, for callers and tests.
    @property
    def plan(self):
        return self.planner.plan

    @property
    def passes(self) -> int:
        return self.planner.passes

    # -- pack ------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        if compiling():
            return t
        st = state()
        if st.in_codec:
            return t
        self.planner.on_pack()
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return Ref(t)  # alive anyway: not counted (but checked for in-place writes)
        index = st.op_packs
        st.op_packs = index + 1
        st.in_codec = True
        try:
            return self._pack_counted(t, st, index)
        finally:
            st.in_codec = False

    def _pack_counted(self, t: torch.Tensor, st: Any, index: int) -> Any:
        modules = st.modules
        module = modules[-1][0] if modules else ""
        current = self.planner.current
        if current.root is None and modules:
            self.planner.on_root(st.root)
        if t.is_floating_point():
            param = param_source(t, st)
            if param is not None:
                handle = ParamCast(param, t)
                before = self._first_sight(current, t)
                _stats.charge(handle, module, "param_cast", "param_cast", before, 0)
                current.before += before
                return handle

        reason = self._keep_reason(t, modules)
        if reason is not None:
            return self._keep(t, current, module, reason)
        if t.dtype == torch.bool:
            return self._store(t, current, module, "mask", spec=_MASK)

        op = st.op
        cls = classify(op, tuple(m[1] for m in modules), t, index)
        if self.config.mode == "lossless":
            return self._keep(t, current, module, cls)
        if cls == "softmax" and t.grad_fn is None and self.planner.verdict(
                ("two_valued", module, op, index, current.counters.get((module, op), 0)),
                lambda: self._is_two_valued(t)):
            # a float dropout mask {0, 1/(1-p)} saved by attention's math path: 1 bit, lossless
            return self._store(t, current, module, "mask", spec=_MASK)
        return self._store(t, current, module, cls, op=op)

    def _keep_reason(self, t: torch.Tensor, modules: list) -> str | None:
        if not (t.is_floating_point() or t.dtype == torch.bool):
            return "integer"
        if t.is_complex():
            return "complex"
        if t.numel() < self.config.min_numel:
            return "tiny"
        if is_kept(t):
            return "kept"
        keep = self.config.keep_modules
        if keep:
            for name, cls_name, _ in modules:
                if name in keep or cls_name in keep or any(name.startswith(k + ".") for k in keep):
                    return "kept_module"
        return None

    def _first_sight(self, current: PassState, t: torch.Tensor) -> int:
        """The storage's bytes the first time a live storage is saved in this pass, else 0."""
        key = storage_key(t)
        entry = current.cache.get(key)
        if entry is not None and entry.anchor() is not None:
            return 0
        current.remember(key, t, t)  # callers re-anchor on what they keep
        return t.untyped_storage().nbytes()

    def _keep(self, t: torch.Tensor, current: PassState, module: str, reason: str) -> Any:
        """Keep ``t`` as it is (counted once per storage). A small view of a much larger storage
        is kept as a copy, so the large storage can be freed (ViT's [CLS] slice of the hidden
        states, the last position of the logits)."""
        before = self._first_sight(current, t)
        # A tensor with a grad_fn may be the op's own output: holding it would make a reference
        # cycle (output -> grad_fn -> saved output) that outlives a graph dropped without backward.
        kept = t.detach() if t.grad_fn is not None else t
        after = before
        if before and 2 * t.numel() * t.element_size() < before:
            kept = t.detach().clone()
            after = kept.numel() * kept.element_size()
            handle = CopyRef(kept, t)
            note_saved(handle, t)
        else:
            handle = Ref(kept)
            if before:
                current.remember(storage_key(t), kept, kept)  # alive exactly as long as the graph holds it
        if before:
            _stats.charge(handle, module, "raw", reason, before, after)
            current.before += before
            current.fixed_after += after
        return handle

    @staticmethod
    def _is_two_valued(t: torch.Tensor) -> bool:
        if not t.is_floating_point() or t.numel() == 0:
            return False
        flat = t.reshape(-1)
        top = flat.amax()
        return bool(((flat == 0) | (flat == top)).all())

    # -- store: dedupe, recompute, encode ----------------------------------------------------------
    def _store(self, t: torch.Tensor, current: PassState, module: str, cls: str, *, op: str | None = None,
               spec: Any = None) -> Any:
        view = view_of(t)
        key = pack_key(t, view)
        handle = self._dedupe(t, current, key, view, module, op)
        if handle is None and spec is None and cls in _RECOMPUTE_CLASSES and current.recipes:
            handle = self._recompute(t, current, key, view, module, cls)
        if handle is None:
            handle = self._encode(t, current, key, view, module, cls, op, spec)
        return handle

    def _dedupe(self, t: torch.Tensor, current: PassState, key: tuple, view: tuple, module: str,
                op: str | None) -> Any:
        """A storage already packed in this pass (q/k/v inputs, SDPA's output and o_proj's input):
        another use of the same pack."""
        handle, entry = current.lookup(key)
        if handle is None:
            return None
        if isinstance(handle, torch.Tensor):
            return Ref(t.detach())  # kept exact: its storage is already held (and counted)
        if isinstance(handle, _recompute.Recompute):
            self.planner.add_consumer(handle.sites, module)
            return _noted(handle.again((tuple(t.shape), t.stride(), t.storage_offset()), weakref.ref(
                t._base if t._base is not None else t), t._version), t)
        if op is not None:
            self._maybe_upgrade(handle, t, view, op)
            if entry.site is not None:
                self.planner.add_consumer((entry.site,), module)  # its error reaches this module too
        return _noted(View.of(handle, view, t), t)

    def _recompute(self, t: torch.Tensor, current: PassState, key: tuple, view: tuple, module: str,
                   cls: str) -> Any:
        for owner in (t, t._base):
            recipe = current.recipes.get(id(owner)) if owner is not None else None
            # ids are reused once an object dies: the weak reference proves it is the same object
            if recipe is not None and recipe.result() is owner:
                break
        else:
            return None
        if owner._version != recipe.version:
            return None
        handle = _recompute.build(recipe, owner, t)
        if handle is None:
            return None
        note_saved(handle, t)
        self.planner.add_consumer(handle.sites, module)  # the recomputed tensor's error reaches it
        before = t.numel() * t.element_size() if view[1] is None else t.untyped_storage().nbytes()
        _stats.charge(handle, module, "recompute", cls, before, 0)
        current.before += before
        current.remember(key, t, handle)
        return handle

    def _encode(self, t: torch.Tensor, current: PassState, key: tuple, view: tuple, module: str, cls: str,
                op: str | None, spec: Any) -> Any:
        dense = source(t.detach(), view)
        before = dense.numel() * dense.element_size()
        site_key = None
        level = 1
        if spec is None:  # a float activation: the plan decides
            planner = self.planner
            site_key = current.site_key(module, op)
            level = planner.level_for(site_key, cls)
            if planner.calibrating:
                planner.add_site(Site(
                    key=site_key, cls=cls, module=module, numel=dense.numel(), element_size=dense.element_size(),
                    group_ranges_sq_sum=group_ranges_sq_sum(dense, self.config.group_size)))
            if level == EXACT:
                kept = t.detach()  # returning the saved tensor itself would make a reference cycle
                handle = Ref(kept)
                _stats.charge(handle, module, "raw", cls, before, before)
                current.before += before
                current.remember(key, kept, kept, site_key)
                current.remember(storage_key(t), kept, kept)
                return handle
            spec = QuantSpec(level, self.config.group_size, self.config.rounding)
        pool = self.planner.pool
        with torch.no_grad(), lending(pool):
            packed = ciuic_kernels.encode(dense, spec, seed=self.planner.seed())
        pack = Pack(packed, level, cls, pool)
        codec = packed.codec if packed.codec != "quant" else f"int{level}"
        pack.charge = _stats.charge(pack, module, codec, cls, before, packed.nbytes)
        current.before += before
        if site_key is None:
            current.fixed_after += packed.nbytes
        current.remember(key, t, pack, site_key)
        return _noted(View.of(pack, view, t), t)

    def _maybe_upgrade(self, pack: Pack, t: torch.Tensor, view: tuple, op: str) -> None:
        """A tensor packed for a robust op is now also saved by a sensitive one: re-pack finer."""
        if not isinstance(pack, Pack) or pack.level in (EXACT, 1):
            return
        st = state()
        cls = classify(op, tuple(m[1] for m in st.modules), t, st.op_packs - 1)
        allowed = CLASS_LEVELS[cls]
        if pack.level in allowed:
            return
        finer = [lv for lv in allowed if lv != EXACT and lv > pack.level]
        if not finer:
            return
        with torch.no_grad(), lending(pack.pool):
            new = ciuic_kernels.encode(source(t.detach(), view), QuantSpec(
                finer[-1], self.config.group_size, self.config.rounding), seed=self.planner.seed())
        pack.replace(new, finer[-1])
        pack.charge.repack(new.nbytes, f"int{finer[-1]}")

    # -- recompute recipes ---------------------------------------------------------------------
    def _note_recipe(self, func: Any, args: tuple, kwargs: dict, result: torch.Tensor) -> None:
        """Right after a cheap op ran: remember how to rebuild ``result`` from what ciuic keeps.

        The inputs are resolved now, while they are alive (they may be freed, as Python objects,
        before ``result`` is saved): each must be a parameter, a tensor kept exact, a pack, or
        itself recomputable."""
        if self.config.mode == "lossless" or not torch.is_grad_enabled():
            return
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return
        if not result.is_contiguous() or result.storage_offset() != 0:
            return  # views of the recomputed (contiguous) result are rebuilt with as_strided
        current = self.planner.current
        sources = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if not a.is_floating_point():
                    return
                found = self._source_of(a, current)
                if found is None:
                    return
                sources.append(found)
            elif isinstance(a, (int, float, bool)) or a is None:
                sources.append(_recompute.Const(a))
            else:
                return
        recipes = current.recipes
        if len(recipes) > 4096:
            current.recipes = recipes = {k: v for k, v in recipes.items() if v.result() is not None}
        recipes[id(result)] = _recompute.Recipe(weakref.ref(result), result._version, func, sources, dict(kwargs))

    def _source_of(self, a: torch.Tensor, current: PassState) -> Any:
        """Where backward can get ``a`` back without storing it again, as a weak description."""
        if isinstance(a, torch.nn.Parameter) or isinstance(a._base, torch.nn.Parameter):
            return _recompute.Const(a)  # alive anyway
        param = param_source(a, state())
        if param is not None:
            return _recompute.Const(ParamCast(param, a))
        view = view_of(a)
        handle, entry = current.lookup(pack_key(a, view))
        if handle is not None:
            if isinstance(handle, torch.Tensor):
                # kept exact: refer to the tensor the graph holds (``a`` itself may be a
                # temporary whose Python object dies before the recomputed tensor is saved)
                return _recompute.FromTensor(weakref.ref(handle), view_of(a), a._version)
            if isinstance(handle, Pack):
                anchor = a._base if a._base is not None else a
                return _recompute.FromPack(weakref.ref(handle), view, entry.site, weakref.ref(anchor), a._version)
            if isinstance(handle, _recompute.Recompute):
                if handle.view is None and view[1] is not None and a.shape == view[0] and a.is_contiguous() \
                        and a.storage_offset() == 0:
                    return _recompute.FromRecompute(weakref.ref(handle))
            return None
        held, _ = current.lookup(storage_key(a))
        if isinstance(held, torch.Tensor) and held.untyped_storage().data_ptr() == a.untyped_storage().data_ptr():
            return _recompute.FromTensor(weakref.ref(held), view_of(a), a._version)  # kept raw: the graph holds it
        return None

    # -- unpack ----------------------------------------------------------------------------------
    def _unpack(self, handle: Any) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        self.planner.on_unpack()
        st = state()
        prev, st.in_codec = st.in_codec, True
        try:
            return handle.unpack()
        finally:
            st.in_codec = prev


def _noted(handle: Any, t: torch.Tensor) -> Any:
    note_saved(handle, t)
    return handle
