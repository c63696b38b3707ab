"""ciuic_kernels: compression codecs, each a Triton kernel and a pure-PyTorch reference.

``encode(x, spec, seed=0) -> Packed`` and ``decode(packed) -> Tensor`` dispatch on the spec type
and on the device (Triton on CUDA, the reference on CPU; ``CIUIC_BACKEND=torch|triton`` forces one).
"""

from __future__ import annotations

import torch

from ._backend import select_backend
from ._packed import Packed
from .specs import BitmaskSpec, FP8Spec, QuantSpec, SparseSpec
from . import bitmask, fp8, quant, sparse

_BY_SPEC = {QuantSpec: quant, FP8Spec: fp8, BitmaskSpec: bitmask, SparseSpec: sparse}
_BY_CODEC = {"quant": quant, "fp8": fp8, "bitmask": bitmask, "sparse": sparse}

Spec = QuantSpec | FP8Spec | BitmaskSpec | SparseSpec


def encode(x: torch.Tensor, spec: Spec, *, seed: int = 0, backend: str | None = None) -> Packed:
    """Compress ``x`` as ``spec`` says. ``seed`` drives stochastic rounding (never torch's RNG)."""
    module = _BY_SPEC.get(type(spec))
    if module is None:
        names = ", ".join(cls.__name__ for cls in _BY_SPEC)
        raise TypeError(f"spec of type {type(spec).__name__} is not a codec spec; allowed: {names}")
    return module.encode(x, spec, seed=seed, backend=backend)


def decode(packed: Packed, *, backend: str | None = None) -> torch.Tensor:
    """Rebuild the tensor (original shape, dtype, device) from a ``Packed``."""
    module = _BY_CODEC.get(packed.codec)
    if module is None:
        raise ValueError(f"unknown codec {packed.codec!r}; allowed: {', '.join(map(repr, _BY_CODEC))}")
    return module.decode(packed, backend=backend)


__all__ = [
    "Packed",
    "QuantSpec",
    "FP8Spec",
    "BitmaskSpec",
    "SparseSpec",
    "encode",
    "decode",
    "select_backend",
    "quant",
    "fp8",
    "bitmask",
    "sparse",
]
