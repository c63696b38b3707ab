"""Bitmask codec: 1 bit per element for masks (bool, {0, 1}, or {0, c} such as dropout's 1/(1-p)).

Layout: element ``8*j + r`` of the flattened tensor is bit ``r`` (LSB first) of ``payload[j]``
(uint8, ceil(n / 8) bytes; the unused high bits of the last byte are 0). The bit is ``x != 0``.

Accepted inputs (lossless; ``torch.equal`` holds after the round trip):
  * bool tensors: the payload is all there is;
  * real tensors (float or int) holding at most two distinct values, one of which is 0: {0, 1}
    for ReLU-style masks, {0, c} for dropout masks saved as ``mask * 1/(1-p)``. The nonzero value
    ``c`` is kept as the 0-d tensor ``value`` in the original dtype (1 when the tensor is all zeros),
    so decode gives ``where(bit, c, 0)`` in that dtype. -0.0 counts as 0 and decodes as +0.0.
Anything else (a third value, NaN, two nonzero values) raises ValueError naming the value found.

Bytes kept: ceil(n / 8) + (itemsize of the dtype, for ``value``; 0 for bool): 1/16 of a bf16
tensor, 1/8 of a bool tensor. Bit-packing as in ActNN (Chen et al., ICML 2021), which stores ReLU
and dropout masks at 1 bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import pick, triton_available
from ._packed import Packed
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


def _nonzero_value(flat: torch.Tensor) -> torch.Tensor | None:
    """The single nonzero value ``c`` of a {0, c} tensor as a 0-d tensor (None for bool).

    Costs two elementwise passes and one host sync (the check); raises ValueError otherwise.
    """
    if flat.dtype == torch.bool:
        return None
    nonzero = flat != 0
    if flat.numel() == 0:
        return torch.ones((), dtype=flat.dtype, device=flat.device)
    first = flat[nonzero.to(torch.uint8).argmax()]  # first nonzero element (flat[0] if none)
    value = torch.where(first == 0, torch.ones_like(first), first)
    bad = nonzero & (flat != value)
    if bool(bad.any()):
        i = int(bad.to(torch.uint8).argmax())
        found = flat[i].item()
        other = "" if i == int(nonzero.to(torch.uint8).argmax()) else f" (the tensor also holds {value.item()!r})"
        raise ValueError(
            f"{CODEC}: found value {found!r} at flat index {i}{other}; "
            "allowed: {0, 1}, or {0, c}: zero and one other value (e.g. a dropout mask)"
        )
    return value


def _packed(x: torch.Tensor, payload: torch.Tensor, value: torch.Tensor | None) -> Packed:
    tensors = {"payload": payload} if value is None else {"payload": payload, "value": value}
    return Packed(codec=CODEC, shape=x.shape, dtype=x.dtype, bits=1.0, tensors=tensors, params={})


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the CPU path and the test oracle)
# ----------------------------------------------------------------------------------------------


def _bit_weights(device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def encode_reference(x: torch.Tensor, spec: BitmaskSpec, *, seed: int = 0) -> Packed:
    """Reference packer; ``seed`` is accepted for the common signature (the codec is lossless)."""
    _check(x, spec)
    flat = x.reshape(-1)
    value = _nonzero_value(flat)
    n = flat.numel()
    bits = F.pad((flat != 0).to(torch.uint8), (0, -n % 8)).view(-1, 8)
    payload = (bits << _bit_weights(x.device)).sum(dim=1, dtype=torch.uint8)  # <= 255: no overflow
    return _packed(x, payload, value)


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

    from ._settings import calculate_settings, grid_1d

    @triton.jit
    def _encode_kernel(x_ptr, payload_ptr, n, n_bytes, BLOCK_BYTES: tl.constexpr):
        """payload[j] = sum_r (x[8j + r] != 0) << r over a [BLOCK_BYTES, 8] tile (bool as uint8)."""
        pid = tl.program_id(0)
        byte = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        r = tl.arange(0, 8)
        offs = byte[:, None] * 8 + r[None, :]
        x = tl.load(x_ptr + offs, mask=offs < n, other=0)
        bit = (x != 0).to(tl.uint32) << r[None, :].to(tl.uint32)
        tl.store(payload_ptr + byte, tl.sum(bit, axis=1).to(tl.uint8), mask=byte < n_bytes)

    @triton.jit
    def _decode_kernel(payload_ptr, value_ptr, out_ptr, n, IS_BOOL: tl.constexpr, BLOCK: tl.constexpr):
        """out[i] = bit (i & 7) of payload[i >> 3]; as 0/1 for bool, else where(bit, value, 0)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(payload_ptr + (offs >> 3), mask=mask, other=0).to(tl.uint32)
        bit = (byte >> (offs & 7).to(tl.uint32)) & 1
        if IS_BOOL:
            tl.store(out_ptr + offs, bit.to(tl.uint8), mask=mask)
        else:
            value = tl.load(value_ptr + offs * 0, mask=mask)  # broadcast; exact in its own dtype
            tl.store(out_ptr + offs, tl.where(bit != 0, value, tl.zeros_like(value)), mask=mask)


def encode_triton(x: torch.Tensor, spec: BitmaskSpec, *, seed: int = 0) -> Packed:
    """Triton packer (CUDA, or CPU under TRITON_INTERPRET=1); same bytes as encode_reference."""
    _check(x, spec)
    flat = x.reshape(-1).contiguous()
    value = _nonzero_value(flat)
    n = flat.numel()
    n_bytes = -(-n // 8)
    payload = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    if n:
        block, warps = calculate_settings(n_bytes, max_block=1024)  # x 8 elements per program
        source = flat.view(torch.uint8) if flat.dtype == torch.bool else flat
        _encode_kernel[grid_1d(n_bytes, block)](source, payload, n, n_bytes, BLOCK_BYTES=block, num_warps=warps)
    return _packed(x, payload, value)


def decode_triton(packed: Packed) -> torch.Tensor:
    payload = packed.tensors["payload"]
    n = packed.numel
    out = torch.empty(n, dtype=packed.dtype, device=payload.device)
    if n:
        is_bool = packed.dtype == torch.bool
        value = payload if is_bool else packed.tensors["value"]  # unused pointer when bool
        block, warps = calculate_settings(n)
        _decode_kernel[grid_1d(n, block)](
            payload,
            value,
            out.view(torch.uint8) if is_bool else out,
            n,
            IS_BOOL=is_bool,
            BLOCK=block,
            num_warps=warps,
        )
    return out.reshape(packed.shape)


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
