"""Per-group asymmetric k-bit quantization (8, 4 or 2 bits) with nearest or stochastic rounding.

The math, identical in both backends and computed in fp32 (the layout follows the per-group
min/scale codecs of ActNN, Chen et al. 2021, "ActNN: Reducing Training Memory Footprint via
2-Bit Activation Compressed Training", and the 8-bit exponent-coded scales of Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization"):

* ``x`` is flattened and cut in groups of ``G = spec.group_size`` elements (the tail group may be
  partial). NaN/+-Inf go to a side channel (``nonfinite_index`` int64, ``nonfinite_value`` in the
  original dtype), are encoded as code 0 and put back on decode; the statistics use finite values.
* Per group: ``mn``/``mx`` = min/max of the finite values (0 when the group has none).
  ``mn_b`` = ``mn`` rounded *down* to bf16 (``minimum``, 2 bytes), so ``x - mn_b >= 0``.
* ``raw = (mx - mn_b) / qmax`` with ``qmax = 2**bits - 1``; ``g = max(raw)`` over the tensor
  (1 if 0) is ``reference_scale`` (fp32). Each group stores an 8-bit log-scale ``scale_code``:
  ``code = clamp(floor(-16 * log2(raw / g)), 0, 255)`` (255 when ``raw == 0``) and
  ``s = g * 2**(-code / 16)``; if ``s < raw`` (rounding) the code is lowered by one, so ``s >= raw``.
  24 bits of metadata per group instead of 64 for an fp32 min and scale.
* ``q = clamp(floor((x - mn_b) / s + u), 0, qmax)``, ``u = 0.5`` (nearest) or a counter-based
  uniform of ``(seed, flat index)`` (stochastic, unbiased: ``E[mn_b + q * s] = x``).
* ``payload`` (uint8, ``ceil(n * bits / 8)`` bytes): 8 bits one code per byte; 4 bits element
  ``2j`` in the low nibble and ``2j+1`` in the high one; 2 bits element ``4j+r`` at bits ``2r``.
* decode: ``x_hat = mn_b + q * s`` in fp32, cast to the original dtype (round to nearest even).

Both backends are bit-identical, on GPU too, because nothing in them is approximate:
``floor(-16 * log2(r))`` is evaluated exactly from the exponent bits of ``r`` plus a comparison of its
mantissa with the 16 fp32 thresholds ``2**(k/16)``; ``2**(-code/16)`` is a 256-entry fp32 table
shared by both backends; divisions are IEEE (``div_rn``); mul+add fusion is off in the kernels.
Limitation: a group whose finite range ``mx - mn`` overflows fp32 (|values| near 1.7e38) is not
representable and decodes to inf/nan.
"""

from __future__ import annotations

import functools
import math

import torch

from ._backend import pick, triton_available
from ._packed import Packed, check_float_input
from ._rng import seed_keys, uniform_reference
from .specs import QuantSpec

CODEC = "quant"
_SMALLEST_NORMAL_FP32 = 1.1754943508222875e-38
# Kernel tiles hold about this many elements (GROUPS_PER_PROGRAM x group_size).
_TILE_ELEMENTS = 4096
_RNG_CHUNK = 1 << 16


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(16 thresholds fl32(2**(k/16)), 256 steps fl32(2**(-c/16))) on ``device``.

    Computed once on the host in float64 and rounded to fp32, so every backend reads the same bits.
    """
    thresholds = torch.tensor([2.0 ** (k / 16) for k in range(16)], dtype=torch.float64)
    steps = torch.tensor([2.0 ** (-c / 16) for c in range(256)], dtype=torch.float64)
    return thresholds.to(torch.float32).to(device), steps.to(torch.float32).to(device)


def _check_arguments(x: torch.Tensor, spec: QuantSpec, seed: int) -> None:
    check_float_input(x, CODEC)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{CODEC}: spec must be a QuantSpec, got {type(spec).__name__}")
    seed_keys(seed)  # validates the seed (a non-negative int) for both roundings


def _check_packed(packed: Packed) -> None:
    if not isinstance(packed, Packed) or packed.codec != CODEC:
        got = packed.codec if isinstance(packed, Packed) else type(packed).__name__
        raise ValueError(f"{CODEC}.decode: expected a Packed with codec='quant', got {got!r}")


def _empty_packed(x: torch.Tensor, spec: QuantSpec) -> Packed:
    dev = x.device
    return _make_packed(
        x,
        spec,
        payload=torch.empty(0, dtype=torch.uint8, device=dev),
        minimum=torch.empty(0, dtype=torch.bfloat16, device=dev),
        scale_code=torch.empty(0, dtype=torch.uint8, device=dev),
        reference_scale=torch.empty(0, dtype=torch.float32, device=dev),
        nonfinite_index=torch.empty(0, dtype=torch.int64, device=dev),
        nonfinite_value=torch.empty(0, dtype=x.dtype, device=dev),
    )


def _make_packed(x, spec, *, payload, minimum, scale_code, reference_scale, nonfinite_index, nonfinite_value):
    return Packed(
        codec=CODEC,
        shape=x.shape,
        dtype=x.dtype,
        bits=spec.bits,
        tensors={
            "payload": payload,
            "minimum": minimum,
            "scale_code": scale_code,
            "reference_scale": reference_scale,
            "nonfinite_index": nonfinite_index,
            "nonfinite_value": nonfinite_value,
        },
        params={"group_size": spec.group_size, "rounding": spec.rounding},
    )


def _nonfinite_side_channel(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = (~torch.isfinite(flat)).nonzero().view(-1)
    return index, flat[index]


def _restore_nonfinite(out: torch.Tensor, packed: Packed) -> torch.Tensor:
    index = packed.tensors["nonfinite_index"]
    if index.numel():
        out[index] = packed.tensors["nonfinite_value"]
    return out


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def _round_down_to_bf16(v: torch.Tensor) -> torch.Tensor:
    """Largest bf16 value <= v (fp32 in, fp32 out with the low 16 bits clear), exact via the bits."""
    b = v.view(torch.int32)
    t = b & -65536
    # For a negative value, dropping mantissa bits rounds toward zero, i.e. up: step one bf16 ulp down.
    t = t + ((v < 0) & ((b & 0xFFFF) != 0)).to(torch.int32) * 65536
    return t.view(torch.float32)


def _scale_codes_reference(raw: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(code int32, step s fp32) per group; see the module docstring."""
    thresholds, steps = _tables(raw.device)
    r = raw / g
    b = r.view(torch.int32)
    exponent = ((b >> 23) & 0xFF) - 127
    mantissa = ((b & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # r = mantissa * 2**exponent
    # floor(-16 log2 r) = -16 e - ceil(16 log2 m), and ceil(16 log2 m) = #{k < 16: m > 2**(k/16)}.
    ceil16 = torch.searchsorted(thresholds, mantissa).to(torch.int32)  # #{k: thresholds[k] < m}
    code = -16 * exponent - ceil16
    code = torch.where(r >= _SMALLEST_NORMAL_FP32, code, 255).clamp_(0, 255)
    s = g * steps[code]
    code = code - ((s < raw) & (code > 0)).to(torch.int32)
    s = g * steps[code]
    return code, s


def _add_uniforms_(y: torch.Tensor, seed: int) -> None:
    """``y += uniform_reference(seed, 0..len(y)-1)`` in place, in cache-sized chunks on CPU.

    The hash runs ~30 int64 passes; chunking keeps them in cache (about 10x faster for 4M elements).
    """
    count = y.numel()
    chunk = _RNG_CHUNK if y.device.type == "cpu" else max(count, 1)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        y[start:stop] += uniform_reference(seed, torch.arange(start, stop, dtype=torch.int64, device=y.device))


def _pack_codes(q: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """fp32 integer codes (length a multiple of 8 // bits, >= n) -> ceil(n * bits / 8) uint8 bytes.

    The byte is formed in fp32 (sums of codes times powers of two below 256 are exact), so only
    one value per byte is converted to uint8.
    """
    per = 8 // bits
    num_bytes = -(-n // per)
    q = q[: num_bytes * per].view(num_bytes, per)
    packed = q[:, 0].clone()
    for r in range(1, per):
        packed.add_(q[:, r], alpha=1 << (r * bits))
    return packed.to(torch.uint8)


def _unpack_codes(payload: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return payload
    mask = (1 << bits) - 1
    return torch.stack([(payload >> (r * bits)) & mask for r in range(per)], dim=1).view(-1)


@torch.no_grad()  # a pack must not keep an autograd graph (and x) alive
def encode_reference(x: torch.Tensor, spec: QuantSpec, *, seed: int = 0) -> Packed:
    """Quantize ``x`` with pure PyTorch ops (vectorized over groups; no Python loop over data)."""
    _check_arguments(x, spec, seed)
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return _empty_packed(x, spec)
    group, bits = spec.group_size, spec.bits
    qmax = (1 << bits) - 1
    num_groups = -(-n // group)
    pad = num_groups * group - n
    dev = x.device

    xf = flat.to(torch.float32)
    # Fast path (no NaN/Inf): pad with a copy of the last element, which is already in the last
    # group's stats; amin/amax propagate NaN/Inf, so non-finite input shows up in mn/mx.
    xg = (torch.cat([xf, xf[-1:].expand(pad)]) if pad else xf).view(num_groups, group)
    mn, mx = xg.amin(1), xg.amax(1)  # 5x faster than aminmax(dim=1) on CPU for short rows
    valid = None
    if bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
        nonfinite_index = torch.empty(0, dtype=torch.int64, device=dev)
        nonfinite_value = flat[:0].clone()
    else:
        finite = torch.isfinite(xf)
        nonfinite_index = (~finite).nonzero().view(-1)
        nonfinite_value = flat[nonfinite_index]
        xg = torch.cat([xf, xf.new_zeros(pad)]).view(num_groups, group)
        valid = torch.cat([finite, finite.new_zeros(pad)]).view(num_groups, group)
        mn = xg.masked_fill(~valid, math.inf).amin(1)
        mx = xg.masked_fill(~valid, -math.inf).amax(1)
        has_finite = valid.any(1)
        mn = torch.where(has_finite, mn, 0.0)
        mx = torch.where(has_finite, mx, 0.0)

    mn_b = _round_down_to_bf16(mn)
    # Divide by a tensor: a Python-scalar divisor becomes a reciprocal multiply on CUDA.
    raw = (mx - mn_b) / torch.full((), float(qmax), device=dev)
    g = raw.amax()
    g = torch.where(g == 0, 1.0, g)
    code, s = _scale_codes_reference(raw, g)

    if valid is not None:
        xg = torch.where(valid, xg, mn_b[:, None])  # keep NaN/Inf out of the arithmetic
    s_div = torch.where(s > 0, s, 1.0)  # s underflows to 0 only for subnormal ranges
    # In place after the first op: fresh multi-MB buffers cost page faults on CPU.
    y = torch.sub(xg, mn_b[:, None]).div_(s_div[:, None])
    if spec.rounding == "stochastic":
        _add_uniforms_(y.view(-1), seed)
    else:
        y.add_(0.5)
    q = y.floor_().clamp_(0, qmax)
    if valid is not None:
        q.masked_fill_(~valid, 0)
    q = q.view(-1)
    if pad:
        q[n:] = 0
    payload = _pack_codes(q, bits, n)

    return _make_packed(
        x,
        spec,
        payload=payload,
        minimum=mn_b.to(torch.bfloat16),
        scale_code=code.to(torch.uint8),
        reference_scale=g.reshape(1),
        nonfinite_index=nonfinite_index,
        nonfinite_value=nonfinite_value,
    )


@torch.no_grad()
def decode_reference(packed: Packed) -> torch.Tensor:
    """Rebuild the tensor with pure PyTorch ops."""
    _check_packed(packed)
    n = packed.numel
    t = packed.tensors
    if n == 0:
        return torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
    group, bits = packed.params["group_size"], packed.bits
    num_groups = -(-n // group)
    _, steps = _tables(packed.device)
    s = t["reference_scale"] * steps[t["scale_code"].to(torch.int64)]
    mn_b = t["minimum"].to(torch.float32)
    q = torch.empty(num_groups * group, dtype=torch.float32, device=packed.device)
    q[:n] = _unpack_codes(t["payload"], bits)[:n]
    q[n:] = 0
    # mul then add, two roundings like the kernel (fp fusion is off there).
    x_hat = q.view(num_groups, group).mul_(s[:, None]).add_(mn_b[:, None]).view(-1)[:n]
    out = _restore_nonfinite(x_hat.to(packed.dtype), packed)
    return out.view(packed.shape)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._rng import uniform_triton
    from ._settings import calculate_settings

    @triton.jit
    def _round_down_to_bf16_triton(v):
        b = v.to(tl.int32, bitcast=True)
        t = b & -65536
        t = tl.where((v < 0) & ((b & 0xFFFF) != 0), t + 65536, t)
        return t.to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_bits_to_fp32(bits):
        """int16 bf16 bits -> fp32. By hand: the interpreter's bf16 casts mangle subnormals."""
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_fp32(ptr, offsets, mask, IN_BF16: tl.constexpr):
        if IN_BF16:  # ptr is an int16 view of the bf16 tensor
            return _bf16_bits_to_fp32(tl.load(ptr + offsets, mask=mask, other=0))
        return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _step_triton(raw, g, thresholds_ptr, steps_ptr):
        """(code, s) per group, exactly as ``_scale_codes_reference``."""
        r = tl.math.div_rn(raw, g + tl.zeros_like(raw))
        b = r.to(tl.int32, bitcast=True)
        exponent = ((b >> 23) & 0xFF) - 127
        mantissa = ((b & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
        thresholds = tl.load(thresholds_ptr + tl.arange(0, 16))
        ceil16 = tl.sum((mantissa[:, None] > thresholds[None, :]).to(tl.int32), axis=1)
        code = -16 * exponent - ceil16
        code = tl.where(r >= 1.1754943508222875e-38, code, 255)
        code = tl.minimum(tl.maximum(code, 0), 255)
        s = g * tl.load(steps_ptr + code)
        code = tl.where((s < raw) & (code > 0), code - 1, code)
        s = g * tl.load(steps_ptr + code)
        return code, s

    @triton.jit
    def _stats_kernel(
        x_ptr,
        minimum_ptr,
        raw_ptr,
        n,
        num_groups,
        QMAX: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_PROGRAM: tl.constexpr,
        IN_BF16: tl.constexpr,
    ):
        """Per group: finite min rounded down to bf16 (-> ``minimum``) and ``(max - min_b) / qmax``.

        ``minimum_ptr`` is an int16 view: the bf16 bits are the high half of ``mn_b``'s.
        """
        groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        offsets = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        in_range = offsets < n
        x = _load_fp32(x_ptr, offsets, in_range, IN_BF16)
        valid = in_range & (tl.abs(x) < float("inf"))  # false for NaN too
        mn = tl.min(tl.where(valid, x, float("inf")), axis=1)
        mx = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        has_finite = tl.max(valid.to(tl.int32), axis=1) > 0
        mn = tl.where(has_finite, mn, 0.0)
        mx = tl.where(has_finite, mx, 0.0)
        mn_b = _round_down_to_bf16_triton(mn)
        diff = mx - mn_b
        raw = tl.math.div_rn(diff, tl.full(diff.shape, QMAX, tl.float32))
        keep = groups < num_groups
        tl.store(minimum_ptr + groups, (mn_b.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=keep)
        tl.store(raw_ptr + groups, raw, mask=keep)

    @triton.jit
    def _encode_kernel(
        x_ptr,
        minimum_ptr,
        raw_ptr,
        g_ptr,
        thresholds_ptr,
        steps_ptr,
        payload_ptr,
        code_ptr,
        n,
        num_groups,
        num_bytes,
        k1,
        k2,
        BITS: tl.constexpr,
        PER_BYTE: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_PROGRAM: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        IN_BF16: tl.constexpr,
    ):
        """Scale code per group, then ``q = clamp(floor((x - mn_b) / s + u), 0, qmax)`` bit-packed.

        The tile is [groups, bytes per group, codes per byte] so packing is a sum over the last axis.
        """
        QMAX: tl.constexpr = (1 << BITS) - 1
        BYTES_PER_GROUP: tl.constexpr = GROUP // PER_BYTE
        groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        keep = groups < num_groups
        mn_b = _bf16_bits_to_fp32(tl.load(minimum_ptr + groups, mask=keep, other=0))
        raw = tl.load(raw_ptr + groups, mask=keep, other=0.0)
        g = tl.load(g_ptr)
        code, s = _step_triton(raw, g, thresholds_ptr, steps_ptr)
        tl.store(code_ptr + groups, code.to(tl.uint8), mask=keep)
        s = tl.where(s > 0, s, 1.0)

        byte_in_group = tl.arange(0, BYTES_PER_GROUP)
        slot = tl.arange(0, PER_BYTE)
        offsets = (
            groups[:, None, None] * GROUP + byte_in_group[None, :, None] * PER_BYTE + slot[None, None, :]
        )
        in_range = offsets < n
        x = _load_fp32(x_ptr, offsets, in_range, IN_BF16)
        valid = in_range & (tl.abs(x) < float("inf"))
        mn_b3 = mn_b[:, None, None]
        x = tl.where(valid, x, mn_b3)  # keep NaN/Inf out of the arithmetic
        if STOCHASTIC:
            u = uniform_triton(k1, k2, offsets)
        else:
            u = 0.5
        y = tl.math.div_rn(x - mn_b3, s[:, None, None] + tl.zeros_like(x)) + u
        q = tl.minimum(tl.maximum(tl.floor(y), 0.0), QMAX)
        q = tl.where(valid, q, 0.0).to(tl.int32)
        packed = tl.sum(q << (slot[None, None, :] * BITS), axis=2)  # disjoint bit fields: sum == or
        byte_offsets = groups[:, None] * BYTES_PER_GROUP + byte_in_group[None, :]
        tl.store(payload_ptr + byte_offsets, packed.to(tl.uint8), mask=byte_offsets < num_bytes)

    @triton.jit
    def _decode_kernel(
        payload_ptr,
        minimum_ptr,
        code_ptr,
        g_ptr,
        steps_ptr,
        out_ptr,
        n,
        num_groups,
        BITS: tl.constexpr,
        PER_BYTE: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_PROGRAM: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        """``x_hat = mn_b + q * s`` (fp32), written in the output dtype with round-to-nearest-even.

        bf16 is handled by hand on the bits (int16 views of ``minimum`` and of a bf16 ``out``): the
        Triton interpreter truncates fp32 -> bf16 casts and mangles subnormals, while GPUs and torch
        round to nearest even.
        """
        QMAX: tl.constexpr = (1 << BITS) - 1
        groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        keep = groups < num_groups
        mn_b = _bf16_bits_to_fp32(tl.load(minimum_ptr + groups, mask=keep, other=0))
        code = tl.load(code_ptr + groups, mask=keep, other=0).to(tl.int32)
        s = tl.load(g_ptr) * tl.load(steps_ptr + code)
        offsets = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        in_range = offsets < n
        byte = tl.load(payload_ptr + offsets // PER_BYTE, mask=in_range, other=0).to(tl.int32)
        q = (byte >> ((offsets % PER_BYTE).to(tl.int32) * BITS)) & QMAX
        x_hat = mn_b[:, None] + q.to(tl.float32) * s[:, None]
        if OUT_BF16:
            b = x_hat.to(tl.uint32, bitcast=True)
            rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(out_ptr + offsets, rounded.to(tl.int16), mask=in_range)
        else:
            tl.store(out_ptr + offsets, x_hat.to(out_ptr.dtype.element_ty), mask=in_range)

    def _launch_shape(num_groups: int, group: int) -> tuple[int, int, tuple[int]]:
        groups_per_program = max(1, min(triton.next_power_of_2(num_groups), _TILE_ELEMENTS // group))
        _, num_warps = calculate_settings(groups_per_program * group)
        return groups_per_program, num_warps, (triton.cdiv(num_groups, groups_per_program),)


@torch.no_grad()
def encode_triton(x: torch.Tensor, spec: QuantSpec, *, seed: int = 0) -> Packed:
    """Quantize ``x`` with the Triton kernels (stats, then quantize + pack); torch reduces ``g``."""
    _check_arguments(x, spec, seed)
    if not triton_available():
        raise RuntimeError(f"{CODEC}.encode_triton needs triton, which is not installed")
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    if n == 0:
        return _empty_packed(x, spec)
    group, bits = spec.group_size, spec.bits
    qmax = (1 << bits) - 1
    per_byte = 8 // bits
    num_groups = -(-n // group)
    num_bytes = -(-n // per_byte)
    dev = x.device
    groups_per_program, num_warps, grid = _launch_shape(num_groups, group)

    nonfinite_index, nonfinite_value = _nonfinite_side_channel(flat)
    minimum = torch.empty(num_groups, dtype=torch.bfloat16, device=dev)
    raw = torch.empty(num_groups, dtype=torch.float32, device=dev)
    in_bf16 = x.dtype == torch.bfloat16
    x_arg = flat.view(torch.int16) if in_bf16 else flat
    _stats_kernel[grid](
        x_arg, minimum.view(torch.int16), raw, n, num_groups,
        QMAX=qmax, GROUP=group, GROUPS_PER_PROGRAM=groups_per_program, IN_BF16=in_bf16,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    g = raw.amax()
    g = torch.where(g == 0, 1.0, g).reshape(1)  # stays on the device: no host sync

    thresholds, steps = _tables(dev)
    payload = torch.empty(num_bytes, dtype=torch.uint8, device=dev)
    scale_code = torch.empty(num_groups, dtype=torch.uint8, device=dev)
    k1, k2 = seed_keys(seed)
    _encode_kernel[grid](
        x_arg, minimum.view(torch.int16), raw, g, thresholds, steps, payload, scale_code,
        n, num_groups, num_bytes, k1, k2,
        BITS=bits, PER_BYTE=per_byte, GROUP=group, GROUPS_PER_PROGRAM=groups_per_program,
        STOCHASTIC=spec.rounding == "stochastic", IN_BF16=in_bf16,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return _make_packed(
        x,
        spec,
        payload=payload,
        minimum=minimum,
        scale_code=scale_code,
        reference_scale=g,
        nonfinite_index=nonfinite_index,
        nonfinite_value=nonfinite_value,
    )


@torch.no_grad()
def decode_triton(packed: Packed) -> torch.Tensor:
    """Rebuild the tensor with the Triton decode kernel; NaN/Inf are put back with torch."""
    _check_packed(packed)
    if not triton_available():
        raise RuntimeError(f"{CODEC}.decode_triton needs triton, which is not installed")
    n = packed.numel
    dev = packed.device
    if n == 0:
        return torch.empty(packed.shape, dtype=packed.dtype, device=dev)
    t = packed.tensors
    group, bits = packed.params["group_size"], packed.bits
    num_groups = -(-n // group)
    groups_per_program, num_warps, grid = _launch_shape(num_groups, group)
    _, steps = _tables(dev)
    out = torch.empty(n, dtype=packed.dtype, device=dev)
    out_bf16 = packed.dtype == torch.bfloat16
    _decode_kernel[grid](
        t["payload"], t["minimum"].view(torch.int16), t["scale_code"], t["reference_scale"], steps,
        out.view(torch.int16) if out_bf16 else out,
        n, num_groups,
        BITS=bits, PER_BYTE=8 // bits, GROUP=group, GROUPS_PER_PROGRAM=groups_per_program,
        OUT_BF16=out_bf16,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return _restore_nonfinite(out, packed).view(packed.shape)


@torch.no_grad()
def encode(x: torch.Tensor, spec: QuantSpec, *, seed: int = 0, backend: str | None = None) -> Packed:
    """Quantize ``x`` per group to ``spec.bits`` bits; Triton on CUDA, the reference elsewhere."""
    check_float_input(x, CODEC)
    return pick(x.device, backend, encode_triton, encode_reference)(x, spec, seed=seed)


@torch.no_grad()
def decode(packed: Packed, *, backend: str | None = None) -> torch.Tensor:
    """Rebuild a tensor of the original shape, dtype and device (contiguous) from ``packed``."""
    _check_packed(packed)
    return pick(packed.device, backend, decode_triton, decode_reference)(packed)
