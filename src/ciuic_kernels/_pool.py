"""Pooled buffers for the tensors of a pack: the memory one training step's packs leave behind is
handed to the next step's packs instead of going back to the allocator and being asked for again.

A codec asks for the tensors of a pack with ``empty_many([(numel, dtype), ...], device)``. Outside a
``lending(pool)`` block that is one ``torch.empty`` per tensor, exactly as before. Inside it, the
pack gets *one* uint8 buffer from the pool (each tensor a 16-byte aligned view of it): a free buffer
of exactly that size is reused, else a new one is allocated. Whoever owns the pack hands its buffer
back with ``pool.give(packed)`` when the pack dies (the engine does it when autograd frees the saved
tensor); it then waits in a free list keyed by (device, stream, bytes).

Safety does not rest on the give: a free buffer is handed out again only when nothing else holds a
view of its storage (PyTorch's storage use count), so a live pack is never overwritten; a pack that
dies without a give just frees its memory.

The pool holds no more than the pass before needed. ``new_pass()`` (the engine calls it when a
forward pass begins) frees the free buffers the pass that just ended did not ask for (its demand per
size is counted), and a miss (a size with no free buffer) frees waiting buffers as much as it
allocates: first those beyond what the rest of the pass is expected to take, then any (the pass is
not the previous one again, so the pool then holds no more than the larger of the two). On a fixed-shape
workload every pack of a steady-state pass is served from buffers the previous pass released:
``allocations`` stops growing after the second pass (a recalibration pass, whose packs have other
sizes, allocates again). ``clear()`` frees every free buffer (``ciuic.empty_pool()``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

_ALIGN = 16  # bytes: every tensor of a pooled pack starts on a 16-byte boundary (vector loads)

_local = threading.local()
# One lock for every pool and the totals (packs die on autograd's threads). Reentrant: the cyclic
# garbage collector may free a pack, whose give() takes the lock, while this thread holds it.
_lock = threading.RLock()
_pools: "weakref.WeakSet[PackPool]" = weakref.WeakSet()

# Counters over every pool of the process (cumulative, except free_bytes).
TOTALS = {"allocations": 0, "reuses": 0, "allocated_bytes": 0, "reused_bytes": 0, "busy": 0,
          "trimmed": 0, "trimmed_bytes": 0, "free_bytes": 0}


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _stream_of(device: torch.device) -> int:
    """Buffers are reused on the stream they were used on (the caching allocator's own rule)."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).stream_id
    return 0


def _unshared(buffer: torch.Tensor) -> bool:
    """True when ``buffer`` is the only tensor using its storage (the storage object made for the
    count is the second user)."""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2


class PackPool:
    """Free pack buffers by (device, stream, bytes). One per engine plan (configuration and thread),
    so its trimming follows that thread's passes."""

    def __init__(self) -> None:
        self._free: dict[tuple, list] = {}  # key -> free buffers (uint8 tensors of key[2] bytes)
        # storage address -> (key, weak reference to the storage) of every buffer lent out: the
        # pool holds nothing of a lent buffer (a pack that dies without give() just frees it)
        self._lent: dict[int, tuple] = {}
        self._taken: dict[tuple, int] = {}  # key -> buffers asked for in this pass
        self._last: dict[tuple, int] = {}  # key -> buffers asked for in the previous pass
        _pools.add(self)

    # -- lending ---------------------------------------------------------------------------------
    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        key = (device, _stream_of(device), nbytes)
        with _lock:
            self._taken[key] = self._taken.get(key, 0) + 1
            free = self._free.get(key)
            while free:
                buffer = free.pop()
                TOTALS["free_bytes"] -= nbytes
                if _unshared(buffer):
                    TOTALS["reuses"] += 1
                    TOTALS["reused_bytes"] += nbytes
                    self._lend(buffer, key)
                    return buffer
                TOTALS["busy"] += 1  # never hand out memory a live view still reads
            self._make_room(nbytes, key)
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        with _lock:
            TOTALS["allocations"] += 1
            TOTALS["allocated_bytes"] += nbytes
            self._lend(buffer, key)
        return buffer

    def _make_room(self, nbytes: int, missed: tuple) -> None:
        """A miss: this pass is not the previous one again. Free at least ``nbytes`` of free buffers
        on the same device, first those the rest of the pass would not take even if it were (beyond
        what the previous pass asked for of their size, less what this pass took), then any: the
        pool then holds no more than the larger of the two passes, as an allocator would."""
        freed = 0
        for spare_only in (True, False):
            for key in list(self._free):
                if freed >= nbytes:
                    return
                if key[0] != missed[0]:
                    continue
                buffers = self._free[key]
                spare = len(buffers)
                if spare_only:
                    spare -= max(0, self._last.get(key, 0) - self._taken.get(key, 0))
                while spare > 0 and buffers and freed < nbytes:
                    buffers.pop(0)
                    spare -= 1
                    freed += key[2]
                    self._trimmed(key[2])
                if not buffers:
                    del self._free[key]

    def _lend(self, buffer: torch.Tensor, key: tuple) -> None:
        storage = buffer.untyped_storage()
        if len(self._lent) > 4096:  # forget buffers whose packs died without give()
            self._lent = {p: e for p, e in self._lent.items() if not e[1].expired()}
        self._lent[storage.data_ptr()] = (key, StorageWeakRef(storage))

    def give(self, packed: Any) -> None:
        """Hand back the buffer of ``packed`` (a ``Packed``; its nested packs too). Tensors that did
        not come from this pool are left alone. The pack must not be used afterwards."""
        for value in packed.tensors.values():
            if isinstance(value, torch.Tensor):
                self._give_storage(value)
            elif value is not None and hasattr(value, "tensors"):
                self.give(value)

    def _give_storage(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        with _lock:
            entry = self._lent.get(ptr)
            if entry is None or entry[1].cdata != storage._cdata:
                return  # not lent by this pool, or its buffer was already given back
            del self._lent[ptr]
            key = entry[0]
            buffer = torch.empty(0, dtype=torch.uint8, device=t.device)
            buffer.set_(storage, 0, (key[2],), (1,))  # the whole buffer again, whatever views it had
            self._free.setdefault(key, []).append(buffer)
            TOTALS["free_bytes"] += key[2]

    # -- trimming --------------------------------------------------------------------------------
    def new_pass(self) -> None:
        """A forward pass begins: free the free buffers beyond what the pass that ended asked for
        (per size; sizes it did not ask for at all go entirely)."""
        with _lock:
            last = self._last = self._taken
            self._taken = {}
            for key in list(self._free):
                buffers = self._free[key]
                extra = len(buffers) - last.get(key, 0)
                for _ in range(max(0, extra)):
                    buffers.pop(0)
                    self._trimmed(key[2])
                if not buffers:
                    del self._free[key]

    def clear(self) -> None:
        """Free every buffer waiting in the pool (buffers lent to live packs stay theirs)."""
        with _lock:
            for key, buffers in self._free.items():
                for _ in buffers:
                    self._trimmed(key[2])
            self._free.clear()

    def __del__(self) -> None:
        # its thread's plan is gone: so are the buffers waiting here (counted as trimmed)
        try:
            self.clear()
        except Exception:  # at interpreter exit the module's globals may be gone
            pass

    @staticmethod
    def _trimmed(nbytes: int) -> None:
        TOTALS["trimmed"] += 1
        TOTALS["trimmed_bytes"] += nbytes
        TOTALS["free_bytes"] -= nbytes

    def lent_bytes(self) -> int:
        with _lock:
            return sum(e[0][2] for e in self._lent.values() if not e[1].expired())


def counters() -> dict:
    """``TOTALS`` now, with ``lent_bytes``: bytes of pooled buffers held by live packs."""
    with _lock:
        out = dict(TOTALS)
        pools = list(_pools)
    out["lent_bytes"] = sum(p.lent_bytes() for p in pools)
    return out


def clear_all() -> None:
    """Free every buffer waiting in any pool."""
    with _lock:
        pools = list(_pools)
    for pool in pools:
        pool.clear()


class lending:
    """``with lending(pool):`` — packs made by this thread inside the block take their memory from
    ``pool`` (None: from torch, as outside the block)."""

    __slots__ = ("pool", "_prev")

    def __init__(self, pool: PackPool | None) -> None:
        self.pool = pool

    def __enter__(self) -> None:
        self._prev = getattr(_local, "pool", None)
        _local.pool = self.pool

    def __exit__(self, *exc: Any) -> None:
        _local.pool = self._prev


def empty_many(specs: Sequence[tuple[int, torch.dtype]], device: torch.device) -> list[torch.Tensor]:
    """Uninitialised 1-D tensors of ``(numel, dtype)`` each for one pack: one pooled buffer inside
    ``lending(pool)``, else one ``torch.empty`` each."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        return [torch.empty(n, dtype=dtype, device=device) for n, dtype in specs]
    sizes = [n * dtype.itemsize for n, dtype in specs]
    buffer = pool.take(sum(_aligned(s) for s in sizes), torch.device(device))
    out, start = [], 0
    for (n, dtype), size in zip(specs, sizes):
        out.append(buffer[start:start + size].view(dtype))
        start += _aligned(size)
    return out


def adopt(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Tensors a reference codec computed (not written into ``empty_many`` buffers), moved into one
    pooled buffer inside ``lending(pool)`` (a copy); returned as they are outside it."""
    if getattr(_local, "pool", None) is None or not tensors:
        return list(tensors)
    out = empty_many([(t.numel(), t.dtype) for t in tensors], tensors[0].device)
    for dst, src in zip(out, tensors):
        dst.copy_(src.reshape(-1))
    return [dst.view(t.shape) for dst, t in zip(out, tensors)]

