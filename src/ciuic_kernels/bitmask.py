"""Bitmask codec: 1 bit per element for masks (bool, {0, 1}, or {0, c} such as dropout's 1/(1-p)).

Layout: element ``8*j + r`` of the flattened tensor is bit ``r`` (LSB first) of ``payload[j]``
(uint8, ceil(n / 8) bytes; the unused high bits of the last byte are 0). The bit is ``x != 0``.

Accepted inputs (lossless; ``torch.equal`` holds after the round trip):
  * bool tensors: the payload is all there is;
  * real tensors (float or int) holding at most two distinct values, one of which is 0: {0, 1}
    for ReLU-style masks, {0, c} for dropout masks saved as ``mask * 1/(1-p)``. The nonzero value
    ``c`` is kept as the 0-d tensor ``value`` in the original dtype (1 when the tensor is all zeros),
    so decode gives ``where(bit, c, 0)`` in that dtype. -0.0 counts as 0 and decodes as +0.0.
Anything else (a third value, NaN, two nonzero values) raises ValueError naming the value found,
when ``spec.check`` (the default; the check costs a host sync). With ``BitmaskSpec(check=False)``
the caller vouches for the input: no check, no host sync, ``c`` is the first nonzero element
(found by the encode kernel itself: an atomic min of the first nonzero index per block).

One pass each way: encode reads the input once, decode reads the payload once (plus ``c``).

Bytes kept: ceil(n / 8) + (itemsize of the dtype, for ``value``; 0 for bool): 1/16 of a bf16
tensor, 1/8 of a bool tensor. Bit-packing as in ActNN (Chen et al., ICML 2021), which stores ReLU
and dropout masks at 1 bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import pick, triton_available
from ._packed import Packed
from ._pool import adopt, empty_many
from ._settings import NUM_WARPS, TILE_ELEMENTS
from .specs import BitmaskSpec

CODEC = "bitmask"

ALLOWED_DTYPES = (
    torch.bool,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
)


def _check(x: torch.Tensor, spec: BitmaskSpec) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{CODEC}: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(spec, BitmaskSpec):
        raise TypeError(f"{CODEC}: expected a BitmaskSpec, got {type(spec).__name__}")
    if x.dtype not in ALLOWED_DTYPES:
        allowed = ", ".join(str(d) for d in ALLOWED_DTYPES)
        raise ValueError(f"{CODEC}: unsupported dtype {x.dtype}; allowed: {allowed}")


def _value_from_first(flat: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``c`` as a 0-d tensor: ``flat[first]``, or 1 when there is no nonzero element (``first == n``)."""
    n = flat.numel()
    if n == 0:
        return torch.ones((), dtype=flat.dtype, device=flat.device)
    value = flat[first.clamp(max=n - 1).reshape(1)].reshape(())  # a 1-element index: no int() of it
    return torch.where(first < n, value, torch.ones_like(value))


def _check_two_valued(flat: torch.Tensor, value: torch.Tensor) -> None:
    """Raise ValueError unless every nonzero element equals ``value`` (one host sync)."""
    nonzero = flat != 0
    bad = nonzero & (flat != value)
    if bool(bad.any()):
        i = int(bad.to(torch.uint8).argmax())
        found = flat[i].item()
        other = "" if i == int(nonzero.to(torch.uint8).argmax()) else f" (the tensor also holds {value.item()!r})"
        raise ValueError(
            f"{CODEC}: found value {found!r} at flat index {i}{other}; "
            "allowed: {0, 1}, or {0, c}: zero and one other value (e.g. a dropout mask)"
        )


def _packed(x: torch.Tensor, payload: torch.Tensor, value: torch.Tensor | None) -> Packed:
    tensors = {"payload": payload} if value is None else {"payload": payload, "value": value}
    return Packed(codec=CODEC, shape=x.shape, dtype=x.dtype, bits=1.0, tensors=tensors, params={})


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the CPU path and the test oracle)
# ----------------------------------------------------------------------------------------------


def _bit_weights(device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


@torch.no_grad()
def encode_reference(x: torch.Tensor, spec: BitmaskSpec, *, seed: int = 0) -> Packed:
    """Reference packer; ``seed`` is accepted for the common signature (the codec is lossless)."""
    _check(x, spec)
    flat = x.reshape(-1)
    n = flat.numel()
    is_nonzero = flat != 0
    nonzero = is_nonzero.to(torch.uint8)
    value = None
    if flat.dtype != torch.bool:
        first = torch.where(is_nonzero.any(), nonzero.argmax(), n) if n else torch.zeros((), dtype=torch.int64)
        value = _value_from_first(flat, first)
        if spec.check:
            _check_two_valued(flat, value)
    bits = F.pad(nonzero, (0, -n % 8)).view(-1, 8)
    payload = (bits << _bit_weights(x.device)).sum(dim=1, dtype=torch.uint8)  # <= 255: no overflow
    if value is not None:
        payload, value = adopt(payload, value)  # into a pooled buffer when the engine lends one
    else:
        (payload,) = adopt(payload)
    return _packed(x, payload, value)


@torch.no_grad()
def decode_reference(packed: Packed) -> torch.Tensor:
    payload = packed.tensors["payload"]
    bits = ((payload[:, None] >> _bit_weights(payload.device)) & 1).reshape(-1)[: packed.numel]
    if packed.dtype == torch.bool:
        out = bits.to(torch.bool)
    else:
        value = packed.tensors["value"]
        out = torch.where(bits.to(torch.bool), value, torch.zeros_like(value))
    return out.reshape(packed.shape).contiguous()


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _encode_kernel(x_ptr, payload_ptr, first_ptr, n, n_bytes, BLOCK_BYTES: tl.constexpr, FIND_FIRST: tl.constexpr):
        """payload[j] = sum_r (x[8j + r] != 0) << r over a [BLOCK_BYTES, 8] tile (bool as uint8);
        with FIND_FIRST, ``first`` = min over the grid of the first nonzero flat index (atomic)."""
        pid = tl.program_id(0)
        byte = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        offs = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
        x = tl.load(x_ptr + offs, mask=offs < n, other=0)
        nonzero = x != 0
        if FIND_FIRST:
            first = tl.min(tl.min(tl.where(nonzero, offs, n), axis=1), axis=0)
            tl.atomic_min(first_ptr, first)
        # Bits of one byte come from 8 neighbours: split the last axis in halves three times
        # (tl.split keeps each pair in one thread, so the bytes stay contiguous per thread).
        bit = nonzero.to(tl.int32)
        a, b = tl.split(tl.reshape(bit, (BLOCK_BYTES, 4, 2)))  # elements 2k, 2k + 1
        c, d = tl.split(tl.reshape(a | (b << 1), (BLOCK_BYTES, 2, 2)))
        e, f = tl.split(c | (d << 2))
        tl.store(payload_ptr + byte, (e | (f << 4)).to(tl.uint8), mask=byte < n_bytes)

    @triton.jit
    def _decode_kernel(payload_ptr, value_ptr, out_ptr, n, n_bytes, IS_BOOL: tl.constexpr, BLOCK_BYTES: tl.constexpr):
        """out[8j + r] = bit r of payload[j]; as 0/1 for bool, else where(bit, value, 0)."""
        pid = tl.program_id(0)
        byte_index = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        byte = tl.load(payload_ptr + byte_index, mask=byte_index < n_bytes, other=0).to(tl.int32)
        # tl.join(x, y) stacks along a new last axis, in-thread: the result [j, a, b, c] holds bit
        # 4a + 2b + c of byte j, so the row-major flat order is element 8j + r.
        even = tl.join(tl.join(byte & 1, (byte >> 4) & 1), tl.join((byte >> 2) & 1, (byte >> 6) & 1))
        odd = tl.join(tl.join((byte >> 1) & 1, (byte >> 5) & 1), tl.join((byte >> 3) & 1, (byte >> 7) & 1))
        bits = tl.reshape(tl.join(even, odd), (BLOCK_BYTES * 8,))
        offs = pid.to(tl.int64) * (BLOCK_BYTES * 8) + tl.arange(0, BLOCK_BYTES * 8)
        mask = offs < n
        if IS_BOOL:
            tl.store(out_ptr + offs, bits.to(tl.uint8), mask=mask)
        else:
            value = tl.load(value_ptr)
            tl.store(out_ptr + offs, tl.where(bits != 0, value, tl.zeros_like(value)), mask=mask)


# Twice the common tile: 8192 elements per program, so a thread stores 8 payload bytes (64 bits).
_TILE_BYTES = 2 * TILE_ELEMENTS // 8
_NUM_WARPS = NUM_WARPS


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


@torch.no_grad()
def encode_triton(x: torch.Tensor, spec: BitmaskSpec, *, seed: int = 0) -> Packed:
    """Triton packer (CUDA, or CPU under TRITON_INTERPRET=1); same bytes as encode_reference."""
    _check(x, spec)
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    n_bytes = -(-n // 8)
    is_bool = flat.dtype == torch.bool
    if is_bool:
        (payload,) = empty_many([(n_bytes, torch.uint8)], x.device)
    else:
        payload, value_slot = empty_many([(n_bytes, torch.uint8), (1, flat.dtype)], x.device)
    first = torch.full((1,), n, dtype=torch.int64, device=x.device)
    if n:
        _encode_kernel[(-(-n_bytes // _TILE_BYTES),)](
            _kernel_view(flat), payload, first, n, n_bytes,
            BLOCK_BYTES=_TILE_BYTES, FIND_FIRST=not is_bool, num_warps=_NUM_WARPS,
        )  # fmt: skip
    value = None
    if not is_bool:
        value = _value_from_first(flat, first[0])
        if spec.check:
            _check_two_valued(flat, value)
        value = value_slot.copy_(value.reshape(1)).view(())
    return _packed(x, payload, value)


@torch.no_grad()
def decode_triton(packed: Packed) -> torch.Tensor:
    payload = packed.tensors["payload"]
    n = packed.numel
    out = torch.empty(n, dtype=packed.dtype, device=payload.device)
    if n:
        is_bool = packed.dtype == torch.bool
        value = payload if is_bool else packed.tensors["value"]  # unused pointer when bool
        _decode_kernel[(-(-payload.numel() // _TILE_BYTES),)](
            payload, value, _kernel_view(out), n, payload.numel(),
            IS_BOOL=is_bool, BLOCK_BYTES=_TILE_BYTES, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return out.reshape(packed.shape)


_TRITON_TYPES = {
    torch.bool: "u8", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
}  # fmt: skip


def AOT_CONFIGS() -> list[dict]:
    """Every (kernel, dtype) configuration the launchers above can pick (benchmarks/kernels.py)."""
    configs = []
    for dtype in ALLOWED_DTYPES:
        tname = _TRITON_TYPES[dtype]
        label = "bool" if dtype == torch.bool else tname
        is_bool = dtype == torch.bool
        pair = f"bitmask[{label}]"
        configs.append(dict(
            kernel=_encode_kernel, name=f"bitmask_encode[{label}]",
            signature=dict(x_ptr=f"*{tname}", payload_ptr="*u8", first_ptr="*i64", n="i32", n_bytes="i32",
                           BLOCK_BYTES="constexpr", FIND_FIRST="constexpr"),
            constexprs=dict(BLOCK_BYTES=_TILE_BYTES, FIND_FIRST=not is_bool), num_warps=_NUM_WARPS,
            divisible=("n", "n_bytes"), elements=_TILE_BYTES * 8, pair=pair,
            min_bytes_per_element=2 * (dtype.itemsize + 1 / 8),
        ))  # fmt: skip
        configs.append(dict(
            kernel=_decode_kernel, name=f"bitmask_decode[{label}]",
            signature=dict(payload_ptr="*u8", value_ptr=f"*{tname}", out_ptr=f"*{tname}", n="i32", n_bytes="i32",
                           IS_BOOL="constexpr", BLOCK_BYTES="constexpr"),
            constexprs=dict(IS_BOOL=is_bool, BLOCK_BYTES=_TILE_BYTES), num_warps=_NUM_WARPS,
            divisible=("n", "n_bytes"), elements=_TILE_BYTES * 8, pair=pair,
        ))  # fmt: skip
    return configs


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def encode(x: torch.Tensor, spec: BitmaskSpec | None = None, *, seed: int = 0, backend: str | None = None) -> Packed:
    """Pack a mask at 1 bit per element; Triton on CUDA, the reference on CPU."""
    spec = BitmaskSpec() if spec is None else spec
    return pick(x.device, backend, encode_triton, encode_reference)(x, spec, seed=seed)


def decode(packed: Packed, *, backend: str | None = None) -> torch.Tensor:
    """Rebuild the mask (original shape, dtype and device; contiguous) from a bitmask ``Packed``."""
    if packed.codec != CODEC:
        raise ValueError(f"{CODEC}.decode got a Packed of codec {packed.codec!r}; allowed: {CODEC!r}")
    return pick(packed.device, backend, decode_triton, decode_reference)(packed)
