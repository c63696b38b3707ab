"""The activation engine: saved_tensors_hooks that compress what autograd keeps for backward.

pack(t) -> a handle (a reference to the tensor or to a parameter it copies, a compressed pack, or
a recipe to recompute it); unpack(handle) -> the tensor, decoded on demand in the backward pass.

    stats.py      byte accounting (``stats()``, ``reset_stats()``)
    handles.py    what pack returns; in-place checks; storages and views
    tracking.py   which op and module save a tensor; copies of parameters; thread state
    recompute.py  cheap elementwise outputs rebuilt from what ciuic keeps
    planner.py    passes (from autograd), calibration and the bit plan, which outlive a context
    engine.py     ``Engine``: the context and the pack/unpack hooks

What never gets compressed: parameters and copies of them (rebuilt from the parameter), integer
tensors, tensors below ``min_numel``, tensors marked with ``keep_exact`` and tensors saved inside
``keep_modules``. Bool masks go to 1 bit (lossless). A tensor saved by several ops is packed once.
"""

from .engine import Engine, planner_for
from .handles import keep_exact
from .stats import ByteCount, CompressionStats, reset_stats, stats
from .tracking import module_hooks_installed, state as _state  # noqa: F401 (tests and tools read it)

__all__ = ["ByteCount", "CompressionStats", "Engine", "keep_exact", "module_hooks_installed", "planner_for",
           "reset_stats", "stats"]
