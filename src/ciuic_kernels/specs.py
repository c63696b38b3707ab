"""Codec specifications: frozen, validated on construction, with errors that name the valid values."""

from __future__ import annotations

from dataclasses import dataclass

from ._packed import check_choice

QUANT_BITS = (8, 4, 2)
ROUNDINGS = ("nearest", "stochastic")
FP8_FORMATS = ("e4m3", "e5m2")
FP8_SCALINGS = ("group", "tensor")
GROUP_SIZE_RANGE = (32, 256)


def _check_group_size(group_size: int) -> None:
    lo, hi = GROUP_SIZE_RANGE
    valid = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not valid or not (lo <= group_size <= hi) or group_size & (group_size - 1):
        raise ValueError(
            f"group_size={group_size!r} is not valid; allowed: a power of two from {lo} to {hi} "
            "(32, 64, 128, 256)"
        )


@dataclass(frozen=True)
class QuantSpec:
    """Per-group asymmetric k-bit quantization (see ``ciuic_kernels.quant``)."""

    bits: int = 4
    group_size: int = 64
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, QUANT_BITS)
        _check_group_size(self.group_size)
        check_choice("rounding", self.rounding, ROUNDINGS)


@dataclass(frozen=True)
class FP8Spec:
    """Scaled fp8 storage (see ``ciuic_kernels.fp8``)."""

    format: str = "e4m3"
    scaling: str = "group"
    group_size: int = 64

    def __post_init__(self) -> None:
        check_choice("format", self.format, FP8_FORMATS)
        check_choice("scaling", self.scaling, FP8_SCALINGS)
        _check_group_size(self.group_size)


@dataclass(frozen=True)
class BitmaskSpec:
    """1 bit per element for bool / {0, 1} / {0, c} tensors (see ``ciuic_kernels.bitmask``).

    ``check=True`` verifies that a non-bool input holds zero and at most one other value and raises
    ValueError naming the first other value; that costs a host sync. ``check=False`` trusts the
    caller (who knows the tensor is a mask, e.g. the engine after classifying the saved tensor
    once): no sync, ``c`` is the first nonzero element, and any other nonzero value decodes as ``c``.
    """

    check: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.check, bool):
            raise ValueError(f"check={self.check!r} is not valid; allowed: True, False")


@dataclass(frozen=True)
class SparseSpec:
    """Largest-magnitude ``fraction`` kept exact, the rest k-bit (see ``ciuic_kernels.sparse``)."""

    fraction: float = 0.01
    bits: int = 4
    group_size: int = 64
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, (int, float)) or not (0.0 <= float(self.fraction) < 1.0):
            raise ValueError(f"fraction={self.fraction!r} is not valid; allowed: a number in [0, 1)")
        check_choice("bits", self.bits, QUANT_BITS)
        _check_group_size(self.group_size)
        check_choice("rounding", self.rounding, ROUNDINGS)

    @property
    def quant(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.rounding)
