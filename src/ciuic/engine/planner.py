"""What outlives a compression context: the bit plan, its calibration, and the current pass.

A *pass* is everything saved between the end of one backward and the end of the next: it begins
at the first pack after a backward has finished (or the first pack ever) and ends when autograd
runs the callback that the first unpack of a backward queued (as torchtune's activation
offloading finds its boundaries). A loss module called after the model, a functional model with
no ``nn.Module`` at all, or several forwards before one backward are one pass each time.

One ``Planner`` per configuration and thread: a ``ciuic.compression()`` block per training step
reuses the plan the previous blocks solved instead of calibrating again. The plan is recalibrated
every ``recalibrate_every`` passes, and at once when the pass no longer looks like the calibrated
one (tensors saved at places the plan has never seen: another model; or a pass more than twice as
large or small: other shapes).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ciuic_kernels._pool import PackPool

from ..config import CompressionConfig
from ..policy import CLASS_LEVELS, EXACT, Plan, Site, solve, wide_norm
from . import stats as _stats
from .tracking import note_saved

_SHAPE_DRIFT = 2.0  # a pass this many times larger or smaller than the calibrated one recalibrates


@dataclass
class CacheEntry:
    anchor: weakref.ref  # the tensor owning the storage: alive proves the storage was not reused
    handle: weakref.ref  # what pack returned for it (Pack, Ref tensor, Recompute)
    site: tuple | None = None


@dataclass
class PassState:
    """What one pass has seen so far (dropped when the next pass begins)."""

    counters: dict = field(default_factory=dict)  # (module, op) -> saves so far: the site keys
    cache: dict = field(default_factory=dict)  # pack key / storage key -> CacheEntry
    recipes: dict = field(default_factory=dict)  # id(result) -> recompute.Recipe
    before: int = 0  # bytes the uncompressed pass keeps
    fixed_after: int = 0  # bytes kept by tensors the plan does not decide (masks, exact keeps)
    unknown_sites: int = 0  # saves at places the plan has never seen
    root: Any = None  # weak reference to the outermost module that ran in this pass, if any
    watched: dict = field(default_factory=dict)  # storage address -> weak handles saved from it

    def site_key(self, module: str, op: str) -> tuple:
        base = (module, op)
        n = self.counters.get(base, 0)
        self.counters[base] = n + 1
        return (module, op, n)

    def remember(self, key: tuple, t: torch.Tensor, handle: Any, site: tuple | None = None) -> None:
        # Weak references only: the cache must never keep a tensor or a pack alive after backward.
        if len(self.cache) > 4096:
            self.cache = {k: v for k, v in self.cache.items() if v.anchor() is not None}
        anchor = t._base if t._base is not None else t
        entry = self.cache[key] = CacheEntry(weakref.ref(anchor), weakref.ref(handle), site)
        note_saved(entry, t)

    def lookup(self, key: tuple) -> tuple[Any, CacheEntry] | tuple[None, None]:
        """(handle, entry) when ``key`` was packed in this pass and is alive, else (None, None)."""
        entry = self.cache.get(key)
        if entry is None or entry.anchor() is None:
            return None, None
        handle = entry.handle()
        return (handle, entry) if handle is not None else (None, None)


class Planner:
    def __init__(self, config: CompressionConfig) -> None:
        self.config = config
        self.plan = Plan()
        self.passes = 0  # passes begun
        self.calibrations = 0  # calibration passes begun
        self.solves = 0
        self.calibrating = False
        self.current = PassState()
        self._solved = False
        self._calibrated_before = 0  # uncompressed bytes of the pass the plan was solved from
        self._calibrated_root: Any = None  # and the model it ran (weak), when it ran one
        self._sites: dict[tuple, Site] = {}
        self._gradients: dict[str, float] = {}
        self._verdicts: dict = {}  # per-site facts found while calibrating (see ``verdict``)
        self._need_pass = True
        self._callback_queued = False
        self._seed_counter = 0
        self._lock = threading.Lock()  # backward may end on an autograd device thread
        self.pool = PackPool() if config.pool else None  # memory for this plan's packs

    # -- pass boundaries -----------------------------------------------------------------------
    def on_pack(self) -> None:
        if self._callback_queued and torch._C._current_graph_task_id() == -1:
            # a backward began and is over without running its final callback: it raised
            self._backward_ended()
        if self._need_pass:
            self._begin_pass()

    def on_unpack(self) -> None:
        """The first unpack of a backward: end the pass when that backward ends."""
        if self._callback_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
        except RuntimeError:
            return  # unpacked outside a backward (``grad_fn._saved_*``): no boundary
        self._callback_queued = True

    def _backward_ended(self) -> None:
        with self._lock:
            self._callback_queued = False
            self._need_pass = True

    def _begin_pass(self) -> None:
        with self._lock:
            self._need_pass = False
        last = self.current
        if self.calibrating and self._sites:
            self._solve(last)
        elif self._solved and self._drifted(last):
            self._solved = False  # another model or other shapes: calibrate again
        self.passes += 1
        _stats.count_pass()
        if self.pool is not None:
            self.pool.new_pass()  # free the pack buffers the pass that ended did not need
        self.current = PassState()
        every = self.config.recalibrate_every
        self.calibrating = False
        if self.config.mode != "lossless" and (
                not self._solved or (every > 0 and self.passes > 1 and (self.passes - 1) % every == 0)):
            self._start_calibration()

    def on_root(self, root: Any) -> None:
        """The first module of this pass ran: when it is not the model the plan was calibrated on,
        this pass calibrates (rather than running a foreign plan first)."""
        self.current.root = root
        if self._solved and not self.calibrating and self._calibrated_root is not None \
                and root() is not self._calibrated_root():
            self._solved = False
            self._start_calibration()

    def _start_calibration(self) -> None:
        self.calibrating = True
        self.calibrations += 1
        self._sites = {}
        self._gradients = {}
        self._verdicts = {}

    def _drifted(self, last: PassState) -> bool:
        if last.unknown_sites:
            return True
        if self._calibrated_root is not None and last.root is not None and last.root() is not self._calibrated_root():
            return True  # another model (or the calibrated one is gone)
        if not last.before or not self._calibrated_before:
            return False
        ratio = last.before / self._calibrated_before
        return ratio > _SHAPE_DRIFT or ratio < 1 / _SHAPE_DRIFT

    # -- the plan ------------------------------------------------------------------------------
    def level_for(self, key: tuple, cls: str) -> int:
        if not self.calibrating and self._solved and key not in self.plan.levels:
            self.current.unknown_sites += 1
        return self.plan.level_for(key, cls)

    def add_site(self, site: Site) -> None:
        self._sites[site.key] = site

    def add_consumer(self, site_keys: tuple, module: str) -> None:
        if not self.calibrating:
            return
        for key in site_keys:
            site = self._sites.get(key)
            if site is not None and module not in site.consumers:
                site.consumers.append(module)

    def verdict(self, key: tuple, compute: Callable[[], bool]) -> bool:
        """A fact about the tensor saved at ``key`` (e.g. "a two-valued dropout mask"), computed
        (possibly with a host sync) while calibrating or the first time it is asked, then reused:
        steady-state passes never move data to the host for it."""
        value = self._verdicts.get(key)
        if value is None:
            value = self._verdicts[key] = bool(compute())
        return value

    def watch_gradient(self, module: str, output: torch.Tensor) -> None:
        gradients = self._gradients

        def hook(grad: torch.Tensor) -> None:
            g = grad.detach()
            if g.numel():
                # mean square via the norm: no fp32 copy of a low-precision gradient in backward
                energy = float(wide_norm(g)) ** 2 / g.numel()
                if g.dim():
                    energy *= g.shape[-1]
                gradients[module] = gradients.get(module, 0.0) + energy

        output.register_hook(hook)

    def seed(self) -> int:
        """A fresh stochastic-rounding seed per pack, derived from the config's seed."""
        self._seed_counter += 1
        return (self.config.seed << 32) + self._seed_counter

    def _solve(self, last: PassState) -> None:
        sites = list(self._sites.values())
        if self._gradients:
            known = [v for v in self._gradients.values() if v > 0]
            fallback = sum(known) / len(known) if known else 1.0
            for s in sites:
                s.gradient_weight = sum(self._gradients.get(m, fallback) or fallback for m in s.consumers)
        budget = self.config.budget
        if self.config.mode == "auto":
            target = float(budget) * last.before if isinstance(budget, float) else float(budget)
        else:
            target = last.before / self.config.target_ratio
        group = self.config.group_size
        self.plan = solve(sites, target - last.fixed_after, group)
        self._solved = True
        self._calibrated_before = last.before
        self._calibrated_root = last.root
        self.calibrating = False
        self.solves += 1
        min_bytes = last.fixed_after + sum(s.cost(CLASS_LEVELS[s.cls][-1], group) for s in sites)
        planned = last.fixed_after + self.plan.planned_bytes
        levels: dict = {}
        for s in sites:
            bits = self.plan.levels.get(s.key, EXACT)
            levels.setdefault(s.module, Counter())[bits] += 1
        _stats.record_plan({
            "mode": self.config.mode,
            "budget_bytes": int(target),
            "planned_bytes": int(planned),
            "feasible": bool(self.plan.feasible),
            "min_bytes": int(min_bytes),
            "pass_before": int(last.before),
            "levels_by_module": {m: dict(c) for m, c in levels.items()},
        })
        if not self.plan.feasible:
            warnings.warn(
                f"ciuic: mode={self.config.mode!r} asks for at most {target / 2**20:.2f} MiB of saved "
                f"activations per pass (of {last.before / 2**20:.2f} MiB uncompressed), but the smallest "
                f"reachable at the lowest precision each tensor class allows is {min_bytes / 2**20:.2f} MiB; "
                f"using the smallest plan ({planned / 2**20:.2f} MiB). Raise the budget (bytes, or a share "
                f"such as budget='40%'), or checkpoint part of the model to save less.",
                UserWarning, stacklevel=2)
