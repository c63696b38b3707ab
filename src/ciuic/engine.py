"""The activation engine: saved_tensors_hooks that compress what autograd keeps for backward.

pack(t) -> a handle (the tensor itself, a reference to a parameter, or a compressed pack);
unpack(handle) -> the tensor, decoded on demand in the backward pass.

What never gets compressed: parameters and views of them (they stay alive anyway; not counted),
integer tensors, tensors below ``min_numel``, tensors marked with ``keep_exact``, and tensors saved
inside ``keep_modules``. Bool masks go to 1 bit (lossless). The autocast copy of a parameter
(``weight.to(bf16)`` under autocast) is kept as a reference to the parameter and re-cast in
backward: bit-identical and zero bytes. A tensor saved by several ops is packed once; the cache
entry holds a weak reference to the original, so a freed tensor's address can never be served
stale data (see research/activation-sensitivity.md, "two traps").
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import ciuic_kernels
from ciuic_kernels import Packed, QuantSpec
from ciuic_kernels.specs import BitmaskSpec

from .config import CompressionConfig
from .policy import CLASS_LEVELS, EXACT, Plan, Site, classify, group_ranges_sq_sum, solve

_tls = threading.local()
_RECOMPUTE_CLASSES = ("elementwise", "linear_input", "conv_input", "norm")


def _state() -> Any:
    s = _tls
    if not hasattr(s, "engines"):
        s.engines = []  # active engines, innermost last
        s.op = ""
        s.op_packs = 0
        s.modules = []  # (name, class name) stack of running modules
        s.in_codec = False
    return s


# ----------------------------------------------------------------------------------------------
# keep_exact: a tensor the caller wants kept as it is (and still counted)
# ----------------------------------------------------------------------------------------------
_keep_ids: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def keep_exact(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` so the engine saves it exactly (it is still counted in the stats). Returns ``t``."""
    _keep_ids[id(t)] = t
    return t


def _is_kept(t: torch.Tensor) -> bool:
    return _keep_ids.get(id(t)) is t


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
@dataclass
class ByteCount:
    tensors: int = 0
    before: int = 0
    after: int = 0

    def add(self, before: int, after: int) -> None:
        self.tensors += 1
        self.before += before
        self.after += after

    @property
    def ratio(self) -> float:
        return self.before / self.after if self.after else float("inf") if self.before else 1.0


@dataclass
class CompressionStats:
    """Bytes saved tensors would have kept (``bytes_before``) and what ciuic kept (``bytes_after``).

    Cumulative since the last ``reset_stats()``; each unique saved tensor is counted once (at the
    dtype it was saved in). ``live_*`` are the bytes of the packs made since then that are
    alive now (0 after backward when nothing leaks); ``peak_live_after`` is their maximum.
    """

    tensors_packed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    live_before: int = 0
    live_after: int = 0
    peak_live_before: int = 0
    peak_live_after: int = 0
    passes: int = 0
    by_module: dict = field(default_factory=dict)
    by_codec: dict = field(default_factory=dict)
    by_class: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.bytes_after == 0:
            return 1.0 if self.bytes_before == 0 else float("inf")
        return self.bytes_before / self.bytes_after

    def to_dict(self) -> dict:
        def table(d: dict) -> dict:
            return {k: {"tensors": v.tensors, "before": v.before, "after": v.after,
                        "ratio": v.ratio} for k, v in d.items()}

        return {
            "tensors_packed": self.tensors_packed,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "live_before": self.live_before,
            "live_after": self.live_after,
            "peak_live_before": self.peak_live_before,
            "peak_live_after": self.peak_live_after,
            "passes": self.passes,
            "by_module": table(self.by_module),
            "by_codec": table(self.by_codec),
            "by_class": table(self.by_class),
        }


_stats = CompressionStats()
_stats_lock = threading.Lock()


def stats() -> CompressionStats:
    """A snapshot of the accounting (bytes before/after per module, codec and tensor class)."""
    with _stats_lock:
        s = CompressionStats(**{k: getattr(_stats, k) for k in (
            "tensors_packed", "bytes_before", "bytes_after", "live_before", "live_after",
            "peak_live_before", "peak_live_after", "passes")})
        for name in ("by_module", "by_codec", "by_class"):
            setattr(s, name, {k: ByteCount(v.tensors, v.before, v.after)
                              for k, v in getattr(_stats, name).items()})
        return s


def reset_stats() -> None:
    """Start counting afresh: every counter, live and peak bytes included, covers only the packs
    made after this call (packs made before are released against the old counters)."""
    global _stats
    with _stats_lock:
        _stats = CompressionStats()


def _record(module: str, codec: str, cls: str, before: int, after: int) -> None:
    with _stats_lock:
        st = _stats
        st.tensors_packed += 1
        st.bytes_before += before
        st.bytes_after += after
        st.live_before += before
        st.live_after += after
        st.peak_live_before = max(st.peak_live_before, st.live_before)
        st.peak_live_after = max(st.peak_live_after, st.live_after)
        st.by_module.setdefault(module or "<top>", ByteCount()).add(before, after)
        st.by_codec.setdefault(codec, ByteCount()).add(before, after)
        st.by_class.setdefault(cls, ByteCount()).add(before, after)


def _release(charge: list) -> None:
    """Finalizer of a handle: ``charge`` is [counters it was recorded in, before, after]."""
    counters, before, after = charge
    with _stats_lock:
        counters.live_before -= before
        counters.live_after -= after


# ----------------------------------------------------------------------------------------------
# Handles returned by pack
# ----------------------------------------------------------------------------------------------
class _ParamCast:
    """A dtype copy of a parameter (autocast's weight cast), or a view of one: rebuilt from the
    parameter in backward, bit-identical, zero bytes."""

    __slots__ = ("param", "dtype", "version", "view", "__weakref__")

    def __init__(self, param: torch.Tensor, t: torch.Tensor) -> None:
        self.param = param
        self.dtype = t.dtype
        self.version = param._version
        self.view = None if t._base is None else (t.shape, t.stride(), t.storage_offset())

    def unpack(self) -> torch.Tensor:
        if self.param._version != self.version:
            raise RuntimeError(
                "ciuic: a parameter was modified in place between forward and backward; the "
                "autocast copy saved for backward is stale (call optimizer.step() after backward)"
            )
        with torch.no_grad():
            full = self.param.to(self.dtype)
            return full if self.view is None else full.as_strided(*self.view)


def _covers_storage(t: torch.Tensor) -> bool:
    """True when ``t`` touches every byte of its storage (contiguous, transposed, permuted or
    broadcast views), so packing the storage costs no more than packing ``t``."""
    nbytes = t.untyped_storage().nbytes()
    size = t.element_size()
    return nbytes % size == 0 and nbytes <= t.numel() * size


def _view_of(t: torch.Tensor) -> tuple:
    """How ``t`` is rebuilt from what ``_source`` packs: (shape, stride, offset) into the decoded
    flat storage, or (shape, None, 0) for a dense copy of a partial view."""
    if _covers_storage(t):
        return (tuple(t.shape), t.stride(), t.storage_offset())
    return (tuple(t.shape), None, 0)


def _source(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """What to compress for saved tensor ``t``, and how to rebuild ``t`` from its decode.

    When ``t`` covers its whole storage (SDPA's output and the o_proj input that is its reshape
    are one storage on CPU), the storage itself is packed as a flat tensor and every view of it is
    rebuilt with ``as_strided``: one pack per storage, like the memory the uncompressed run holds.
    A view of part of a larger storage is packed on its own (copied dense)."""
    view = _view_of(t)
    if view[1] is not None:
        storage = t.untyped_storage()
        flat = torch.empty(0, dtype=t.dtype, device=t.device)
        flat.set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
        return flat, view
    return t.contiguous().view(-1), view


def _pack_key(t: torch.Tensor, view: tuple) -> tuple:
    """Cache key of what ``_source`` packs for ``t``: its whole storage, or (for a partial view,
    packed as a dense copy that is freed after encoding) the view itself — never the copy's
    address, which the next copy may reuse."""
    storage = t.untyped_storage()
    if view[1] is not None:
        return ("pack", storage.data_ptr(), storage.nbytes(), t.dtype, t.device, t._version)
    return ("view", storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.device, t._version)


class _Pack:
    """A compressed storage (or dense copy of a partial view), shared by every op that saved it."""

    __slots__ = ("packed", "level", "cls", "uses", "charge", "_decoded", "__weakref__")

    def __init__(self, packed: Packed, level: int, cls: str) -> None:
        self.packed = packed
        self.level = level
        self.cls = cls
        self.uses = 0
        self.charge: list = []  # [counters, before, after] released when the pack dies
        self._decoded = None

    def decode(self) -> torch.Tensor:
        # Several consumers (q/k/v projections) unpack the same pack one after the other in
        # backward: decode once, keep the result until the last of them has it.
        out = self._decoded
        if out is None:
            with torch.no_grad():
                out = ciuic_kernels.decode(self.packed)
        self.uses -= 1
        self._decoded = out if self.uses > 0 else None
        return out


class _View:
    """What pack returns for one saved tensor: its pack and the view to rebuild from the decode."""

    __slots__ = ("pack", "shape", "stride", "offset", "__weakref__")

    def __init__(self, pack: _Pack, view: tuple) -> None:
        self.pack = pack
        self.shape, self.stride, self.offset = view
        pack.uses += 1

    def unpack(self) -> torch.Tensor:
        flat = self.pack.decode()
        if self.stride is None:
            return flat.view(self.shape)
        return flat.as_strided(self.shape, self.stride, self.offset)


# ----------------------------------------------------------------------------------------------
# Op and module tracking
# ----------------------------------------------------------------------------------------------
# Cheap elementwise ops whose output ciuic can rebuild in backward from inputs it already keeps
# (SwiGLU's silu(gate) and silu(gate) * up, GELU's output that feeds the next linear layer):
# storing nothing beats storing 2 bits. Never used by "lossless" (a recompute is not bit-exact
# in every kernel) nor for the sensitive classes (attention, softmax, loss).
_RECOMPUTABLE = {"silu", "gelu", "relu", "sigmoid", "tanh", "mul", "__mul__", "__rmul__", "multiply"}


class _OpTracker(TorchFunctionMode):
    """Remembers which torch function is running, so pack knows which op saves a tensor, and
    notes how the outputs of cheap elementwise ops were made (see ``_RECOMPUTABLE``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        st = _state()
        kwargs = kwargs or {}
        if st.in_codec or st.op:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        st.op = name
        st.op_packs = 0
        try:
            result = func(*args, **kwargs)
        finally:
            st.op = ""
        if name in _RECOMPUTABLE and st.engines and type(result) is torch.Tensor and result.requires_grad:
            st.engines[-1]._note_recipe(func, args, kwargs, result)
        return result


class _Recompute:
    """A saved tensor rebuilt in backward by re-running a cheap op on inputs ciuic keeps."""

    __slots__ = ("func", "args", "kwargs", "dtype", "view", "sites", "__weakref__")

    def __init__(self, func: Any, args: list, kwargs: dict, dtype: torch.dtype, view: tuple | None,
                 sites: tuple = ()):
        self.func, self.args, self.kwargs, self.dtype, self.view = func, args, kwargs, dtype, view
        self.sites = sites  # plan sites of the packs it is rebuilt from (their errors reach it)

    def unpack(self) -> torch.Tensor:
        args = [a if isinstance(a, torch.Tensor) or not hasattr(a, "unpack") else a.unpack()
                for a in self.args]
        with torch.no_grad():
            out = self.func(*args, **self.kwargs)
        if out.dtype != self.dtype:
            out = out.to(self.dtype)
        return out if self.view is None else out.as_strided(*self.view)


_module_names: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_module_hooks: list = []
_module_hooks_users = 0
_module_hooks_lock = threading.Lock()


def _pre_forward(module: torch.nn.Module, args: Any) -> None:
    st = _state()
    if not st.engines:
        return
    if not st.modules:
        names = _module_names.get(module)
        if names is None:
            names = {id(m): n for n, m in module.named_modules()}
            _module_names[module] = names
        st.root_names = names
        for engine in st.engines:
            engine._begin_pass()
    name = st.root_names.get(id(module), type(module).__name__)
    st.modules.append((name, type(module).__name__))


def _post_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
    st = _state()
    if not st.engines or not st.modules:
        return
    name, _ = st.modules.pop()
    engine = st.engines[-1]
    if engine._calibrating:
        if isinstance(output, (tuple, list)) and output:
            output = output[0]  # (attention output, weights), (hidden, cache), ...
        if isinstance(output, torch.Tensor) and output.requires_grad:
            engine._watch_gradient(name, output)


def _acquire_module_hooks() -> None:
    global _module_hooks_users
    with _module_hooks_lock:
        if _module_hooks_users == 0:
            from torch.nn.modules.module import (
                register_module_forward_hook,
                register_module_forward_pre_hook,
            )

            _module_hooks.append(register_module_forward_pre_hook(_pre_forward))
            _module_hooks.append(register_module_forward_hook(_post_forward, always_call=True))
        _module_hooks_users += 1


def _release_module_hooks() -> None:
    global _module_hooks_users
    with _module_hooks_lock:
        _module_hooks_users -= 1
        if _module_hooks_users == 0:
            while _module_hooks:
                _module_hooks.pop().remove()


def _param_source(t: torch.Tensor) -> torch.Tensor | None:
    """The parameter that ``t`` (or the tensor ``t`` is a view of) is a plain dtype copy of —
    autocast's weight cast, saved e.g. as ``weight_bf16.t()`` by a linear layer — else None."""
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or len(fn.next_functions) != 1:
        return None
    nxt = fn.next_functions[0][0]
    if nxt is None or type(nxt).__name__ != "AccumulateGrad":
        return None
    param = nxt.variable
    if param.shape != base.shape or not base.is_contiguous() or param.is_complex():
        return None
    return param


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class Engine:
    """One configuration's hooks, plan and calibration. Use through ``ciuic.compression``."""

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config
        self.plan = Plan()
        self.passes = 0
        self._solved = False
        self._calibrating = config.mode != "lossless"
        self._sites: dict[tuple, Site] = {}
        self._gradients: dict[str, float] = {}
        self._counters: dict[tuple, int] = {}
        self._cache: dict[tuple, tuple] = {}
        self._recipes: dict[int, tuple] = {}
        self._pass_before = 0
        self._pass_fixed_after = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._tracker = _OpTracker()
        self._entered = False
        self._thread = None
        self._seed_counter = 0

    # -- context protocol ----------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        if self._entered:
            raise RuntimeError("this ciuic compression context is already active")
        _acquire_module_hooks()
        self._hooks.__enter__()
        self._tracker.__enter__()
        _state().engines.append(self)
        self._entered = True
        self._thread = threading.get_ident()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._entered:
            return
        if threading.get_ident() != self._thread:
            raise RuntimeError("a ciuic compression context must be exited on the thread that entered it")
        st = _state()
        if not st.engines or st.engines[-1] is not self:
            raise RuntimeError(
                "ciuic compression contexts must be exited in reverse order of entry "
                "(disable_compression() was called inside a ciuic.compression() block?)"
            )
        st.engines.pop()
        self._tracker.__exit__(*exc)
        self._hooks.__exit__(*exc)
        _release_module_hooks()
        self._entered = False
        self._cache.clear()
        self._recipes.clear()

    @property
    def active(self) -> bool:
        return self._entered

    # -- passes and calibration ------------------------------------------------------------------
    def _begin_pass(self) -> None:
        if not torch.is_grad_enabled():
            return  # an evaluation forward saves nothing: it is not a training pass
        if self.passes and self._sites and self._calibrating:
            self._solve()
        self.passes += 1
        with _stats_lock:
            _stats.passes += 1
        self._counters.clear()
        self._cache.clear()
        self._recipes.clear()
        self._pass_before = 0
        self._pass_fixed_after = 0
        every = self.config.recalibrate_every
        self._calibrating = self.config.mode != "lossless" and (
            not self._solved or (every > 0 and (self.passes - 1) % every == 0)
        )
        if self._calibrating:
            self._sites = {}
            self._gradients = {}

    def _watch_gradient(self, module: str, output: torch.Tensor) -> None:
        gradients = self._gradients

        def hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            if g.numel():
                energy = float(g.float().square().mean()) * g.shape[-1] if g.dim() else float(g.float().square())
                gradients[module] = gradients.get(module, 0.0) + energy

        output.register_hook(hook)

    def _solve(self) -> None:
        sites = list(self._sites.values())
        if self._gradients:
            known = [v for v in self._gradients.values() if v > 0]
            fallback = sum(known) / len(known) if known else 1.0
            for s in sites:
                s.gradient_weight = sum(self._gradients.get(m, fallback) or fallback for m in s.consumers)
        if self.config.mode == "auto":
            target = float(self.config.budget)
        else:
            target = self._pass_before / self.config.target_ratio
        budget = target - self._pass_fixed_after
        self.plan = solve(sites, budget, self.config.group_size)
        self._calibrating = False
        self._solved = True

    # -- pack / unpack ---------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        st = _state()
        if st.in_codec:
            return t
        if isinstance(t, torch.nn.Parameter) or (t._base is not None and isinstance(t._base, torch.nn.Parameter)):
            return t  # alive anyway: not counted
        modules = st.modules
        module = modules[-1][0] if modules else ""
        index = st.op_packs
        st.op_packs = index + 1
        st.in_codec = True
        try:
            return self._pack_counted(t, st.op, module, modules, index)
        finally:
            st.in_codec = False

    def _pack_counted(self, t: torch.Tensor, op: str, module: str, modules: list, index: int) -> Any:
        storage = t.untyped_storage()
        skey = (storage.data_ptr(), storage.nbytes(), t.device)
        param = _param_source(t) if t.is_floating_point() else None
        if param is not None:
            handle = _ParamCast(param, t)
            before = self._first_sight(skey, t, storage.nbytes())
            self._account(handle, module, "param_cast", "param_cast", before, 0, fixed=True)
            return handle

        kept = self._keep_reason(t, modules)
        if kept is not None:
            return self._keep(t, skey, module, kept)
        if t.dtype == torch.bool:
            return self._store(t, BitmaskSpec(), 1, "mask", module, None)

        cls = classify(op, tuple(c for _, c in modules), t, index)
        if self.config.mode == "lossless":
            return self._keep(t, skey, module, cls)
        if cls == "softmax" and t.grad_fn is None and self._is_two_valued(t):
            # a float dropout mask {0, 1/(1-p)} saved by attention's math path: 1 bit, lossless
            return self._store(t, BitmaskSpec(), 1, "mask", module, None)
        return self._store(t, None, None, cls, module, op)

    def _keep(self, t: torch.Tensor, skey: tuple, module: str, reason: str) -> Any:
        """Keep ``t`` as it is (counted once per storage). A small view of a much larger storage
        is kept as a copy, so the large storage can be freed (ViT's [CLS] slice of the hidden
        states, the last position of the logits)."""
        before = self._first_sight(skey, t, t.untyped_storage().nbytes())
        # A tensor with a grad_fn may be the op's own output: returning it would make a reference
        # cycle (output -> grad_fn -> saved output) that outlives a graph dropped without backward.
        kept = t.detach() if t.grad_fn is not None else t
        after = before
        if before and 2 * t.numel() * t.element_size() < before:
            kept = t.detach().clone()
            after = kept.numel() * kept.element_size()
        elif before:
            self._remember(("seen",) + skey, kept, kept)  # alive exactly as long as the graph holds it
        if before:
            self._account(kept, module, "raw", reason, before, after, fixed=True)
        return kept

    @staticmethod
    def _is_two_valued(t: torch.Tensor) -> bool:
        if not t.is_floating_point() or t.numel() == 0:
            return False
        flat = t.reshape(-1)
        top = flat.amax()
        return bool(((flat == 0) | (flat == top)).all())

    def _first_sight(self, skey: tuple, t: torch.Tensor, nbytes: int) -> int:
        """``nbytes`` the first time a live storage is saved in this pass, else 0 (counted once)."""
        seen = self._cache.get(("seen",) + skey)
        if seen is not None and seen[0]() is not None:
            return 0
        self._remember(("seen",) + skey, t, t)  # callers re-anchor on what they keep
        return nbytes

    def _keep_reason(self, t: torch.Tensor, modules: list) -> str | None:
        if not (t.is_floating_point() or t.dtype == torch.bool):
            return "integer"
        if t.is_complex():
            return "complex"
        if t.numel() < self.config.min_numel:
            return "tiny"
        if _is_kept(t):
            return "kept"
        if self.config.keep_modules:
            keep = self.config.keep_modules
            for name, cls_name in modules:
                if name in keep or cls_name in keep or any(name.startswith(k + ".") for k in keep):
                    return "kept_module"
        return None

    def _site_key(self, module: str, op: str) -> tuple:
        base = (module, op)
        n = self._counters.get(base, 0)
        self._counters[base] = n + 1
        return (module, op, n)

    def _note_recipe(self, func: Any, args: tuple, kwargs: dict, result: torch.Tensor) -> None:
        """Right after a cheap op ran: remember how to rebuild ``result`` from what ciuic keeps.

        The inputs are resolved now, while they are alive (they may be freed, as Python objects,
        before ``result`` is saved): each must be a parameter, a tensor kept exact, a pack, or
        itself recomputable. Only weak references are held, so nothing is kept alive."""
        if self.config.mode == "lossless" or not torch.is_grad_enabled():
            return
        sources = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if not a.is_floating_point():
                    return
                source = self._source_of(a)
                if source is None:
                    return
                sources.append(source)
            elif isinstance(a, (int, float, bool)) or a is None:
                sources.append(("const", a))
            else:
                return
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return
        if not result.is_contiguous() or result.storage_offset() != 0:
            return  # views of the recomputed (contiguous) result are rebuilt with as_strided
        if len(self._recipes) > 4096:
            self._recipes = {k: v for k, v in self._recipes.items() if v[0]() is not None}
        self._recipes[id(result)] = (weakref.ref(result), result._version, func, sources, dict(kwargs))

    def _source_of(self, a: torch.Tensor) -> tuple | None:
        """Where backward can get ``a`` back without storing it again, as a weak description."""
        if isinstance(a, torch.nn.Parameter) or isinstance(a._base, torch.nn.Parameter):
            return ("const", a)  # alive anyway
        param = _param_source(a)
        if param is not None:
            return ("const", _ParamCast(param, a))
        view = _view_of(a)
        storage = a.untyped_storage()
        hit = self._cache.get(_pack_key(a, view))
        if hit is not None and hit[0]() is not None and hit[1]() is not None:
            handle = hit[1]()
            if isinstance(handle, torch.Tensor):
                # kept exact: refer to the tensor the graph holds (``a`` itself may be a
                # temporary whose Python object dies before the recomputed tensor is saved)
                return ("weak", weakref.ref(handle), _view_of(a))
            if isinstance(handle, _Pack):
                return ("pack", weakref.ref(handle), view, hit[2])
            if isinstance(handle, _Recompute):
                if handle.view is None and view[1] is not None and a.shape == view[0] and a.is_contiguous() \
                        and a.storage_offset() == 0:
                    return ("weak", weakref.ref(handle))
                return None
            return None
        seen = self._cache.get(("seen", storage.data_ptr(), storage.nbytes(), a.device))
        if seen is not None and seen[0]() is not None and isinstance(seen[1](), torch.Tensor):
            held = seen[1]()  # kept raw (tiny, integer, marked): the graph holds it
            if held.untyped_storage().data_ptr() == storage.data_ptr():
                return ("weak", weakref.ref(held), _view_of(a))
        return None

    def _recipe_for(self, t: torch.Tensor, module: str) -> "_Recompute | None":
        """A handle that recomputes ``t`` from what ciuic already keeps, or None."""
        for owner in (t, t._base):
            entry = self._recipes.get(id(owner)) if owner is not None else None
            # ids are reused once an object dies: the weak reference proves it is the same object
            if entry is not None and entry[0]() is owner:
                break
        else:
            return None
        if owner._version != entry[1]:
            return None
        _, _, func, sources, kwargs = entry
        args, sites = [], []
        for source in sources:
            kind = source[0]
            if kind == "const":
                args.append(source[1])
                continue
            target = source[1]()
            if target is None:
                return None
            if kind == "pack":
                args.append(_View(target, source[2]))
                if source[3] is not None:
                    sites.append(source[3])
            elif isinstance(target, torch.Tensor) and len(source) > 2:
                shape, stride, offset = source[2]
                args.append(target if stride is None or (tuple(target.shape) == shape and target.stride() == stride
                                                         and target.storage_offset() == offset)
                            else target.as_strided(shape, stride, offset))
            else:
                args.append(target)
                if isinstance(target, _Recompute):
                    sites.extend(target.sites)
        sites = tuple(dict.fromkeys(sites))
        self._add_consumer(sites, module)  # the recomputed tensor's error reaches this module
        view = None
        if t is not owner or t.shape != owner.shape:
            view = (tuple(t.shape), t.stride(), t.storage_offset())
        return _Recompute(func, args, kwargs, owner.dtype, view, sites)

    def _add_consumer(self, site_keys: tuple, module: str) -> None:
        if not self._calibrating:
            return
        for key in site_keys:
            site = self._sites.get(key)
            if site is not None and module not in site.consumers:
                site.consumers.append(module)

    def _seed(self) -> int:
        """A fresh stochastic-rounding seed per pack, derived from the config's seed."""
        self._seed_counter += 1
        return (self.config.seed << 32) + self._seed_counter

    def _store(self, t: torch.Tensor, spec: Any, level: int | None, cls: str, module: str,
               op: str | None) -> Any:
        """Pack ``t``'s storage once (or reuse the pack of an earlier save of it); return a view."""
        dense, view = _source(t.detach())
        key = _pack_key(t, view)
        hit = self._cache.get(key)
        if hit is not None:
            original, pack = hit[0](), hit[1]()
            # The original being alive proves its storage was not freed and reused: a hit is real.
            if original is not None and pack is not None:
                if isinstance(pack, torch.Tensor):
                    return t.detach()  # kept exact: its storage is already held (and counted)
                if isinstance(pack, _Recompute):
                    self._add_consumer(pack.sites, module)
                    return _Recompute(pack.func, pack.args, pack.kwargs, pack.dtype,
                                      (tuple(t.shape), t.stride(), t.storage_offset()), pack.sites)
                if op is not None:
                    self._maybe_upgrade(pack, dense, op, t, modules=_state().modules)
                    site = self._sites.get(hit[2]) if self._calibrating else None
                    if site is not None and module not in site.consumers:
                        site.consumers.append(module)  # its error reaches this module's gradient too
                return _View(pack, view)

        site_key = None
        if spec is None and cls in _RECOMPUTE_CLASSES and self._recipes:
            recipe = self._recipe_for(t, module)
            if recipe is not None:
                before = dense.numel() * dense.element_size()
                self._account(recipe, module, "recompute", cls, before, 0, fixed=True)
                self._remember(key, t, recipe)
                return recipe
        if spec is None:  # a float activation: the plan decides
            site_key = self._site_key(module, op)
            level = self.plan.level_for(site_key, cls)
            if self._calibrating:
                self._sites[site_key] = Site(
                    key=site_key, cls=cls, module=module, numel=dense.numel(),
                    element_size=dense.element_size(),
                    group_ranges_sq_sum=group_ranges_sq_sum(dense, self.config.group_size),
                )
            if level == EXACT:
                before = dense.numel() * dense.element_size()
                kept = t.detach()  # returning the saved tensor itself would make a reference cycle
                self._account(kept, module, "raw", cls, before, before, fixed=False)
                self._remember(key, kept, kept, site_key)
                self._remember(("seen", t.untyped_storage().data_ptr(),
                                t.untyped_storage().nbytes(), t.device), kept, kept)
                return kept
            spec = QuantSpec(level, self.config.group_size, self.config.rounding)
        with torch.no_grad():
            packed = ciuic_kernels.encode(dense, spec, seed=self._seed())
        pack = _Pack(packed, level, cls)
        codec = packed.codec if packed.codec != "quant" else f"int{level}"
        self._account(pack, module, codec, cls, dense.numel() * dense.element_size(), packed.nbytes,
                      fixed=site_key is None)
        self._remember(key, t, pack, site_key)
        return _View(pack, view)

    def _maybe_upgrade(self, pack: "_Pack", dense: torch.Tensor, op: str, t: torch.Tensor,
                       modules: list) -> None:
        """A tensor packed for a robust op is now also saved by a sensitive one: re-pack finer."""
        if not isinstance(pack, _Pack) or pack.level in (EXACT, 1):
            return
        cls = classify(op, tuple(c for _, c in modules), t, _state().op_packs - 1)
        allowed = CLASS_LEVELS[cls]
        if pack.level in allowed:
            return
        finer = [lv for lv in allowed if lv != EXACT and lv > pack.level]
        if not finer:
            return
        with torch.no_grad():
            new = ciuic_kernels.encode(dense, QuantSpec(finer[-1], self.config.group_size,
                                                        self.config.rounding), seed=self._seed())
        delta = new.nbytes - pack.packed.nbytes
        pack.packed, pack.level = new, finer[-1]
        counters = pack.charge[0]
        with _stats_lock:
            counters.bytes_after += delta
            counters.live_after += delta
            counters.peak_live_after = max(counters.peak_live_after, counters.live_after)
            pack.charge[2] += delta

    def _remember(self, key: tuple, t: torch.Tensor, handle: Any, site_key: tuple | None = None) -> None:
        # Weak references only: the cache must never keep a tensor or a pack alive after backward.
        if len(self._cache) > 4096:
            self._cache = {k: v for k, v in self._cache.items() if v[0]() is not None}
        # Anchor on the tensor owning the storage: a view (F.linear saves x.view(-1, h), a new
        # object per call) dies at once, its base lives as long as the storage is in use.
        anchor = t._base if t._base is not None else t
        self._cache[key] = (weakref.ref(anchor), weakref.ref(handle), site_key)

    def _account(self, handle: Any, module: str, codec: str, cls: str, before: int, after: int,
                 fixed: bool) -> None:
        _record(module, codec, cls, before, after)
        self._pass_before += before
        if fixed:
            self._pass_fixed_after += after
        charge = [_stats, before, after]
        if isinstance(handle, _Pack):
            handle.charge = charge  # a later re-pack (``_maybe_upgrade``) adjusts what is released
        try:
            weakref.finalize(handle, _release, charge)
        except TypeError:
            _release(charge)

    def _unpack(self, handle: Any) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        st = _state()
        prev, st.in_codec = st.in_codec, True
        try:
            return handle.unpack()
        finally:
            st.in_codec = prev
