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
from .policy import EXACT, Plan, Site, classify, group_ranges_sq_sum, solve

_tls = threading.local()


def _state() -> Any:
    s = _tls
    if not hasattr(s, "engines"):
        s.engines = []  # active engines, innermost last
        s.op = ""
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
    dtype it was saved in). ``live_*`` are the bytes of packs alive right now (0 after backward
    when nothing leaks); ``peak_live_after`` is their maximum.
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
    """Zero the cumulative counters (live bytes of packs still alive are kept)."""
    global _stats
    with _stats_lock:
        live = (_stats.live_before, _stats.live_after)
        _stats = CompressionStats(live_before=live[0], live_after=live[1],
                                  peak_live_before=live[0], peak_live_after=live[1])


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


def _release(before: int, after: int) -> None:
    with _stats_lock:
        _stats.live_before -= before
        _stats.live_after -= after


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


class _Layout:
    """How to turn the packed (dense, memory-ordered) data back into the saved tensor's layout."""

    __slots__ = ("shape", "permutation", "expand_shape")

    def __init__(self, t: torch.Tensor) -> None:
        self.expand_shape = None
        self.permutation = None
        self.shape = t.shape

    @staticmethod
    def dense_source(t: torch.Tensor) -> tuple[torch.Tensor, "_Layout"]:
        """A dense tensor holding exactly ``t``'s data (no copy when possible) and the layout."""
        layout = _Layout(t)
        if t.dim() and any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
            # broadcast (expanded) tensor: store one copy of the broadcast dims
            index = tuple(slice(0, 1) if st == 0 and sz > 1 else slice(None)
                          for st, sz in zip(t.stride(), t.shape))
            layout.expand_shape = t.shape
            t = t[index]
        if t.dim() > 1 and not t.is_contiguous():
            perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
            permuted = t.permute(perm)
            if permuted.is_contiguous():
                layout.permutation = perm
                t = permuted
            else:
                t = t.contiguous()
        layout.shape = t.shape
        return t, layout

    def restore(self, dense: torch.Tensor) -> torch.Tensor:
        t = dense.view(self.shape) if dense.shape != self.shape else dense
        if self.permutation is not None:
            inverse = [0] * len(self.permutation)
            for i, p in enumerate(self.permutation):
                inverse[p] = i
            t = t.permute(inverse)
        if self.expand_shape is not None:
            t = t.expand(self.expand_shape)
        return t


class _Pack:
    """A compressed saved tensor, shared by every op that saved the same tensor."""

    __slots__ = ("packed", "layout", "level", "cls", "uses", "_decoded", "__weakref__")

    def __init__(self, packed: Packed, layout: _Layout, level: int, cls: str) -> None:
        self.packed = packed
        self.layout = layout
        self.level = level
        self.cls = cls
        self.uses = 1
        self._decoded = None

    def unpack(self) -> torch.Tensor:
        # Several consumers (q/k/v projections) unpack the same pack one after the other in
        # backward: decode once, keep the result until the last of them has it.
        out = self._decoded
        if out is None:
            with torch.no_grad():
                out = self.layout.restore(ciuic_kernels.decode(self.packed))
        self.uses -= 1
        self._decoded = out if self.uses > 0 else None
        return out


# ----------------------------------------------------------------------------------------------
# Op and module tracking
# ----------------------------------------------------------------------------------------------
class _OpTracker(TorchFunctionMode):
    """Remembers which torch function is running, so pack knows which op saves a tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        st = _state()
        if st.in_codec or st.op:
            return func(*args, **(kwargs or {}))
        st.op = getattr(func, "__name__", "")
        try:
            return func(*args, **(kwargs or {}))
        finally:
            st.op = ""


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
    if engine._calibrating and isinstance(output, torch.Tensor) and output.requires_grad:
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
        self._calibrating = config.mode != "lossless"
        self._sites: dict[tuple, Site] = {}
        self._gradients: dict[str, float] = {}
        self._counters: dict[tuple, int] = {}
        self._cache: dict[tuple, tuple[weakref.ref, _Pack]] = {}
        self._pass_before = 0
        self._pass_fixed_after = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._tracker = _OpTracker()
        self._entered = False
        self._thread = None

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

    @property
    def active(self) -> bool:
        return self._entered

    # -- passes and calibration ------------------------------------------------------------------
    def _begin_pass(self) -> None:
        if self.passes and self._sites and self._calibrating:
            self._solve()
        self.passes += 1
        with _stats_lock:
            _stats.passes += 1
        self._counters.clear()
        self._cache.clear()
        self._pass_before = 0
        self._pass_fixed_after = 0
        every = self.config.recalibrate_every
        self._calibrating = self.config.mode != "lossless" and (
            self.passes == 1 or (every > 0 and (self.passes - 1) % every == 0)
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

    # -- pack / unpack ---------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        st = _state()
        if st.in_codec:
            return t
        if isinstance(t, torch.nn.Parameter) or (t._base is not None and isinstance(t._base, torch.nn.Parameter)):
            return t  # alive anyway: not counted
        modules = st.modules
        module = modules[-1][0] if modules else ""
        st.in_codec = True
        try:
            return self._pack_counted(t, st.op, module, modules)
        finally:
            st.in_codec = False

    def _pack_counted(self, t: torch.Tensor, op: str, module: str, modules: list) -> Any:
        nbytes = t.numel() * t.element_size()
        param = _param_source(t) if t.is_floating_point() else None
        if param is not None:
            handle = _ParamCast(param, t)
            self._account(handle, module, "param_cast", "param_cast", nbytes, 0, fixed=True)
            return handle

        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
               t._version, t.dtype)
        hit = self._cache.get(key)
        if hit is not None:
            original, handle = hit[0](), hit[1]()
            # The original being alive proves its storage was not freed and reused: a hit is real.
            if original is not None and handle is not None:
                if isinstance(handle, _Pack):
                    handle.uses += 1
                    self._maybe_upgrade(handle, t, op, modules)
                site = self._sites.get(hit[2]) if self._calibrating else None
                if site is not None and module not in site.consumers:
                    site.consumers.append(module)  # its error reaches this module's gradient too
                return handle

        kept = self._keep_reason(t, modules)
        if kept is not None:
            self._account(t, module, "raw", kept, nbytes, nbytes, fixed=True)
            self._remember(key, t, t)
            return t
        if t.dtype == torch.bool:
            return self._store(t, key, BitmaskSpec(), 1, "mask", module, nbytes)

        cls = classify(op, tuple(c for _, c in modules), t)
        site_key = self._site_key(module, op)
        if self.config.mode == "lossless":
            level = EXACT
        elif self._calibrating:
            level = self.plan.level_for(site_key, cls)
            self._sites[site_key] = Site(
                key=site_key, cls=cls, module=module, numel=t.numel(), element_size=t.element_size(),
                group_ranges_sq_sum=group_ranges_sq_sum(t, self.config.group_size),
            )
        else:
            level = self.plan.level_for(site_key, cls)
        if level == EXACT:
            self._account(t, module, "raw", cls, nbytes, nbytes, fixed=self.config.mode == "lossless")
            self._remember(key, t, t, site_key)
            return t
        spec = QuantSpec(level, self.config.group_size, self.config.rounding)
        return self._store(t, key, spec, level, cls, module, nbytes, site_key)

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

    def _seed(self) -> int:
        self._seed_counter = getattr(self, "_seed_counter", 0) + 1
        return (self.config.seed << 32) + self._seed_counter

    def _store(self, t: torch.Tensor, key: tuple, spec: Any, level: int, cls: str, module: str,
               nbytes: int, site_key: tuple | None = None) -> _Pack:
        with torch.no_grad():
            dense, layout = _Layout.dense_source(t.detach())
            packed = ciuic_kernels.encode(dense, spec, seed=self._seed())
        pack = _Pack(packed, layout, level, cls)
        codec = packed.codec if packed.codec != "quant" else f"int{level}"
        self._account(pack, module, codec, cls, nbytes, packed.nbytes, fixed=level == 1)
        self._remember(key, t, pack, site_key)
        return pack

    def _maybe_upgrade(self, pack: _Pack, t: torch.Tensor, op: str, modules: list) -> None:
        """A tensor packed for a robust op is now also saved by a sensitive one: re-pack finer."""
        if pack.level in (EXACT, 1):
            return
        cls = classify(op, tuple(c for _, c in modules), t)
        from .policy import CLASS_LEVELS

        finest = [lv for lv in CLASS_LEVELS[cls] if lv != EXACT]
        if finest and finest[0] > pack.level and pack.level not in CLASS_LEVELS[cls]:
            level = finest[0] if len(CLASS_LEVELS[cls]) > 1 else EXACT
            if level == EXACT:
                return
            with torch.no_grad():
                dense, _ = _Layout.dense_source(t.detach())
                new = ciuic_kernels.encode(dense, QuantSpec(level, self.config.group_size,
                                                            self.config.rounding), seed=self._seed())
            delta = new.nbytes - pack.packed.nbytes
            pack.packed, pack.level = new, level
            with _stats_lock:
                _stats.bytes_after += delta
                _stats.live_after += delta

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
        try:
            weakref.finalize(handle, _release, before, after)
        except TypeError:
            _release(before, after)

    def _unpack(self, handle: Any) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        st = _state()
        prev, st.in_codec = st.in_codec, True
        try:
            return handle.unpack()
        finally:
            st.in_codec = prev
