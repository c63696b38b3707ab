"""Memory meters and the allocator set-up: what autograd keeps for backward, what the process heap
holds, how PyTorch's CUDA caching allocator is configured, and CUDA memory over time.

``SavedTensorMeter`` counts, with an accounting-only ``saved_tensors_hooks``, the bytes of every
unique storage the autograd graph keeps (parameters and their views excluded: they are alive anyway).
It is the baseline side of every ratio ciuic reports. ``heap_bytes()`` is an independent meter on
CPU: glibc ``mallinfo2()`` (arena bytes in use + mmapped bytes), which sees what the graph holds
without knowing anything about tensors.

``configure_allocator(config)`` sets the CUDA caching allocator up for compression (called when
compression is enabled); ``CudaMemoryTimeline`` records allocated and reserved bytes over a step
(PyTorch's memory history), for ``ciuic.memory_report``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping

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


# ----------------------------------------------------------------------------------------------
# CUDA caching allocator set-up
# ----------------------------------------------------------------------------------------------
# The variables PyTorch reads its allocator settings from: the device-generic name (torch >= 2.9)
# and the CUDA one (older, still read). A user's value is merged into, never replaced.
ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
# What compression wants from the allocator. Packs are many short-lived buffers of odd sizes (one
# per saved tensor, freed in backward); with fixed-size segments the caching allocator splits and
# strands them ("reserved but unallocated" grows). Expandable segments map more pages into one
# segment instead, so freed pack memory is reused across sizes.
ALLOCATOR_SETTINGS = {"expandable_segments": "True"}

_allocator_lock = threading.Lock()
_allocator_warned = False
_allocator_state: dict = {"status": "not configured"}


def _split_settings(text: str) -> list[tuple[str, str]]:
    """``"a:1,b:[x:1,y:2]"`` -> ``[("a", "1"), ("b", "[x:1,y:2]")]`` (commas inside [] kept)."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    pairs = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition(":")
        pairs.append((key.strip(), value.strip()))
    return pairs


def merge_allocator_settings(current: str | None, ours: Mapping[str, str] = ALLOCATOR_SETTINGS) -> str:
    """``current`` (a ``PYTORCH_CUDA_ALLOC_CONF`` value, possibly empty) with each of ``ours`` added
    when the user has not set that key; the user's keys and values are kept as they are."""
    pairs = _split_settings(current or "")
    have = {key for key, _ in pairs}
    text = ",".join(f"{k}:{v}" if v else k for k, v in pairs)
    extra = ",".join(f"{k}:{v}" for k, v in ours.items() if k not in have)
    return ",".join(part for part in (text, extra) if part)


def allocator_status() -> dict:
    """What ``configure_allocator`` last did: ``status`` (``"set"``, ``"kept user setting"``,
    ``"disabled"``, ``"no CUDA"``, ``"too late"``, ``"not configured"``) and the variables it read
    or wrote (``variables``: name -> value)."""
    with _allocator_lock:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in _allocator_state.items()}


def configure_allocator(config: Any = None) -> str | None:
    """Set PyTorch's CUDA caching allocator up for compression; returns the settings written, or
    None when nothing was changed.

    Called when compression is enabled. With ``config.allocator`` True (the default) and CUDA
    available but not yet initialised, adds ``expandable_segments:True`` to the allocator settings
    in the environment: merged into ``PYTORCH_ALLOC_CONF`` and/or ``PYTORCH_CUDA_ALLOC_CONF``
    where the user set them (their keys are never overridden: a user's ``expandable_segments:False``
    stays False), else written to ``PYTORCH_CUDA_ALLOC_CONF``. Nothing is added next to
    ``backend:cudaMallocAsync`` (CUDA's own allocator has no such option). When CUDA is already
    initialised the settings can no longer take effect: a ``UserWarning`` says so, once per
    process, and what to do. Without CUDA, or with ``allocator=False``, it does nothing.
    """
    global _allocator_warned
    import torch

    def state(status: str, variables: dict | None = None) -> None:
        with _allocator_lock:
            _allocator_state.clear()
            _allocator_state.update(status=status, variables=dict(variables or {}))

    if config is not None and not getattr(config, "allocator", True):
        state("disabled")
        return None
    if not torch.cuda.is_available():
        state("no CUDA")
        return None
    present = {name: os.environ[name] for name in ALLOC_CONF_VARIABLES if os.environ.get(name, "").strip()}
    keys = {key for value in present.values() for key, _ in _split_settings(value)}
    backends = {value for v in present.values() for key, value in _split_settings(v) if key == "backend"}
    if all(key in keys for key in ALLOCATOR_SETTINGS) or any(b != "native" for b in backends):
        with _allocator_lock:
            ours = _allocator_state.get("status") == "set" and _allocator_state.get("variables") == present
        if not ours:
            state("kept user setting", present)  # the user decided (or chose cudaMallocAsync)
        return None
    if torch.cuda.is_initialized():
        wanted = merge_allocator_settings(present.get("PYTORCH_CUDA_ALLOC_CONF", present.get("PYTORCH_ALLOC_CONF")))
        state("too late", present)
        with _allocator_lock:
            warn, _allocator_warned = not _allocator_warned, True
        if warn:
            warnings.warn(
                "ciuic: CUDA was initialised before compression was enabled, so the caching allocator "
                "could not be set up for the many short-lived buffers compression makes (fragmentation: "
                "memory reserved but not allocated). Set PYTORCH_CUDA_ALLOC_CONF="
                f"{wanted!r} before the process starts, or enable compression before the first CUDA "
                "call; pass allocator=False to ciuic to leave the allocator alone and silence this.",
                UserWarning,
                stacklevel=3,
            )
        return None
    targets = [name for name in ALLOC_CONF_VARIABLES if name in present] or ["PYTORCH_CUDA_ALLOC_CONF"]
    written = {}
    for name in targets:
        os.environ[name] = written[name] = merge_allocator_settings(present.get(name))
    state("set", written)
    return written[targets[-1]]


# ----------------------------------------------------------------------------------------------
# CUDA memory over time
# ----------------------------------------------------------------------------------------------
def timeline_from_trace(trace: Iterable[Mapping[str, Any]], allocated: int = 0,
                        reserved: int = 0) -> list[tuple[float, int, int]]:
    """``(seconds, allocated bytes, reserved bytes)`` after each event of a CUDA memory-history
    trace (``torch.cuda.memory._snapshot()["device_traces"][device]``), starting from the
    ``allocated``/``reserved`` bytes at the time recording began.

    ``alloc`` adds to allocated and ``free_completed`` subtracts (as ``torch.cuda._memory_viz``
    counts); ``segment_alloc``/``segment_map`` add to reserved, ``segment_free``/``segment_unmap``
    subtract. Times come from the entries' ``time_us`` (relative to the first entry), else the
    event index.
    """
    points: list[tuple[float, int, int]] = []
    start = None
    for index, entry in enumerate(trace):
        action, size = entry.get("action"), int(entry.get("size", 0) or 0)
        if action == "alloc":
            allocated += size
        elif action == "free_completed":
            allocated -= size
        elif action in ("segment_alloc", "segment_map"):
            reserved += size
        elif action in ("segment_free", "segment_unmap"):
            reserved -= size
        else:
            continue
        stamp = entry.get("time_us")
        if stamp is None:
            seconds = float(index)
        else:
            start = stamp if start is None else start
            seconds = (stamp - start) / 1e6
        points.append((seconds, allocated, reserved))
    return points


class CudaMemoryTimeline:
    """Allocated and reserved CUDA memory over time, from PyTorch's allocator history.

        timeline = CudaMemoryTimeline().start()
        ... one training step ...
        points = timeline.stop()        # [(seconds, allocated bytes, reserved bytes), ...]

    Records without stack traces (``context=None``), at most ``max_entries`` events (the oldest
    are dropped first). Starting it initialises CUDA: set the allocator up first
    (``configure_allocator``).
    """

    def __init__(self, device: Any = None, max_entries: int = 500_000) -> None:
        self.device = device
        self.max_entries = max_entries
        self.points: list[tuple[float, int, int]] = []
        self._allocated = self._reserved = 0
        self._recording = False

    def start(self) -> "CudaMemoryTimeline":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("CudaMemoryTimeline needs CUDA (torch.cuda.is_available() is False)")
        torch.cuda.synchronize(self.device)
        self._allocated = torch.cuda.memory_allocated(self.device)
        self._reserved = torch.cuda.memory_reserved(self.device)
        torch.cuda.memory._record_memory_history(
            "all", context=None, stacks="python", max_entries=self.max_entries, device=self.device,
            clear_history=True)
        self._recording = True
        return self

    def stop(self) -> list[tuple[float, int, int]]:
        import torch

        if not self._recording:
            return self.points
        torch.cuda.synchronize(self.device)
        snapshot = torch.cuda.memory._snapshot(self.device)
        torch.cuda.memory._record_memory_history(None, device=self.device)
        self._recording = False
        index = torch.cuda.current_device() if self.device is None else torch.device(self.device).index or 0
        traces = snapshot.get("device_traces", [])
        trace = traces[index] if index < len(traces) else []
        self.points = timeline_from_trace(trace, self._allocated, self._reserved)
        return self.points
