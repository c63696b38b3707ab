"""Byte accounting: what saved tensors would have kept (``before``) and what ciuic keeps (``after``).

One ``CompressionStats`` object is live at a time (``reset_stats()`` starts a new one). Every pack is
*charged* to the counters that were live when it was made and, when it dies, released against those
same counters: a reset never makes live bytes go negative, and one run's peaks never include another's.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from ciuic_kernels import _pool


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

    def copy(self) -> "ByteCount":
        return ByteCount(self.tensors, self.before, self.after)

    def to_dict(self) -> dict:
        return {"tensors": self.tensors, "before": self.before, "after": self.after, "ratio": self.ratio}


@dataclass
class CompressionStats:
    """Bytes saved tensors would have kept (``bytes_before``) and what ciuic kept (``bytes_after``).

    Cumulative since the last ``reset_stats()``; each unique saved tensor is counted once (at the
    dtype it was saved in). ``live_*`` are the bytes of the packs made since then that are
    alive now (0 after backward when nothing leaks); ``peak_live_after`` is their maximum.
    ``passes`` counts forward passes (what is saved between two backwards). ``by_module``,
    ``by_codec`` and ``by_class`` break the totals down; ``by_module_codec[module][codec]`` both at
    once. Codec names: ``int8``/``int4``/``int2`` (quantized), ``raw`` (kept exact), ``param_cast``
    (a copy of a parameter or buffer, rebuilt from it: 0 bytes), ``recompute`` (rebuilt by re-running
    a cheap op: 0 bytes), ``bitmask`` (1 bit). ``plan`` describes the last solved bit plan (None
    before one is solved): ``budget_bytes``, ``planned_bytes``, ``feasible``, ``min_bytes`` (the
    smallest a pass can get at the lowest precision each class allows), ``pass_before`` (bytes the
    uncompressed pass keeps) and ``levels_by_module`` (module -> {bits: tensors}, 0 = exact).
    ``pool`` counts the pack pool's work since the reset (``config.pool``): ``allocations`` and
    ``allocated_bytes`` (pack buffers asked from torch), ``reuses`` and ``reused_bytes`` (served
    from buffers earlier packs left), ``busy`` (free buffers skipped because a view of them was still
    alive), ``trimmed`` and ``trimmed_bytes`` (free buffers freed because the previous pass did not
    need them, to make room, or by ``ciuic.empty_pool()``); and, now,
    ``free_bytes`` (waiting in the pool) and ``lent_bytes`` (held by live packs).
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
    by_module_codec: dict = field(default_factory=dict)
    plan: dict | None = None
    pool: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.bytes_after == 0:
            return 1.0 if self.bytes_before == 0 else float("inf")
        return self.bytes_before / self.bytes_after

    def copy(self) -> "CompressionStats":
        out = CompressionStats(**{name: getattr(self, name) for name in _SCALARS})
        out.by_module = {k: v.copy() for k, v in self.by_module.items()}
        out.by_codec = {k: v.copy() for k, v in self.by_codec.items()}
        out.by_class = {k: v.copy() for k, v in self.by_class.items()}
        out.by_module_codec = {m: {c: v.copy() for c, v in d.items()} for m, d in self.by_module_codec.items()}
        out.plan = None if self.plan is None else {
            k: (dict(v) if isinstance(v, dict) else v) for k, v in self.plan.items()}
        out.pool = dict(self.pool)
        return out

    def to_dict(self) -> dict:
        def table(d: dict) -> dict:
            return {k: v.to_dict() for k, v in d.items()}

        out = {name: getattr(self, name) for name in _SCALARS}
        out["ratio"] = self.ratio
        out["by_module"] = table(self.by_module)
        out["by_codec"] = table(self.by_codec)
        out["by_class"] = table(self.by_class)
        out["by_module_codec"] = {m: table(d) for m, d in self.by_module_codec.items()}
        out["plan"] = self.plan
        out["pool"] = dict(self.pool)
        return out


_SCALARS = ("tensors_packed", "bytes_before", "bytes_after", "live_before", "live_after",
            "peak_live_before", "peak_live_after", "passes")

_stats = CompressionStats()
_lock = threading.Lock()
_POOL_CUMULATIVE = ("allocations", "reuses", "allocated_bytes", "reused_bytes", "busy", "trimmed",
                    "trimmed_bytes")
_pool_base = {name: 0 for name in _POOL_CUMULATIVE}  # the pool's counters at the last reset


def stats() -> CompressionStats:
    """A snapshot of the accounting (bytes before/after per module, codec and tensor class)."""
    pool = _pool.counters()
    with _lock:
        out = _stats.copy()
        for name in _POOL_CUMULATIVE:
            pool[name] -= _pool_base[name]
    out.pool = pool
    return out


def reset_stats() -> None:
    """Start counting afresh: every counter, live and peak bytes included, covers only the packs
    made after this call (packs made before are released against the old counters)."""
    global _stats
    pool = _pool.counters()
    with _lock:
        plan = _stats.plan  # not a counter: the plan in force stays described
        _stats = CompressionStats(plan=plan)
        _pool_base.update({name: pool[name] for name in _POOL_CUMULATIVE})


class Charge:
    """What one handle was charged: released (against the same counters) when the handle dies."""

    __slots__ = ("counters", "before", "after", "module", "codec", "cls")

    def __init__(self, counters: CompressionStats, before: int, after: int, module: str, codec: str,
                 cls: str) -> None:
        self.counters, self.before, self.after = counters, before, after
        self.module, self.codec, self.cls = module, codec, cls

    def release(self) -> None:
        with _lock:
            self.counters.live_before -= self.before
            self.counters.live_after -= self.after

    def repack(self, after: int, codec: str) -> None:
        """The handle was re-encoded (finer) into ``after`` bytes with ``codec``: every table
        moves with it, so the rows keep adding up to the totals."""
        with _lock:
            c = self.counters
            delta = after - self.after
            c.bytes_after += delta
            c.live_after += delta
            c.peak_live_after = max(c.peak_live_after, c.live_after)
            c.by_module[self.module].after += delta
            c.by_class[self.cls].after += delta
            for table, old, new in ((c.by_codec, self.codec, codec),
                                    (c.by_module_codec[self.module], self.codec, codec)):
                row = table[old]
                row.tensors -= 1
                row.before -= self.before
                row.after -= self.after
                if not row.tensors:
                    del table[old]
                table.setdefault(new, ByteCount()).add(self.before, after)
            self.after, self.codec = after, codec


def charge(handle: Any, module: str, codec: str, cls: str, before: int, after: int) -> Charge:
    """Count one saved tensor and tie its live bytes to ``handle``'s lifetime."""
    module = module or "<top>"
    with _lock:
        st = _stats  # read once, under the lock: the charge and the record use the same counters
        st.tensors_packed += 1
        st.bytes_before += before
        st.bytes_after += after
        st.live_before += before
        st.live_after += after
        st.peak_live_before = max(st.peak_live_before, st.live_before)
        st.peak_live_after = max(st.peak_live_after, st.live_after)
        st.by_module.setdefault(module, ByteCount()).add(before, after)
        st.by_codec.setdefault(codec, ByteCount()).add(before, after)
        st.by_class.setdefault(cls, ByteCount()).add(before, after)
        st.by_module_codec.setdefault(module, {}).setdefault(codec, ByteCount()).add(before, after)
        result = Charge(st, before, after, module, codec, cls)
    try:
        weakref.finalize(handle, result.release)
    except TypeError:  # not weak-referenceable: nothing holds it, it is released now
        result.release()
    return result


def count_pass() -> None:
    with _lock:
        _stats.passes += 1


def record_plan(plan: dict) -> None:
    with _lock:
        _stats.plan = plan
