"""Scaled fp8 storage: 8-bit e4m3 / e5m2 codes plus fp32 scales (per group or per tensor).

Math (the scaled-fp8 recipe of Micikevicius et al., "FP8 Formats for Deep Learning", 2022,
arXiv:2209.05433, as used by torchao.float8 / Transformer Engine):

    scale   = amax(|finite x|) / fmt_max          (per group of ``group_size`` consecutive flat
                                                   elements, the last group partial; or one for
                                                   the whole tensor; 1 where that is 0)
    payload = fp8_rne(clamp(x / scale, -fmt_max, fmt_max))     stored as its uint8 bit pattern
    decode  = fp32(payload) * scale                -> original dtype (round to nearest even)

Formats follow the OCP 8-bit floating point spec (torch dtypes):
    e4m3 = torch.float8_e4m3fn: bias 7, 3 mantissa bits, max 448, no inf, NaN = S.1111.111
    e5m2 = torch.float8_e5m2:   bias 15, 2 mantissa bits, max 57344, IEEE-like inf / NaN
``fp8_rne`` is exactly torch's ``.to(torch.float8_*)`` (round to nearest, ties to even, with
subnormals); the Triton kernels reproduce it with integer bit manipulation so they need no hardware
fp8 support and match the reference bit for bit.

NaN and +-Inf never enter the payload (e4m3 has no inf, and one inf would make a group's scale
useless): their flat positions go to ``nonfinite_index`` (int64) and their values to
``nonfinite_value`` (original dtype), both empty for finite inputs; the payload holds 0 there.

Bytes kept: n (payload) + 4 * ceil(n / group_size) (fp32 group scales) or 4 (tensor scale),
plus 8 + itemsize per non-finite element. Against bf16 (2 bytes per element) with e4m3/e5m2 and
group_size 64 that is 0.5 + 4 / (2 * 64) = 0.53125; against fp32 it is 0.265625.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._backend import pick, triton_available
from ._packed import Packed, check_float_input
from .specs import FP8Spec

CODEC = "fp8"


@dataclass(frozen=True)
class _Format:
    torch_dtype: torch.dtype
    exp_bias: int
    mant_bits: int
    max_value: float


_FORMATS = {
    "e4m3": _Format(torch.float8_e4m3fn, exp_bias=7, mant_bits=3, max_value=448.0),
    "e5m2": _Format(torch.float8_e5m2, exp_bias=15, mant_bits=2, max_value=57344.0),
}


def _check(x: torch.Tensor, spec: FP8Spec) -> _Format:
    check_float_input(x, CODEC)
    if not isinstance(spec, FP8Spec):
        raise TypeError(f"{CODEC}: expected an FP8Spec, got {type(spec).__name__}")
    return _FORMATS[spec.format]  # FP8Spec already validated the format name


def _split_nonfinite(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions (int64) and original values of NaN / +-Inf elements (empty when none)."""
    index = torch.nonzero(~torch.isfinite(flat)).reshape(-1)
    return index, flat[index]


def _scale_from_amax(amax: torch.Tensor, fmt: _Format) -> torch.Tensor:
    # IEEE fp32 division (correctly rounded on CPU and CUDA, as div_rn in the kernel); a scale
    # that is 0 (all-zero group, or amax so small the quotient underflows) becomes 1.
    scale = amax.to(torch.float32) / fmt.max_value
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _packed(x, spec, payload, scale, index, values) -> Packed:
    return Packed(
        codec=CODEC,
        shape=x.shape,
        dtype=x.dtype,
        bits=8.0,
        tensors={"payload": payload, "scale": scale, "nonfinite_index": index, "nonfinite_value": values},
        params={"format": spec.format, "scaling": spec.scaling, "group_size": spec.group_size},
    )


def _restore(out_flat: torch.Tensor, packed: Packed) -> torch.Tensor:
    index = packed.tensors["nonfinite_index"]
    if index.numel():
        out_flat[index] = packed.tensors["nonfinite_value"]
    return out_flat.reshape(packed.shape)


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the CPU path and the test oracle)
# ----------------------------------------------------------------------------------------------


def encode_reference(x: torch.Tensor, spec: FP8Spec, *, seed: int = 0) -> Packed:
    """Reference encoder; ``seed`` is accepted for the common signature (rounding is deterministic)."""
    fmt = _check(x, spec)
    flat = x.reshape(-1)
    n = flat.numel()
    index, values = _split_nonfinite(flat)
    x32 = flat.to(torch.float32)
    if index.numel():
        x32 = torch.where(torch.isfinite(x32), x32, torch.zeros_like(x32))
    if spec.scaling == "group":
        g = spec.group_size
        groups = -(-n // g)
        tiles = F.pad(x32, (0, groups * g - n)).view(groups, g)  # zero padding leaves amax alone
        scale = _scale_from_amax(tiles.abs().amax(dim=1), fmt)
        q = (tiles / scale[:, None]).reshape(-1)[:n]
    else:
        amax = x32.abs().amax() if n else x32.new_zeros(())
        scale = _scale_from_amax(amax.reshape(1), fmt)
        q = x32 / scale
    q = q.clamp(-fmt.max_value, fmt.max_value)
    payload = q.to(fmt.torch_dtype).view(torch.uint8)
    return _packed(x, spec, payload, scale, index, values)


def decode_reference(packed: Packed) -> torch.Tensor:
    fmt = _FORMATS[packed.params["format"]]
    payload, scale = packed.tensors["payload"], packed.tensors["scale"]
    n = payload.numel()
    v = payload.view(fmt.torch_dtype).to(torch.float32)
    if packed.params["scaling"] == "group":
        g = packed.params["group_size"]
        groups = scale.numel()
        v = (F.pad(v, (0, groups * g - n)).view(groups, g) * scale[:, None]).reshape(-1)[:n]
    else:
        v = v * scale
    return _restore(v.to(packed.dtype), packed).contiguous()


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._settings import calculate_settings, grid_1d

    @triton.jit
    def _is_finite(x):
        # exponent field all ones <=> inf or NaN (integer test: no reliance on float compares)
        return (x.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000

    @triton.jit
    def _fp32_to_fp8_bits(q, EXP_BIAS: tl.constexpr, MANT_BITS: tl.constexpr):
        """fp32 -> fp8 bit pattern (uint32 in 0..255), round to nearest even, for finite |q| <= max.

        Bit-exact with torch's c10 ``fp8e4m3fn_from_fp32_value`` / ``fp8e5m2_from_fp32_value``
        on that range: normals rebias the exponent and round the 23-bit mantissa to MANT_BITS
        (a mantissa carry rolls into the exponent); results below the smallest normal
        2**(1 - bias) are multiples of 2**(1 - bias - MANT_BITS), rounded from the full fp32
        significand with an explicit round-half-even shift.
        """
        bits = q.to(tl.uint32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        drop: tl.constexpr = 23 - MANT_BITS
        lsb = (mag >> drop) & 1
        normal = (mag - ((127 - EXP_BIAS) << 23) + ((1 << (drop - 1)) - 1) + lsb) >> drop

        exp = (mag >> 23).to(tl.int32)
        significand = tl.where(exp == 0, mag & 0x7FFFFF, (mag & 0x7FFFFF) | 0x800000)
        # value = significand * 2**(max(exp,1) - 150); in subnormal units that is a right shift
        shift = (151 - EXP_BIAS - MANT_BITS) - tl.maximum(exp, 1)
        shift = tl.minimum(tl.maximum(shift, 1), 31).to(tl.uint32)  # >= 26 already gives 0
        one = tl.full(shift.shape, 1, tl.uint32)
        kept = significand >> shift
        rest = significand & ((one << shift) - 1)
        half = one << (shift - 1)
        round_up = (rest > half) | ((rest == half) & ((kept & 1) == 1))
        subnormal = kept + round_up.to(tl.uint32)

        is_normal = mag >= ((128 - EXP_BIAS) << 23)
        return tl.where(is_normal, normal, subnormal) | sign

    @triton.jit
    def _fp8_bits_to_fp32(b, EXP_BIAS: tl.constexpr, MANT_BITS: tl.constexpr, SUBNORMAL_UNIT: tl.constexpr):
        """fp8 bit pattern -> fp32 (exact), for finite codes."""
        b = b.to(tl.uint32)
        exp = (b >> MANT_BITS) & ((1 << (7 - MANT_BITS)) - 1)
        mant = b & ((1 << MANT_BITS) - 1)
        normal = (((exp + (127 - EXP_BIAS)) << 23) | (mant << (23 - MANT_BITS))).to(tl.float32, bitcast=True)
        mag = tl.where(exp == 0, mant.to(tl.float32) * SUBNORMAL_UNIT, normal)
        return tl.where((b & 0x80) != 0, -mag, mag)

    @triton.jit
    def _absmax_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
        """partial[pid] = max |x| over the finite elements of block pid (tensor scaling, pass 1)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(_is_finite(x), x, 0.0)
        tl.store(partial_ptr + pid, tl.max(tl.abs(x), axis=0))

    @triton.jit
    def _encode_kernel(
        x_ptr,
        payload_ptr,
        scale_ptr,
        n,
        n_groups,
        MAX_VALUE: tl.constexpr,
        EXP_BIAS: tl.constexpr,
        MANT_BITS: tl.constexpr,
        GROUP_SCALING: tl.constexpr,
        ROWS: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        """Scaled fp8 encode of a [ROWS, GROUP] tile of the flat input (see the module docstring).

        Group scaling: each row is one group; its scale = div_rn(amax, MAX_VALUE) (1 if 0) is
        computed here and stored. Tensor scaling: the scale precomputed from _absmax_kernel's
        partial maxima is loaded. q = div_rn(x, scale) is correctly rounded, as torch's division.
        """
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(_is_finite(x), x, 0.0)  # non-finite values live in the side channel
        if GROUP_SCALING:
            scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), MAX_VALUE)
            scale = tl.where(scale == 0.0, 1.0, scale)
            tl.store(scale_ptr + rows, scale, mask=rows < n_groups)
            q = tl.math.div_rn(x, scale[:, None])
        else:
            q = tl.math.div_rn(x, tl.load(scale_ptr))
        q = tl.minimum(tl.maximum(q, -MAX_VALUE), MAX_VALUE)
        code = _fp32_to_fp8_bits(q, EXP_BIAS, MANT_BITS)
        tl.store(payload_ptr + offs, code.to(tl.uint8), mask=mask)

    @triton.jit
    def _decode_kernel(
        payload_ptr,
        scale_ptr,
        out_ptr,
        n,
        EXP_BIAS: tl.constexpr,
        MANT_BITS: tl.constexpr,
        SUBNORMAL_UNIT: tl.constexpr,
        GROUP_SCALING: tl.constexpr,
        GROUP: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """out = fp32(payload) * scale, rounded to the output dtype (nearest even)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = _fp8_bits_to_fp32(tl.load(payload_ptr + offs, mask=mask, other=0), EXP_BIAS, MANT_BITS, SUBNORMAL_UNIT)
        if GROUP_SCALING:
            scale = tl.load(scale_ptr + offs // GROUP, mask=mask, other=1.0)
        else:
            scale = tl.load(scale_ptr)
        out = v * scale
        if OUT_BF16:
            # explicit round-half-even to bf16 (out_ptr is an int16 view): the interpreter's cast
            # truncates, and finite-only inputs make the carry trick safe (inf stays inf)
            bits = out.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _subnormal_unit(fmt: _Format) -> float:
    return 2.0 ** (1 - fmt.exp_bias - fmt.mant_bits)


def encode_triton(x: torch.Tensor, spec: FP8Spec, *, seed: int = 0) -> Packed:
    """Triton encoder (CUDA, or CPU under TRITON_INTERPRET=1); same bits as encode_reference."""
    fmt = _check(x, spec)
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    index, values = _split_nonfinite(flat)
    payload = torch.empty(n, dtype=torch.uint8, device=x.device)
    block, warps = calculate_settings(n)
    if spec.scaling == "group":
        g = spec.group_size
        n_groups = -(-n // g)
        scale = torch.empty(n_groups, dtype=torch.float32, device=x.device)
        rows, width = max(1, block // g), g
    else:
        n_groups = 1
        if n:
            partial = torch.empty(grid_1d(n, block)[0], dtype=torch.float32, device=x.device)
            _absmax_kernel[grid_1d(n, block)](flat, partial, n, BLOCK=block, num_warps=warps)
            amax = partial.amax()
        else:
            amax = torch.zeros((), dtype=torch.float32, device=x.device)
        scale = _scale_from_amax(amax.reshape(1), fmt)
        rows, width = 1, block
    if n:
        _encode_kernel[grid_1d(n, rows * width)](
            flat,
            payload,
            scale,
            n,
            n_groups,
            MAX_VALUE=fmt.max_value,
            EXP_BIAS=fmt.exp_bias,
            MANT_BITS=fmt.mant_bits,
            GROUP_SCALING=spec.scaling == "group",
            ROWS=rows,
            GROUP=width,
            num_warps=warps,
        )
    return _packed(x, spec, payload, scale, index, values)


def decode_triton(packed: Packed) -> torch.Tensor:
    fmt = _FORMATS[packed.params["format"]]
    payload, scale = packed.tensors["payload"], packed.tensors["scale"]
    n = payload.numel()
    out = torch.empty(n, dtype=packed.dtype, device=payload.device)
    if n:
        bf16 = packed.dtype == torch.bfloat16
        block, warps = calculate_settings(n)
        _decode_kernel[grid_1d(n, block)](
            payload,
            scale,
            out.view(torch.int16) if bf16 else out,
            n,
            EXP_BIAS=fmt.exp_bias,
            MANT_BITS=fmt.mant_bits,
            SUBNORMAL_UNIT=_subnormal_unit(fmt),
            GROUP_SCALING=packed.params["scaling"] == "group",
            GROUP=packed.params["group_size"],
            OUT_BF16=bf16,
            BLOCK=block,
            num_warps=warps,
        )
    return _restore(out, packed).contiguous()


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def encode(x: torch.Tensor, spec: FP8Spec, *, seed: int = 0, backend: str | None = None) -> Packed:
    """Scaled fp8 encode; Triton on CUDA, the reference on CPU (``backend``/CIUIC_BACKEND force one)."""
    return pick(x.device, backend, encode_triton, encode_reference)(x, spec, seed=seed)


def decode(packed: Packed, *, backend: str | None = None) -> torch.Tensor:
    """Rebuild the tensor (original shape, dtype and device; contiguous) from an fp8 ``Packed``."""
    if packed.codec != CODEC:
        raise ValueError(f"{CODEC}.decode got a Packed of codec {packed.codec!r}; allowed: {CODEC!r}")
    return pick(packed.device, backend, decode_triton, decode_reference)(packed)
