"""Memory meters: what autograd keeps for backward, and what the process heap holds.

``SavedTensorMeter`` counts, with an accounting-only ``saved_tensors_hooks``, the bytes of every
unique storage the autograd graph keeps (parameters and their views excluded: they are alive anyway).
It is the baseline side of every ratio ciuic reports. ``heap_bytes()`` is an independent meter on
CPU: glibc ``mallinfo2()`` (arena bytes in use + mmapped bytes), which sees what the graph holds
without knowing anything about tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import weakref
from typing import Any, Callable

import torch


class SavedTensorMeter:
    """Count the bytes autograd saves for backward inside the block (nothing is changed).

        with SavedTensorMeter() as meter:
            loss = model(x).sum()
        meter.bytes  # unique storages, each counted once
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.tensors = 0
        self._seen: dict[int, weakref.ref] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        # pack returns t.detach(): returning an op's own output would make a reference cycle
        # (output -> grad_fn -> saved output) that keeps a graph dropped without backward alive.

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        kept = t.detach()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        ref = self._seen.get(ptr)
        if ref is not None and ref() is not None:
            return kept  # same storage, still alive: already counted
        self._seen[ptr] = weakref.ref(kept)
        self.bytes += storage.nbytes()
        self.tensors += 1
        return kept

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` under a ``SavedTensorMeter``; return (bytes saved for backward, fn's result)."""
    with SavedTensorMeter() as meter:
        out = fn()
    return meter.bytes, out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.lru_cache(maxsize=None)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    if not hasattr(lib, "mallinfo2"):
        return None
    lib.mallinfo2.restype = _Mallinfo2
    return lib


def heap_available() -> bool:
    """True where glibc's ``mallinfo2`` exists (Linux, glibc >= 2.33)."""
    return _libc() is not None


def heap_bytes() -> int:
    """Bytes the C heap holds right now: ``uordblks + hblkhd`` from glibc ``mallinfo2()``."""
    lib = _libc()
    if lib is None:
        raise RuntimeError("heap_bytes() needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
    gc.collect()
    info = lib.mallinfo2()
    return int(info.uordblks + info.hblkhd)
