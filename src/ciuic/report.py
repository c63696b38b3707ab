"""``ciuic.memory_report()``: where the memory kept for backward goes, per module, in one object.

    report = ciuic.memory_report()      # from ciuic.stats() now (+ CUDA peaks on a GPU)
    print(report)                       # the per-module table, sorted by bytes kept
    report.to_json("report.json")       # MemoryReport.from_json("report.json") == report
    report.plot("report.png")           # per-module bars before/after (+ CUDA timeline)

Every byte count comes from the engine's accounting (``ciuic.stats()``): ``before`` is what the
uncompressed run would keep for backward, ``after`` what ciuic keeps, cumulative since the last
``ciuic.reset_stats()`` (``passes`` forward passes). The budget section comes from the bit plan
(``stats().plan``); the CUDA section from ``torch.cuda.max_memory_allocated/reserved``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

# What each codec name in the accounting means, for the "bits" column.
_CODEC_BITS = {"bitmask": "1", "fp8": "8", "raw": "exact", "param_cast": "param", "recompute": "recompute"}
_TOP_PLOT_ROWS = 24


@dataclass
class CodecBytes:
    """Saved tensors of one codec (in one module): how many, bytes before and after."""

    tensors: int = 0
    before: int = 0
    after: int = 0

    @property
    def ratio(self) -> float:
        return _ratio(self.before, self.after)


@dataclass
class ModuleRow:
    """One row of the report: the saved tensors whose innermost module is ``module``.

    ``codecs``: codec name (``"int8"``, ``"int4"``, ``"int2"``, ``"bitmask"``, ``"raw"`` = kept
    exact, ``"param_cast"`` = a parameter copy kept by reference, ``"recompute"`` = rebuilt in
    backward) -> ``CodecBytes``. ``levels``: the plan's bit widths for this module's tensors
    (bits -> count), when a plan was solved.
    """

    module: str
    tensors: int
    before: int
    after: int
    codecs: dict = field(default_factory=dict)
    levels: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return _ratio(self.before, self.after)

    @property
    def bits(self) -> list[str]:
        """Bit widths used, widest first (``"8"``, ``"4"``, ``"1"``, ``"exact"``, ...)."""
        return _bits_of(self.codecs)


@dataclass
class MemoryReport:
    """Where the memory autograd keeps for backward goes, per module, with totals, budget and CUDA
    peaks. Build it with ``ciuic.memory_report()``; print it for the table.

    ``rows``: ``ModuleRow`` per module, sorted by bytes kept (``after``), largest first.
    ``bytes_before``/``bytes_after``/``tensors``/``passes``: totals, equal to ``ciuic.stats()``
    when the report was made. ``live_*``: bytes of packs alive then; ``peak_live_*``: their maximum.
    ``plan``: the bit plan's budget (``budget_bytes`` per pass, ``planned_bytes``, ``feasible``,
    ``min_bytes``, ``pass_before``, ``levels_by_module``), or None before a plan is solved.
    ``cuda``: ``max_memory_allocated``, ``max_memory_reserved``, ``fragmentation_bytes``
    (reserved - allocated at peak), ``device``, or None without CUDA. ``pool``: the pack pool's
    counters (``ciuic.stats().pool``: allocations, reuses, bytes waiting). ``timeline``: CUDA
    ``(seconds, allocated, reserved)`` points, when recorded. ``meta``: mode, versions, time.
    """

    rows: list = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    tensors: int = 0
    passes: int = 0
    live_before: int = 0
    live_after: int = 0
    peak_live_before: int = 0
    peak_live_after: int = 0
    by_codec: dict = field(default_factory=dict)
    by_class: dict = field(default_factory=dict)
    plan: dict | None = None
    cuda: dict | None = None
    pool: dict = field(default_factory=dict)
    timeline: list | None = None
    meta: dict = field(default_factory=dict)

    # -- derived -----------------------------------------------------------------------------------
    @property
    def ratio(self) -> float:
        """Bytes the uncompressed run would keep / bytes ciuic kept."""
        return _ratio(self.bytes_before, self.bytes_after)

    @property
    def budget_met(self) -> bool | None:
        """True when the plan meets its byte budget (``mode="auto"`` or a ratio mode's target), False
        when even the lowest precision allowed cannot; None when no plan was solved."""
        if not self.plan or self.plan.get("budget_bytes") is None:
            return None
        planned, budget = self.plan.get("planned_bytes"), self.plan["budget_bytes"]
        fits = planned is None or planned <= budget
        return bool(self.plan.get("feasible", True)) and fits

    def share(self, row: ModuleRow) -> float:
        """The row's part of the bytes kept (0..1)."""
        return row.after / self.bytes_after if self.bytes_after else 0.0

    def row(self, module: str) -> ModuleRow:
        for r in self.rows:
            if r.module == module:
                return r
        raise KeyError(f"module {module!r} is not in the report; modules: {', '.join(r.module for r in self.rows)}")

    def grouped(self, depth: int) -> "MemoryReport":
        """The same report with modules merged by the first ``depth`` parts of their dotted names
        (``depth=3``: ``model.layers.0.mlp.down_proj`` -> ``model.layers.0``): bytes, tensors,
        codecs and plan levels add up; totals are unchanged."""
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth={depth!r} is not valid; allowed: an int >= 1")
        merged: dict[str, ModuleRow] = {}
        for r in self.rows:
            name = ".".join(r.module.split(".")[:depth])
            row = merged.setdefault(name, ModuleRow(module=name, tensors=0, before=0, after=0))
            row.tensors += r.tensors
            row.before += r.before
            row.after += r.after
            for codec, c in r.codecs.items():
                into = row.codecs.setdefault(codec, CodecBytes())
                into.tensors, into.before, into.after = into.tensors + c.tensors, into.before + c.before, into.after + c.after
            for bits, count in r.levels.items():
                row.levels[bits] = row.levels.get(bits, 0) + count
        rows = sorted(merged.values(), key=lambda r: (-r.after, -r.before, r.module))
        return dataclasses.replace(self, rows=rows, meta=dict(self.meta, grouped_depth=depth))

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (ratios included for readers; ``from_dict`` recomputes them)."""
        data = dataclasses.asdict(self)
        data["rows"] = [dict(dataclasses.asdict(r), ratio=_json_float(r.ratio), bits=r.bits,
                             share=self.share(r)) for r in self.rows]
        for r in data["rows"]:
            r["levels"] = {str(k): v for k, v in r["levels"].items()}
        if self.plan is not None:
            data["plan"] = _plan_for_json(self.plan)
        data["ratio"] = _json_float(self.ratio)
        data["budget_met"] = self.budget_met
        data["format"] = "ciuic.MemoryReport/1"
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryReport":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["rows"] = [
            ModuleRow(module=r["module"], tensors=r["tensors"], before=r["before"], after=r["after"],
                      codecs={k: CodecBytes(**_counts(v)) for k, v in r.get("codecs", {}).items()},
                      levels=_int_keys(r.get("levels", {})))
            for r in data.get("rows", [])
        ]
        for name in ("by_codec", "by_class"):
            kwargs[name] = {k: CodecBytes(**_counts(v)) for k, v in data.get(name, {}).items()}
        if kwargs.get("plan") is not None:
            kwargs["plan"] = _normalise_plan(kwargs["plan"])
        if kwargs.get("timeline") is not None:
            kwargs["timeline"] = [tuple(p) for p in kwargs["timeline"]]
        return cls(**kwargs)

    def to_json(self, path: str) -> str:
        """Write the report as JSON to ``path`` (folders made as needed); returns ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(path + ".tmp", path)
        return path

    @classmethod
    def from_json(cls, path: str) -> "MemoryReport":
        """Load a report written by ``to_json`` (the same table, totals, plan and CUDA numbers)."""
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError(f"{path!r} is not a ciuic memory report (written by MemoryReport.to_json)")
        return cls.from_dict(data)

    # -- text --------------------------------------------------------------------------------------
    def table(self, top: int | None = None) -> str:
        """The per-module table, largest bytes kept first (``top``: only that many rows)."""
        rows = self.rows if top is None else self.rows[:top]
        width = min(64, max([len("module")] + [len(r.module) for r in rows] + [len("total")]))
        header = (f"{'module':<{width}}  {'before':>10}  {'after':>10}  {'ratio':>6}  {'share':>6}  "
                  f"{'bits':<12}codecs")
        lines = [header, "-" * len(header)]
        for r in rows:
            codecs = " ".join(f"{name}x{c.tensors}" for name, c in
                              sorted(r.codecs.items(), key=lambda kv: (-kv[1].after, kv[0])))
            lines.append(f"{_clip(r.module, width):<{width}}  {_size(r.before):>10}  {_size(r.after):>10}  "
                         f"{_ratio_text(r.ratio):>6}  {self.share(r):>6.1%}  {','.join(r.bits) or '-':<12}"
                         f"{codecs}")
        if top is not None and len(self.rows) > top:
            rest = self.rows[top:]
            before, after = sum(r.before for r in rest), sum(r.after for r in rest)
            lines.append(f"{_clip(f'({len(rest)} more modules)', width):<{width}}  {_size(before):>10}  "
                         f"{_size(after):>10}  {_ratio_text(_ratio(before, after)):>6}  "
                         f"{(after / self.bytes_after if self.bytes_after else 0):>6.1%}")
        lines.append("-" * len(header))
        lines.append(f"{'total':<{width}}  {_size(self.bytes_before):>10}  {_size(self.bytes_after):>10}  "
                     f"{_ratio_text(self.ratio):>6}  {1 if self.bytes_after else 0:>6.1%}  "
                     f"{','.join(_bits_of(self.by_codec)) or '-':<12}")
        return "\n".join(lines)

    def summary(self) -> str:
        """The lines above the table: totals, live and peak bytes, budget, CUDA."""
        mode = self.meta.get("mode")
        head = "ciuic memory report" + (f" (mode {mode})" if mode else "")
        lines = [
            f"{head}: {self.tensors} saved tensors over {self.passes} forward pass"
            f"{'' if self.passes == 1 else 'es'}",
            f"kept for backward: {_size(self.bytes_before)} uncompressed -> {_size(self.bytes_after)} with ciuic "
            f"(ratio {_ratio_text(self.ratio)})" + (
                f"; per pass {_size(self.bytes_before / self.passes)} -> {_size(self.bytes_after / self.passes)}"
                if self.passes > 1 else ""),
            f"live now: {_size(self.live_after)} (uncompressed {_size(self.live_before)}); peak live: "
            f"{_size(self.peak_live_after)} (uncompressed {_size(self.peak_live_before)})",
        ]
        if self.plan:
            p = self.plan
            met = self.budget_met
            verdict = "met" if met else "NOT met"
            line = f"budget per pass: {_size(p.get('budget_bytes'))}, planned {_size(p.get('planned_bytes'))}: {verdict}"
            if p.get("pass_before"):
                line += f" (uncompressed pass {_size(p['pass_before'])})"
            if not met and p.get("min_bytes") is not None:
                line += f"; smallest reachable {_size(p['min_bytes'])}"
            lines.append(line)
        pool = self.pool
        if pool and (pool.get("allocations") or pool.get("reuses")):
            taken = pool["allocations"] + pool["reuses"]
            lines.append(f"pack pool: {pool['reuses']} of {taken} pack buffers reused ({pool['allocations']} "
                         f"allocated, {_size(pool.get('allocated_bytes'))}); waiting for the next pass: "
                         f"{_size(pool.get('free_bytes'))}")
        if self.cuda:
            c = self.cuda
            lines.append(f"CUDA {c.get('device', '')}: max allocated {_size(c.get('max_memory_allocated'))}, "
                         f"max reserved {_size(c.get('max_memory_reserved'))}, fragmentation (reserved - "
                         f"allocated at peak) {_size(c.get('fragmentation_bytes'))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        if not self.rows:
            return self.summary() + "\n(no saved tensor went through ciuic: was compression on during a training forward?)"
        return self.summary() + "\n\n" + self.table()

    # -- plot --------------------------------------------------------------------------------------
    def plot(self, path: str, top: int = _TOP_PLOT_ROWS) -> str:
        """Save a PNG (matplotlib, Agg backend): bytes before/after for the ``top`` modules keeping
        the most (the rest in one bar); with a CUDA timeline, allocated/reserved memory over time
        below. Returns ``path``."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(f"MemoryReport.plot needs matplotlib ({error}); pip install matplotlib") from error
        rows = sorted(self.rows, key=lambda r: (-r.before, r.module))  # the bars: biggest uncompressed first
        shown = rows[:top]
        labels = [r.module for r in shown]
        before = [r.before for r in shown]
        after = [r.after for r in shown]
        if len(rows) > top:
            rest = rows[top:]
            labels.append(f"({len(rest)} more modules)")
            before.append(sum(r.before for r in rest))
            after.append(sum(r.after for r in rest))
        unit, scale = _unit(max(before + after + [1]))
        before = [b / scale for b in before]
        after = [a / scale for a in after]
        has_timeline = bool(self.timeline)
        height = max(3.0, 0.28 * max(1, len(labels)) + 1.6)
        fig, axes = plt.subplots(2 if has_timeline else 1, 1, squeeze=False,
                                 figsize=(10, height + (3.2 if has_timeline else 0)),
                                 gridspec_kw={"height_ratios": [height, 3.2] if has_timeline else [1]})
        ax = axes[0][0]
        ys = list(range(len(labels)))[::-1]
        ax.barh([y + 0.2 for y in ys], before, height=0.4, color="#b0b0b0", label="uncompressed")
        ax.barh([y - 0.2 for y in ys], after, height=0.4, color="#1f77b4", label="ciuic")
        ax.set_yticks(ys)
        ax.set_yticklabels([_clip(name, 48) for name in labels], fontsize=7)
        ax.set_xlabel(f"{unit} kept for backward" + (f" (over {self.passes} passes)" if self.passes > 1 else ""))
        title = (f"ciuic memory report{' (mode ' + self.meta['mode'] + ')' if self.meta.get('mode') else ''}: "
                 f"{_size(self.bytes_before)} -> {_size(self.bytes_after)}, ratio {_ratio_text(self.ratio)}")
        if self.plan and self.budget_met is not None:
            title += f"; budget {_size(self.plan.get('budget_bytes'))} {'met' if self.budget_met else 'NOT met'}"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        if has_timeline:
            tx = axes[1][0]
            seconds = [p[0] for p in self.timeline]
            unit, scale = _unit(max(max(p[1:]) for p in self.timeline))
            tx.plot(seconds, [p[1] / scale for p in self.timeline], label="allocated", linewidth=1)
            if len(self.timeline[0]) > 2:
                tx.plot(seconds, [p[2] / scale for p in self.timeline], label="reserved", linewidth=1, alpha=0.7)
            tx.set_xlabel("seconds")
            tx.set_ylabel(f"CUDA {unit}")
            tx.set_title("CUDA memory over the measured passes", fontsize=9)
            tx.legend(fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def memory_report(*, timeline: Any = None, device: Any = None) -> MemoryReport:
    """A ``MemoryReport`` of ``ciuic.stats()`` now: per-module bytes before/after, codecs and bits,
    totals, live and peak bytes, the plan's budget, and on CUDA (when initialised) the peak
    allocated/reserved bytes of ``device`` and their difference (fragmentation).

    ``timeline``: a ``ciuic.memory.CudaMemoryTimeline`` (stopped or running: it is stopped here)
    or a list of ``(seconds, allocated, reserved)`` points, drawn by ``plot``.
    """
    import torch

    import ciuic

    st = ciuic.stats()
    by_module_codec = getattr(st, "by_module_codec", None) or {}
    plan = _normalise_plan(getattr(st, "plan", None))
    levels = (plan or {}).get("levels_by_module") or {}
    rows = []
    for module, count in st.by_module.items():
        codecs = {name: CodecBytes(c.tensors, c.before, c.after)
                  for name, c in by_module_codec.get(module, {}).items()}
        rows.append(ModuleRow(module=module, tensors=count.tensors, before=count.before, after=count.after,
                              codecs=codecs, levels=dict(levels.get(module, {}))))
    rows.sort(key=lambda r: (-r.after, -r.before, r.module))
    config = ciuic.current_config()
    meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "ciuic": getattr(ciuic, "__version__", None),
        # the active config's, else the mode of the config that solved the plan (after the block)
        "mode": config.mode if config is not None else (plan or {}).get("mode"),
        "budget": None if config is None else config.budget,
    }
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        cuda = {
            "device": torch.cuda.get_device_name(device),
            "max_memory_allocated": allocated,
            "max_memory_reserved": reserved,
            "fragmentation_bytes": reserved - allocated,
            "memory_allocated": torch.cuda.memory_allocated(device),
            "memory_reserved": torch.cuda.memory_reserved(device),
        }
        from .memory import allocator_status

        cuda["allocator"] = allocator_status()
    points = None
    if timeline is not None:
        points = timeline.stop() if hasattr(timeline, "stop") else timeline
        points = [tuple(p) for p in points] or None
    return MemoryReport(
        rows=rows, bytes_before=st.bytes_before, bytes_after=st.bytes_after, tensors=st.tensors_packed,
        passes=st.passes, live_before=st.live_before, live_after=st.live_after,
        peak_live_before=st.peak_live_before, peak_live_after=st.peak_live_after,
        by_codec={k: CodecBytes(v.tensors, v.before, v.after) for k, v in st.by_codec.items()},
        by_class={k: CodecBytes(v.tensors, v.before, v.after) for k, v in st.by_class.items()},
        plan=plan, cuda=cuda, pool=dict(getattr(st, "pool", None) or {}), timeline=points, meta=meta,
    )


def write_report(directory: str, *, rank: int | None = None, world_size: int | None = None,
                 plot: bool = True, report: MemoryReport | None = None) -> list[str]:
    """Write ``memory_report()`` (or ``report``) to ``directory`` as ``ciuic_report.json`` and
    ``ciuic_report.png``, or ``ciuic_report_rank<R>.*`` when several processes train
    (``world_size`` > 1; rank and world size default to ``torch.distributed``, else the ``RANK``
    and ``WORLD_SIZE`` environment variables). What the integrations' report options call at the
    end of training. Returns the paths written (the PNG is skipped, with a warning, without
    matplotlib)."""
    if rank is None or world_size is None:
        found_rank, found_world = _rank_and_world()
        rank = found_rank if rank is None else rank
        world_size = found_world if world_size is None else world_size
    report = memory_report() if report is None else report
    report.meta.setdefault("rank", rank)
    report.meta.setdefault("world_size", world_size)
    name = "ciuic_report" if world_size <= 1 else f"ciuic_report_rank{rank}"
    os.makedirs(directory, exist_ok=True)
    written = [report.to_json(os.path.join(directory, name + ".json"))]
    if plot:
        try:
            written.append(report.plot(os.path.join(directory, name + ".png")))
        except ImportError as error:
            import warnings

            warnings.warn(f"ciuic: memory report written without its plot: {error}", RuntimeWarning)
    return written


def _rank_and_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # a partial torch build: fall back to the environment
        pass
    rank = next((int(os.environ[v]) for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK")
                 if os.environ.get(v, "").isdigit()), 0)
    world = os.environ.get("WORLD_SIZE", "")
    return rank, int(world) if world.isdigit() else 1


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _ratio(before: int, after: int) -> float:
    return before / after if after else (float("inf") if before else 1.0)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _counts(v: Any) -> dict:
    return {k: v[k] for k in ("tensors", "before", "after")}


def _int_keys(d: dict) -> dict:
    return {int(k) if isinstance(k, str) and re.fullmatch(r"-?\d+", k) else k: v for k, v in d.items()}


def _normalise_plan(plan: Any) -> dict | None:
    """A plain-dict copy of ``stats().plan`` whose ``levels_by_module`` bit keys are ints (JSON
    object keys are strings: loading a saved report gives back the same dict)."""
    if plan is None:
        return None
    if dataclasses.is_dataclass(plan):
        plan = dataclasses.asdict(plan)
    plan = dict(plan)
    if isinstance(plan.get("levels_by_module"), dict):
        plan["levels_by_module"] = {m: _int_keys(dict(v)) for m, v in plan["levels_by_module"].items()}
    return plan


def _plan_for_json(plan: dict) -> dict:
    out = dict(plan)
    if isinstance(out.get("levels_by_module"), dict):
        out["levels_by_module"] = {m: {str(k): n for k, n in v.items()} for m, v in out["levels_by_module"].items()}
    return out


def _bits_of(codecs: dict) -> list[str]:
    found = set()
    for name in codecs:
        m = re.fullmatch(r"int(\d+)", name)
        found.add(m.group(1) if m else _CODEC_BITS.get(name, name))
    numeric = sorted((b for b in found if b.isdigit()), key=lambda b: -int(b))
    return numeric + sorted(b for b in found if not b.isdigit())


def _size(n: Any) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= scale:
            return unit, float(scale)
    return "bytes", 1.0


def _ratio_text(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


__all__ = ["CodecBytes", "MemoryReport", "ModuleRow", "memory_report", "write_report"]
