"""`CompressionConfig`: what a user asks for, validated with errors that name the valid values."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

MODES = ("lossless", "2:1", "4:1", "8:1", "auto")
ROUNDINGS = ("nearest", "stochastic")
GROUP_SIZES = (32, 64, 128, 256)

# The ratio each fixed mode promises: bytes the uncompressed run keeps for backward / bytes kept.
MODE_RATIOS = {"lossless": 1.0, "2:1": 2.0, "4:1": 4.0, "8:1": 8.0}

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(value: Any) -> int:
    """``"12GB"``, ``"512MiB"``, ``"1.5 GB"`` or an int of bytes -> int bytes (> 0)."""
    if isinstance(value, bool):
        raise ValueError(f"budget={value!r} is not valid; allowed: an int of bytes or a string like '12GB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"budget={value!r} is not valid; it must be > 0 bytes")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if n > 0:
                return int(n)
    raise ValueError(
        f"budget={value!r} is not valid; allowed: an int of bytes or a number with a unit "
        f"({', '.join(u.upper() for u in _UNITS if u)}), e.g. '12GB' or '512MiB'"
    )


_BUDGET_FORMS = ("an int of bytes, a size with a unit such as '12GB' or '512MiB', or a fraction of the "
                 "uncompressed size: a percentage such as '25%' or a float such as 0.25 (0 < fraction <= 1)")


def parse_budget(value: Any) -> int | float:
    """A ``mode="auto"`` budget -> int bytes, or a float fraction in (0, 1] of the bytes the
    uncompressed pass keeps for backward.

    ``"12GB"``, ``"512MiB"``, ``123_456_789`` (bytes, as ``parse_bytes``); ``"25%"`` or ``0.25``
    (a fraction: the engine targets ``fraction x`` the uncompressed pass). A float above 1 counts as
    bytes (``12e9``). Anything else raises ``ValueError`` naming the value and the allowed forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"budget={value!r} is not valid; allowed: {_BUDGET_FORMS}")
    if isinstance(value, str) and value.strip().endswith("%"):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", value)
        if m and 0 < float(m.group(1)) <= 100:
            return float(m.group(1)) / 100
        raise ValueError(f"budget={value!r} is not valid: a percentage must be > 0% and <= 100%; "
                         f"allowed: {_BUDGET_FORMS}")
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget={value!r} is not valid; it must be a finite number > 0; allowed: {_BUDGET_FORMS}")
        if value <= 1:
            return value
    try:
        return parse_bytes(value)
    except ValueError:
        raise ValueError(f"budget={value!r} is not valid; allowed: {_BUDGET_FORMS} "
                         f"(units: {', '.join(u.upper() for u in _UNITS if u)}); it must be > 0") from None


@dataclass(frozen=True)
class CompressionConfig:
    """How saved activations are compressed.

    mode: ``"lossless"`` (dedupe, parameter casts by reference, 1-bit bool masks — bit-identical
        training), ``"2:1"``, ``"4:1"``, ``"8:1"`` (target ratio of bytes kept for backward vs the
        uncompressed run at the same dtype), or ``"auto"`` with ``budget``: the most precise plan
        whose saved activations fit the budget.
    budget: only with ``mode="auto"``: bytes per forward pass (an int, or ``"12GB"``, ``"512MiB"``;
        stored as an int), or a fraction of the bytes the uncompressed pass keeps (``"25%"`` or
        ``0.25``; stored as a float in (0, 1]). See ``parse_budget``.
    min_numel: tensors with fewer elements are kept as they are (their metadata would cost more).
    group_size: quantization group size (32, 64, 128 or 256); default (None) 64, and 128 for
        ``"8:1"`` (at 2 bits the per-group scale and minimum cost 0.375 bits per element at 64,
        0.19 at 128: the difference between meeting 8:1 vs bf16 and missing it).
    rounding: ``"nearest"`` (default; measured better at 4 bits) or ``"stochastic"`` (unbiased).
    recalibrate_every: forward passes between two re-estimates of per-tensor sensitivity
        (the bit plan adapts during training); 0 calibrates once.
    keep_modules: names (as in ``model.named_modules()``, or class names) whose saved tensors are
        never compressed.
    lean_lm_head: patch Hugging Face causal LMs passed to ``enable_compression(model=...)`` to use
        the chunked linear + cross-entropy that never materialises the logits.
    seed: base seed for stochastic rounding (never consumes torch's RNG).
    allocator: on CUDA, set up PyTorch's caching allocator for the many short-lived pack buffers
        compression makes (``expandable_segments:True`` in ``PYTORCH_CUDA_ALLOC_CONF``, merged with
        what the user set) when compression is enabled before CUDA is initialised; see
        ``ciuic.memory.configure_allocator``. ``False`` leaves the allocator alone.
    pool: take the memory of packs from ciuic's pack pool (``ciuic_kernels._pool``): a pack freed in
        backward leaves its buffer for a pack of the same size in the next forward, so a
        fixed-shape training step allocates nothing new for packs from its third step on
        (``ciuic.stats().pool`` counts allocations and reuses). The pool keeps no more buffers of
        a size than the last pass asked for, and a pass with other shapes frees waiting buffers as
        it allocates; ``ciuic.empty_pool()`` frees every waiting one. ``False``: every pack is
        allocated from torch and freed when it dies.
    """

    mode: str = "4:1"
    budget: int | float | None = None
    min_numel: int = 4096
    group_size: int | None = None
    rounding: str = "nearest"
    recalibrate_every: int = 200
    keep_modules: tuple = ()
    lean_lm_head: bool = True
    seed: int = 0
    allocator: bool = True
    pool: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not valid; allowed: {', '.join(map(repr, MODES))}")
        if self.mode == "auto":
            if self.budget is None:
                raise ValueError(f"mode='auto' needs budget=...; allowed: {_BUDGET_FORMS}")
            object.__setattr__(self, "budget", parse_budget(self.budget))
        elif self.budget is not None:
            raise ValueError(
                f"budget={self.budget!r} is only valid with mode='auto' (got mode={self.mode!r})"
            )
        _check_int("min_numel", self.min_numel, 0)
        if self.group_size is None:
            object.__setattr__(self, "group_size", 128 if self.mode == "8:1" else 64)
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size!r} is not valid; allowed: {GROUP_SIZES}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r} is not valid; allowed: {ROUNDINGS}")
        _check_int("recalibrate_every", self.recalibrate_every, 0)
        _check_int("seed", self.seed, 0)
        if isinstance(self.keep_modules, str):
            object.__setattr__(self, "keep_modules", (self.keep_modules,))
        else:
            object.__setattr__(self, "keep_modules", tuple(self.keep_modules))
        if not isinstance(self.lean_lm_head, bool):
            raise ValueError(f"lean_lm_head={self.lean_lm_head!r} is not valid; allowed: True, False")
        if not isinstance(self.allocator, bool):
            raise ValueError(f"allocator={self.allocator!r} is not valid; allowed: True, False")
        if not isinstance(self.pool, bool):
            raise ValueError(f"pool={self.pool!r} is not valid; allowed: True, False")

    @property
    def target_ratio(self) -> float | None:
        """The ratio the mode aims for (None for ``auto``, whose target is the byte budget)."""
        return MODE_RATIOS.get(self.mode)

    @property
    def budget_fraction(self) -> float | None:
        """The budget as a fraction of the uncompressed pass (``budget="25%"`` -> 0.25), else None."""
        return self.budget if isinstance(self.budget, float) else None

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_value(cls, value: Any = None, **options: Any) -> "CompressionConfig":
        """Build a config from a mode string, a dict of options, a config, or keyword options."""
        if isinstance(value, CompressionConfig):
            return dataclasses.replace(value, **options) if options else value
        if value is None:
            base: dict = {}
        elif isinstance(value, str):
            base = {"mode": value}
        elif isinstance(value, Mapping):
            base = dict(value)
        else:
            raise ValueError(
                f"compression setting {value!r} is not valid; allowed: a mode string "
                f"({', '.join(MODES)}), a dict of options, or a CompressionConfig"
            )
        base.update(options)
        unknown = sorted(set(base) - set(cls.options()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(cls.options())}"
            )
        return cls(**base)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; allowed: an int >= {minimum}")
