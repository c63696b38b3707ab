"""Outlier split ("sparse storage"): the largest-magnitude values exact, the rest k-bit quantized.

Activations are heavy-tailed: a few large values stretch every group range they fall in and cost
all the other values of that group their precision. Following the dense-and-sparse decomposition of
SqueezeLLM (Kim et al. 2023) and the outlier split of LLM.int8() (Dettmers et al. 2022):

* ``k = ceil(fraction * n)`` elements of largest ``|x|`` are kept exact (NaN/Inf rank below every
  finite value, so they are picked only when fewer than ``k`` values are finite; they are exact then too):
  ``outlier_index`` (sorted; int32 when ``n < 2**31``, else int64) and ``outlier_value`` (original
  dtype). The selection is ``torch.topk`` in both backends: it is not a Triton kernel.
* every other element goes through ``quant`` (``spec.quant``) as a nested ``Packed`` under
  ``tensors["rest"]``, after each outlier was replaced by the smallest remaining finite value of its
  own group (0 if none), so outliers do not stretch any group's range.
* decode: ``quant`` decode of the rest, then the exact outliers scattered back.

NaN/Inf are kept by ``quant``'s reserved codes. No host sync: ``k`` depends only on ``n``. The
Triton backend runs quant's kernels for the rest; the split and the outlier gather/scatter are torch
ops in both backends (``torch.topk`` is not a Triton kernel).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from . import quant
from ._backend import pick, triton_available
from ._packed import Packed, check_float_input
from .specs import SparseSpec

CODEC = "sparse"


def _check_arguments(x: torch.Tensor, spec: SparseSpec) -> None:
    check_float_input(x, CODEC)
    if not isinstance(spec, SparseSpec):
        raise TypeError(f"{CODEC}: spec must be a SparseSpec, got {type(spec).__name__}")


def _check_packed(packed: Packed) -> None:
    if not isinstance(packed, Packed) or packed.codec != CODEC:
        got = packed.codec if isinstance(packed, Packed) else type(packed).__name__
        raise ValueError(f"{CODEC}.decode: expected a Packed with codec='sparse', got {got!r}")


def _outlier_count(fraction: float, n: int) -> int:
    # Fraction(str(.)) reads 0.01 as 1/100, so 1% of 300 is 3, not ceil(3.0000000000000004) = 4.
    return math.ceil(Fraction(str(fraction)) * n)


def _split(flat: torch.Tensor, spec: SparseSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(outlier index int64 sorted, fill value per group fp32) for a flat tensor; torch in both backends."""
    xf = flat.to(torch.float32)
    finite = torch.isfinite(xf)
    k = _outlier_count(spec.fraction, flat.numel())  # of all elements: known without a host sync
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device), None
    magnitude = xf.abs().masked_fill_(~finite, -1.0)  # non-finite values are never outliers
    index = torch.topk(magnitude, k, sorted=False).indices.sort().values

    group = spec.group_size
    n = flat.numel()
    num_groups = -(-n // group)
    pad = num_groups * group - n
    keep = finite.clone()
    keep[index] = False
    xg = torch.cat([xf, xf.new_zeros(pad)]).view(num_groups, group)
    keep = torch.cat([keep, keep.new_zeros(pad)]).view(num_groups, group)
    fill = xg.masked_fill(~keep, math.inf).amin(1)
    fill = torch.where(torch.isinf(fill), 0.0, fill)  # only outliers/non-finite in the group
    return index, fill


def _make_packed(x, spec, index, values, rest) -> Packed:
    index_dtype = torch.int32 if x.numel() < 2**31 else torch.int64
    return Packed(
        codec=CODEC,
        shape=x.shape,
        dtype=x.dtype,
        bits=spec.bits,
        tensors={"outlier_index": index.to(index_dtype), "outlier_value": values, "rest": rest},
        params={"fraction": spec.fraction, "group_size": spec.group_size, "rounding": spec.rounding},
    )


@torch.no_grad()  # a pack must not keep an autograd graph (and x) alive
def encode_reference(x: torch.Tensor, spec: SparseSpec, *, seed: int = 0) -> Packed:
    """Split with torch ops, quantize the rest with ``quant.encode_reference``."""
    _check_arguments(x, spec)
    flat = x.reshape(-1)
    index, fill = _split(flat, spec)
    values = flat[index]
    rest = flat
    if index.numel():
        rest = flat.clone()
        rest[index] = fill[index // spec.group_size].to(x.dtype)  # exact: fill is one of x's values
    return _make_packed(x, spec, index, values, quant.encode_reference(rest, spec.quant, seed=seed))


@torch.no_grad()
def decode_reference(packed: Packed) -> torch.Tensor:
    _check_packed(packed)
    out = quant.decode_reference(packed.tensors["rest"])
    index = packed.tensors["outlier_index"]
    if index.numel():
        out[index.to(torch.int64)] = packed.tensors["outlier_value"]
    return out.view(packed.shape)


@torch.no_grad()
def encode_triton(x: torch.Tensor, spec: SparseSpec, *, seed: int = 0) -> Packed:
    """The same split with torch ops (on the GPU already: a gather and a scatter of ``k`` elements
    need no kernel of their own), then ``quant.encode_triton`` for the rest."""
    _check_arguments(x, spec)
    if not triton_available():
        raise RuntimeError(f"{CODEC}.encode_triton needs triton, which is not installed")
    flat = x.reshape(-1)
    index, fill = _split(flat, spec)
    values = flat[index]
    rest = flat
    if index.numel():
        rest = flat.clone()
        rest[index] = fill[index // spec.group_size].to(x.dtype)
    return _make_packed(x, spec, index, values, quant.encode_triton(rest, spec.quant, seed=seed))


@torch.no_grad()
def decode_triton(packed: Packed) -> torch.Tensor:
    """``quant.decode_triton`` of the rest, then the exact outliers scattered back (torch)."""
    _check_packed(packed)
    if not triton_available():
        raise RuntimeError(f"{CODEC}.decode_triton needs triton, which is not installed")
    out = quant.decode_triton(packed.tensors["rest"]).view(-1)
    index = packed.tensors["outlier_index"]
    if index.numel():
        out[index.to(torch.int64)] = packed.tensors["outlier_value"]
    return out.view(packed.shape)


@torch.no_grad()
def encode(x: torch.Tensor, spec: SparseSpec, *, seed: int = 0, backend: str | None = None) -> Packed:
    """Keep the ``spec.fraction`` largest-magnitude values exact, quantize the rest."""
    check_float_input(x, CODEC)
    return pick(x.device, backend, encode_triton, encode_reference)(x, spec, seed=seed)


@torch.no_grad()
def decode(packed: Packed, *, backend: str | None = None) -> torch.Tensor:
    """Rebuild a tensor of the original shape, dtype and device (contiguous) from ``packed``."""
    _check_packed(packed)
    return pick(packed.device, backend, decode_triton, decode_reference)(packed)
