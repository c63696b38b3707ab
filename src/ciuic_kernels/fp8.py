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

NaN and +-Inf survive exactly, inside the same pass (no side channel, no host sync):
    e5m2 has them: +-Inf -> S.11111.00, NaN -> 0.11111.11; finite values clamp to +-57344.
    e4m3 has NaN (S.1111.111) but no inf: a group (or, with tensor scaling, the tensor) that holds
    NaN/Inf is flagged by a negative stored scale (the step is ``|scale|``); in it finite values
    are scaled to +-416 (``fmt_max`` = 416 instead of 448, codes up to S.1111.101), S.1111.110 means
    +-Inf and S.1111.111 NaN. Decoded NaN is the canonical NaN of the output dtype.

Passes: group scaling reads ``x`` once (the scale comes from the group itself). Tensor scaling
needs the tensor's amax first: one reduction pass (``_absmax_kernel``, per-block maxima and
non-finite flags reduced on the device), then the encode pass; no host sync either way.

Bytes kept: n (payload) + 4 * ceil(n / group_size) (fp32 group scales) or 4 (tensor scale). Against
bf16 (2 bytes per element) with group_size 64 that is 0.5 + 4 / (2 * 64) = 0.53125; against fp32 it
is 0.265625.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._backend import pick, triton_available
from ._packed import Packed, check_float_input
from ._pool import adopt, empty_many
from ._settings import NUM_WARPS, TILE_ELEMENTS
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


_FLAGGED_E4M3_MAX = 416.0  # S.1111.101: the largest e4m3 value below the codes kept for +-Inf
_TILE = TILE_ELEMENTS  # elements per program of every kernel (see _settings)
_NUM_WARPS = NUM_WARPS
_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


def _scale_from_amax(amax: torch.Tensor, fmt: _Format, flagged: torch.Tensor) -> torch.Tensor:
    """The stored scale: amax / fmt_max (IEEE fp32 division, as div_rn in the kernels), 1 where
    that is 0 (all-zero group, or amax so small the quotient underflows); negative when flagged.
    ``fmt_max`` is 416 for a flagged e4m3 group (two codes are kept for +-Inf)."""
    amax = amax.to(torch.float32)
    if fmt.exp_bias == 7:  # e4m3
        limit = torch.where(flagged, _FLAGGED_E4M3_MAX, fmt.max_value).to(torch.float32)
        scale = amax / limit
    else:
        scale = amax / torch.full((), fmt.max_value, dtype=torch.float32, device=amax.device)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(flagged, -scale, scale) if fmt.exp_bias == 7 else scale


def _special_codes(x32: torch.Tensor, code: torch.Tensor, fmt: _Format) -> torch.Tensor:
    """Put the NaN/+-Inf codes of the format where ``x32`` is not finite."""
    inf_code = 0x7E if fmt.exp_bias == 7 else 0x7C
    special = torch.where(torch.isnan(x32), 0x7F, torch.where(x32 > 0, inf_code, 0x80 | inf_code)).to(torch.uint8)
    return torch.where(torch.isfinite(x32), code, special)


def _canonical_nan(out: torch.Tensor) -> torch.Tensor:
    bits = out.view(_INT_OF[out.dtype])
    nan = torch.full((), _CANONICAL_NAN[out.dtype], dtype=bits.dtype, device=out.device)
    return torch.where(torch.isnan(out), nan, bits).view(out.dtype)


def _packed(x, spec, payload, scale) -> Packed:
    return Packed(
        codec=CODEC,
        shape=x.shape,
        dtype=x.dtype,
        bits=8.0,
        tensors={"payload": payload, "scale": scale},
        params={"format": spec.format, "scaling": spec.scaling, "group_size": spec.group_size},
    )


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the CPU path and the test oracle)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_reference(x: torch.Tensor, spec: FP8Spec, *, seed: int = 0) -> Packed:
    """Reference encoder; ``seed`` is accepted for the common signature (rounding is deterministic)."""
    fmt = _check(x, spec)
    flat = x.reshape(-1)
    n = flat.numel()
    x32 = flat.to(torch.float32)
    finite = torch.isfinite(x32)
    xf = torch.where(finite, x32, torch.zeros_like(x32))
    if spec.scaling == "group":
        g = spec.group_size
        groups = -(-n // g)
        pad = groups * g - n
        tiles = F.pad(xf, (0, pad)).view(groups, g)  # zero padding leaves amax alone
        flagged = ~F.pad(finite, (0, pad), value=True).view(groups, g).all(dim=1)
        scale = _scale_from_amax(tiles.abs().amax(dim=1), fmt, flagged)
        q = (tiles / scale.abs()[:, None]).reshape(-1)[:n]
        limit = torch.where(flagged, _FLAGGED_E4M3_MAX if fmt.exp_bias == 7 else fmt.max_value, fmt.max_value)
        limit = limit.to(torch.float32).repeat_interleave(g)[:n]
    else:
        amax = xf.abs().amax() if n else xf.new_zeros(())
        flagged = ~finite.all()
        scale = _scale_from_amax(amax.reshape(1), fmt, flagged.reshape(1))
        q = xf / scale.abs()
        limit = torch.where(flagged, _FLAGGED_E4M3_MAX if fmt.exp_bias == 7 else fmt.max_value, fmt.max_value)
    q = torch.maximum(torch.minimum(q, limit), -limit)
    code = q.to(fmt.torch_dtype).view(torch.uint8)
    payload, scale = adopt(_special_codes(x32, code, fmt), scale)  # pooled when the engine lends memory
    return _packed(x, spec, payload, scale)


@torch.no_grad()
def decode_reference(packed: Packed) -> torch.Tensor:
    fmt = _FORMATS[packed.params["format"]]
    payload, scale = packed.tensors["payload"], packed.tensors["scale"]
    n = payload.numel()
    v = payload.view(fmt.torch_dtype).to(torch.float32)
    if packed.params["scaling"] == "group":
        g = packed.params["group_size"]
        groups = scale.numel()
        step = scale.abs().repeat_interleave(g)[:n]
        flagged = (scale < 0).repeat_interleave(g)[:n]
    else:
        step, flagged = scale.abs(), scale < 0
    if fmt.exp_bias == 7:  # S.1111.110 is +-Inf in a flagged e4m3 group
        inf = torch.where(payload >= 0x80, float("-inf"), float("inf"))
        v = torch.where(flagged & ((payload & 0x7F) == 0x7E), inf, v)
    v = v * step
    return _canonical_nan(v.to(packed.dtype)).reshape(packed.shape)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

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
    def _fp8_bits_to_fp32(b, flagged, EXP_BIAS: tl.constexpr, MANT_BITS: tl.constexpr, SUBNORMAL_UNIT: tl.constexpr):
        """fp8 bit pattern -> fp32 (exact), with the format's NaN/+-Inf codes (see the module docstring)."""
        b = b.to(tl.uint32)
        exp = (b >> MANT_BITS) & ((1 << (7 - MANT_BITS)) - 1)
        mant = b & ((1 << MANT_BITS) - 1)
        normal = (((exp + (127 - EXP_BIAS)) << 23) | (mant << (23 - MANT_BITS))).to(tl.float32, bitcast=True)
        mag = tl.where(exp == 0, mant.to(tl.float32) * SUBNORMAL_UNIT, normal)
        if EXP_BIAS == 7:
            mag = tl.where((b & 0x7F) == 0x7F, float("nan"), mag)
            mag = tl.where(flagged, tl.where((b & 0x7F) == 0x7E, float("inf"), mag), mag)
        else:
            mag = tl.where(exp == 31, tl.where(mant == 0, float("inf"), float("nan")), mag)
        return tl.where((b & 0x80) != 0, -mag, mag)

    @triton.jit
    def _special_codes_triton(x, code, EXP_BIAS: tl.constexpr):
        INF_CODE: tl.constexpr = 0x7E if EXP_BIAS == 7 else 0x7C
        special = tl.where(x != x, 0x7F, tl.where(x > 0, INF_CODE, 0x80 | INF_CODE)).to(tl.uint32)
        return tl.where(_is_finite(x), code, special)

    @triton.jit
    def _load_fp32(ptr, offsets, mask, IN_BF16: tl.constexpr):
        if IN_BF16:  # ptr is an int16 view: the interpreter's bf16 casts mangle subnormals
            return (tl.load(ptr + offsets, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _absmax_kernel(x_ptr, partial_ptr, flag_ptr, n, BLOCK: tl.constexpr, IN_BF16: tl.constexpr):
        """Tensor scaling, pass 1: per block, max |x| over the finite elements and whether any is not finite."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = _load_fp32(x_ptr, offs, mask, IN_BF16)
        finite = _is_finite(x)
        tl.store(partial_ptr + pid, tl.max(tl.abs(tl.where(finite, x, 0.0)), axis=0))
        tl.store(flag_ptr + pid, tl.max((mask & ~finite).to(tl.int32), axis=0))

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
        IN_BF16: tl.constexpr,
    ):
        """Scaled fp8 encode of a [ROWS, GROUP] tile of the flat input (see the module docstring).

        Group scaling: each row is one group; its scale (div_rn(amax, fmt_max), 1 if 0, negative
        when the e4m3 group holds NaN/Inf) is computed here and stored. Tensor scaling: the scale
        from _absmax_kernel's partials is loaded. q = div_rn(x, |scale|) is correctly rounded.
        """
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = offs < n
        x = _load_fp32(x_ptr, offs, mask, IN_BF16)
        finite = _is_finite(x)
        xf = tl.where(finite, x, 0.0)
        if GROUP_SCALING:
            flagged = tl.max((mask & ~finite).to(tl.int32), axis=1) != 0
            if EXP_BIAS == 7:
                limit = tl.where(flagged, 416.0, MAX_VALUE)
            else:
                limit = tl.zeros_like(tl.max(xf, axis=1)) + MAX_VALUE
            scale = tl.math.div_rn(tl.max(tl.abs(xf), axis=1), limit)
            scale = tl.where(scale == 0.0, 1.0, scale)
            if EXP_BIAS == 7:
                stored = tl.where(flagged, -scale, scale)
            else:
                stored = scale
            tl.store(scale_ptr + rows, stored, mask=rows < n_groups)
            q = tl.math.div_rn(xf, scale[:, None] + tl.zeros_like(xf))
            limit = limit[:, None]
        else:
            stored = tl.load(scale_ptr)
            q = tl.math.div_rn(xf, tl.abs(stored) + tl.zeros_like(xf))
            limit = tl.where(stored < 0, 416.0, MAX_VALUE)
        q = tl.minimum(tl.maximum(q, -limit), limit)
        code = _special_codes_triton(x, _fp32_to_fp8_bits(q, EXP_BIAS, MANT_BITS), EXP_BIAS)
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
        OUT_FP16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """out = fp32(payload) * |scale|, rounded to the output dtype (nearest even)."""
        pid = tl.program_id(0)
        if GROUP_SCALING:  # a [BLOCK // GROUP, GROUP] tile: one scale load per group
            rows = pid.to(tl.int64) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
            offs = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            mask = offs < n
            stored = tl.load(scale_ptr + rows, mask=rows * GROUP < n, other=1.0)[:, None]
        else:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            stored = tl.load(scale_ptr)
        b = tl.load(payload_ptr + offs, mask=mask, other=0)
        v = _fp8_bits_to_fp32(b, stored < 0, EXP_BIAS, MANT_BITS, SUBNORMAL_UNIT)
        out = v * tl.abs(stored)
        if OUT_BF16:
            # explicit round-half-even to bf16 (out_ptr is an int16 view): the interpreter's cast
            # truncates; NaN is written as the canonical 0x7FC0, inf survives the carry trick
            bits = out.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(out != out, 0x7FC0, bits)
            tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)
        elif OUT_FP16:
            nan16 = tl.full(out.shape, 0x7E00, tl.int16).to(tl.float16, bitcast=True)
            tl.store(out_ptr + offs, tl.where(out != out, nan16, out.to(tl.float16)), mask=mask)
        else:
            tl.store(out_ptr + offs, tl.where(out != out, float("nan"), out), mask=mask)


def _subnormal_unit(fmt: _Format) -> float:
    return 2.0 ** (1 - fmt.exp_bias - fmt.mant_bits)


def _kernel_input(flat: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (flat.view(torch.int16), True) if flat.dtype == torch.bfloat16 else (flat, False)


@torch.no_grad()
def encode_triton(x: torch.Tensor, spec: FP8Spec, *, seed: int = 0) -> Packed:
    """Triton encoder (CUDA, or CPU under TRITON_INTERPRET=1); same bits as encode_reference."""
    fmt = _check(x, spec)
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    source, in_bf16 = _kernel_input(flat)
    if spec.scaling == "group":
        g = spec.group_size
        n_groups = -(-n // g)
        payload, scale = empty_many([(n, torch.uint8), (n_groups, torch.float32)], x.device)
        rows, width = _TILE // g, g
    else:
        n_groups = 1
        blocks = max(1, -(-n // _TILE))
        partial = torch.zeros(blocks, dtype=torch.float32, device=x.device)
        flags = torch.zeros(blocks, dtype=torch.int32, device=x.device)
        if n:
            _absmax_kernel[(blocks,)](source, partial, flags, n, BLOCK=_TILE, IN_BF16=in_bf16, num_warps=_NUM_WARPS)
        payload, scale_slot = empty_many([(n, torch.uint8), (1, torch.float32)], x.device)
        scale = scale_slot.copy_(_scale_from_amax(partial.amax().reshape(1), fmt, (flags.amax() > 0).reshape(1)))
        rows, width = 1, _TILE
    if n:
        _encode_kernel[(-(-n // (rows * width)),)](
            source, payload, scale, n, n_groups,
            MAX_VALUE=fmt.max_value, EXP_BIAS=fmt.exp_bias, MANT_BITS=fmt.mant_bits,
            GROUP_SCALING=spec.scaling == "group", ROWS=rows, GROUP=width, IN_BF16=in_bf16,
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    return _packed(x, spec, payload, scale)


@torch.no_grad()
def decode_triton(packed: Packed) -> torch.Tensor:
    fmt = _FORMATS[packed.params["format"]]
    payload, scale = packed.tensors["payload"], packed.tensors["scale"]
    n = payload.numel()
    out = torch.empty(n, dtype=packed.dtype, device=payload.device)
    if n:
        bf16 = packed.dtype == torch.bfloat16
        _decode_kernel[(-(-n // _TILE),)](
            payload, scale, out.view(torch.int16) if bf16 else out, n,
            EXP_BIAS=fmt.exp_bias, MANT_BITS=fmt.mant_bits, SUBNORMAL_UNIT=_subnormal_unit(fmt),
            GROUP_SCALING=packed.params["scaling"] == "group",
            GROUP=packed.params["group_size"] if packed.params["scaling"] == "group" else 64,  # unused then
            OUT_BF16=bf16, OUT_FP16=packed.dtype == torch.float16, BLOCK=_TILE,
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    return out.reshape(packed.shape)


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def AOT_CONFIGS() -> list[dict]:
    """Every (kernel, constexpr) configuration the launchers above can pick (benchmarks/kernels.py)."""
    from .specs import FP8_FORMATS, FP8_SCALINGS

    configs = []
    for dtype, tname in _TRITON_DTYPES.items():
        pointer = "*i16" if dtype == torch.bfloat16 else f"*{tname}"
        configs.append(dict(
            kernel=_absmax_kernel, name=f"fp8_absmax[{tname}]",
            signature=dict(x_ptr=pointer, partial_ptr="*fp32", flag_ptr="*i32", n="i32", BLOCK="constexpr",
                           IN_BF16="constexpr"),
            constexprs=dict(BLOCK=_TILE, IN_BF16=dtype == torch.bfloat16), num_warps=_NUM_WARPS, divisible=("n",),
            pair=[f"fp8[{f},tensor,{tname}]" for f in FP8_FORMATS],
        ))  # fmt: skip
        for fmt_name in FP8_FORMATS:
            fmt = _FORMATS[fmt_name]
            for scaling in FP8_SCALINGS:
                groups = (32, 64, 128, 256) if scaling == "group" else (_TILE,)
                for g in groups:
                    label = f"{fmt_name},{scaling}" + (f",g={g}" if scaling == "group" else "")
                    pair = f"fp8[{label},{tname}]" if scaling == "group" else f"fp8[{fmt_name},tensor,{tname}]"
                    # Tensor scaling is two-pass by definition (the scale depends on every element):
                    # its minimum includes the amax pass's read of x.
                    minimum = 2 * (dtype.itemsize + 1 + (4 / g if scaling == "group" else 0))
                    minimum += dtype.itemsize if scaling == "tensor" else 0
                    configs.append(dict(
                        kernel=_encode_kernel, name=f"fp8_encode[{label},{tname}]",
                        signature=dict(x_ptr=pointer, payload_ptr="*u8", scale_ptr="*fp32", n="i32", n_groups="i32",
                                       MAX_VALUE="constexpr", EXP_BIAS="constexpr", MANT_BITS="constexpr",
                                       GROUP_SCALING="constexpr", ROWS="constexpr", GROUP="constexpr",
                                       IN_BF16="constexpr"),
                        constexprs=dict(MAX_VALUE=fmt.max_value, EXP_BIAS=fmt.exp_bias, MANT_BITS=fmt.mant_bits,
                                        GROUP_SCALING=scaling == "group", ROWS=_TILE // g, GROUP=g,
                                        IN_BF16=dtype == torch.bfloat16),
                        num_warps=_NUM_WARPS, divisible=("n", "n_groups"), elements=_TILE, pair=pair,
                        min_bytes_per_element=minimum,
                    ))  # fmt: skip
                    configs.append(dict(
                        kernel=_decode_kernel, name=f"fp8_decode[{label},{tname}]",
                        signature=dict(payload_ptr="*u8", scale_ptr="*fp32", out_ptr=pointer, n="i32",
                                       EXP_BIAS="constexpr", MANT_BITS="constexpr", SUBNORMAL_UNIT="constexpr",
                                       GROUP_SCALING="constexpr", GROUP="constexpr", OUT_BF16="constexpr",
                                       OUT_FP16="constexpr", BLOCK="constexpr"),
                        constexprs=dict(EXP_BIAS=fmt.exp_bias, MANT_BITS=fmt.mant_bits,
                                        SUBNORMAL_UNIT=_subnormal_unit(fmt), GROUP_SCALING=scaling == "group",
                                        GROUP=g if scaling == "group" else 64, OUT_BF16=dtype == torch.bfloat16,
                                        OUT_FP16=dtype == torch.float16, BLOCK=_TILE),
                        num_warps=_NUM_WARPS, divisible=("n",), elements=_TILE, pair=pair,
                    ))  # fmt: skip
    return configs


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
