"""Per-group asymmetric k-bit quantization (8, 4 or 2 bits) with nearest or stochastic rounding.

One pass each way: encode reads the input once (every group's metadata comes from the group
itself, no tensor-wide reduction, no host sync) and decode reads the pack once. The layout follows
the per-group min/scale codecs of ActNN (Chen et al. 2021, "ActNN: Reducing Training Memory
Footprint via 2-Bit Activation Compressed Training"); the absolute 16-bit per-group scale replaces a
scale coded against a tensor-wide reference, as the OCP microscaling formats (MX, 2023) keep each
block's scale self-contained. All arithmetic is fp32 and identical in both backends:

* ``x`` is flattened and cut in groups of ``G = spec.group_size`` elements (the tail group may be
  partial). ``qmax = 2**bits - 1``.
* Per group: ``mn``/``mx`` = min/max of its finite values (0 when it has none); ``mn_b`` = ``mn``
  rounded *down* to bf16 (``minimum``, 2 bytes), so ``x - mn_b >= 0``.
* ``levels = qmax`` (``qmax - 3`` when the group holds NaN/Inf, see below);
  ``raw = (mx - mn_b) / max(levels, 1)`` (IEEE division); the step ``s`` = ``raw`` rounded *up* to
  bf16, at least 2**-126 (the smallest normal fp32, so no step is subnormal). ``scale`` stores ``s``
  as bf16 (2 bytes) whose sign bit is the group's non-finite flag: ``scale < 0`` means the group
  holds NaN/Inf and the step is ``-scale``. ``s >= raw`` within one bf16 ulp (< 0.8%).
* finite ``x``: ``q = clamp(floor((x - mn_b) / s + u), 0, levels)``, ``u = 0.5`` (nearest) or a
  counter-based uniform of ``(seed, flat index)`` (stochastic, unbiased: ``E[mn_b + q * s] = x``).
* NaN / +Inf / -Inf are kept exactly with reserved codes, inside the same pass: in a flagged group
  codes ``qmax``, ``qmax - 1``, ``qmax - 2`` mean NaN, +Inf, -Inf and its finite values get the
  ``qmax - 2`` codes below (253 at 8 bits, 13 at 4 bits, 1 at 2 bits: there they decode to the
  group minimum). Such a group is a step AMP's GradScaler skips; only the non-finite values must
  survive, and they do, exactly (NaN as the canonical NaN).
* ``payload`` (uint8, ``ceil(n * bits / 8)`` bytes): 8 bits one code per byte; 4 bits element
  ``2j`` in the low nibble and ``2j+1`` in the high one; 2 bits element ``4j+r`` at bits ``2r``.
* decode: ``x_hat = mn_b + q * s`` in fp32 (a multiply then an add, two roundings), cast to the
  original dtype (round to nearest even); reserved codes of a flagged group decode to NaN/+-Inf.

Bytes kept: ``ceil(n * bits / 8) + 4 * ceil(n / G)`` (``packed_nbytes``): 32 bits of metadata per
group. Against bf16 with G = 64: 0.53125 (8 bits), 0.28125 (4), 0.15625 (2).

Both backends are bit-identical, on GPU too, because nothing in them is approximate: roundings to
bf16 are done on the bits, divisions are IEEE (``div_rn``), mul+add fusion is off in the kernels.
Limitation: a group whose finite range ``mx - mn`` overflows fp32 (|values| near 1.7e38) is not
representable and decodes to inf/nan.
"""

from __future__ import annotations

import sys

import torch

from ._backend import pick, triton_available
from ._packed import Packed, check_float_input
from ._pool import empty_many
from ._rng import seed_keys, uniform_chunks
from ._settings import NUM_WARPS, TILE_ELEMENTS
from .specs import QuantSpec

CODEC = "quant"
# Kernel tiles hold TILE_ELEMENTS elements (GROUPS_PER_PROGRAM x group_size); see _settings.
_TILE_ELEMENTS = TILE_ELEMENTS
_NUM_WARPS = NUM_WARPS
# On CPU a host read costs no device sync, so the reference branches on the data there (a tensor
# without NaN/Inf skips the non-finite bookkeeping). The sync-counting tests turn this off to
# check the branch-free path, which is what the reference runs on CUDA (where a read is a sync).
_BRANCH_ON_CPU_DATA = True
_CPU_CHUNK_ELEMENTS = 1 << 16  # the smallest CPU chunk (256 KB of fp32): see _groups_per_chunk
_CPU_CHUNK_MAX_ELEMENTS = 1 << 20  # the largest (4 MB of fp32)
# Decoded NaN is always the canonical quiet NaN of the output dtype (as an integer of its width).
_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}
_SMALLEST_NORMAL_BITS = 0x00800000  # 2**-126 as fp32 bits


def packed_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Exactly the bytes ``encode`` keeps for ``numel`` elements (payload + 4 bytes per group)."""
    groups = -(-numel // group_size)
    return -(-numel * bits // 8) + 4 * groups


def _check_arguments(x: torch.Tensor, spec: QuantSpec, seed: int) -> None:
    check_float_input(x, CODEC)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{CODEC}: spec must be a QuantSpec, got {type(spec).__name__}")
    seed_keys(seed)  # validates the seed (a non-negative int) for both roundings


def _check_packed(packed: Packed) -> None:
    if not isinstance(packed, Packed) or packed.codec != CODEC:
        got = packed.codec if isinstance(packed, Packed) else type(packed).__name__
        raise ValueError(f"{CODEC}.decode: expected a Packed with codec='quant', got {got!r}")


def _make_packed(x, spec, *, payload, minimum, scale) -> Packed:
    return Packed(
        codec=CODEC,
        shape=x.shape,
        dtype=x.dtype,
        bits=spec.bits,
        tensors={"payload": payload, "minimum": minimum, "scale": scale},
        params={"group_size": spec.group_size, "rounding": spec.rounding},
    )


def _empty_packed(x: torch.Tensor, spec: QuantSpec) -> Packed:
    dev = x.device
    return _make_packed(
        x,
        spec,
        payload=torch.empty(0, dtype=torch.uint8, device=dev),
        minimum=torch.empty(0, dtype=torch.bfloat16, device=dev),
        scale=torch.empty(0, dtype=torch.bfloat16, device=dev),
    )


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


def _step_bits_reference(raw: torch.Tensor) -> torch.Tensor:
    """fp32 bits (int32) of the step: ``raw >= 0`` rounded up to bf16, at least 2**-126."""
    b = (raw.view(torch.int32) + 0xFFFF) & -65536
    return torch.clamp_min(b, _SMALLEST_NORMAL_BITS)


def _add_uniforms_(y: torch.Tensor, seed: int, offset: int = 0) -> None:
    """``y += uniform_reference(seed, offset + 0..len(y)-1)`` in place (``_rng.uniform_chunks``)."""
    for start, stop, u in uniform_chunks(seed, offset, y.numel(), y.device):
        y[start:stop] += u


def _groups_per_chunk(num_groups: int, group: int, device: torch.device) -> int:
    """How many groups the reference codecs process at once. On CPU the work runs in chunks of a
    quarter of the tensor, between ``_CPU_CHUNK_ELEMENTS`` and ``_CPU_CHUNK_MAX_ELEMENTS``
    elements: the temporaries of a chunk (up to about 10 bytes per element of the chunk, so about
    2.5 bytes per element of the tensor, and at most 10 MB) stay near or below the tensor's own
    size, so encoding does not raise the memory peak it is there to lower much, while a
    chunk stays large enough that the per-op cost of eager PyTorch (and of splitting the work
    between threads) does not dominate (64K-element chunks made a 4-bit encode about 2x slower
    than 256K-element ones). Groups are independent: the bits are the same for any chunking."""
    if device.type != "cpu":
        return max(num_groups, 1)
    elements = min(max(num_groups * group // 4, _CPU_CHUNK_ELEMENTS), _CPU_CHUNK_MAX_ELEMENTS)
    return max(elements // group, 1)


def _pack_codes(q: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """fp32 integer codes (length a multiple of 8 // bits, >= n) -> ceil(n * bits / 8) uint8 bytes.

    The byte is formed in fp32 (sums of codes times powers of two below 256 are exact), so only
    one value per byte is converted, through int32 (exact; on CPU two conversions cost less than
    fp32 -> uint8 directly).
    """
    per = 8 // bits
    num_bytes = -(-n // per)
    q = q[: num_bytes * per].view(num_bytes, per)
    if per == 1:
        return q[:, 0].to(torch.int32).to(torch.uint8)
    packed = torch.add(q[:, 0], q[:, 1], alpha=1 << bits)
    for r in range(2, per):
        packed.add_(q[:, r], alpha=1 << (r * bits))
    return packed.to(torch.int32).to(torch.uint8)


def _unpack_codes(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes -> one uint8 code per element (``8 // bits`` per byte, the lowest bits first)."""
    if bits == 8:
        return payload
    if sys.byteorder != "little":
        mask = (1 << bits) - 1
        return torch.stack([(payload >> (r * bits)) & mask for r in range(8 // bits)], dim=1).view(-1)
    # Split every byte's two halves into two bytes through an int16 (little-endian: the low half
    # becomes the first byte): v = x + (256 - 2**w) * (x >> w) holds x's low w bits in its low byte
    # and the rest in its high byte. Contiguous ops only: interleaving with stack costs several
    # times more on CPU. 2-bit codes take two splits (nibbles, then their 2-bit halves).
    codes, width = payload, 4
    while width >= bits:
        wide = codes.to(torch.int16)
        codes = torch.add(wide, wide >> width, alpha=256 - (1 << width)).view(torch.uint8)
        width //= 2
    return codes


@torch.no_grad()  # a pack must not keep an autograd graph (and x) alive
def encode_reference(x: torch.Tensor, spec: QuantSpec, *, seed: int = 0) -> Packed:
    """Quantize ``x`` with pure PyTorch ops (vectorized over groups, in cache-sized chunks of groups
    on CPU; no Python loop over elements). Off CPU it makes no host sync (the same work whether or
    not ``x`` holds NaN/Inf); on CPU, where a host read is free, a tensor without NaN/Inf takes a
    shorter path to the same bits."""
    _check_arguments(x, spec, seed)
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return _empty_packed(x, spec)
    group, bits = spec.group_size, spec.bits
    num_groups = -(-n // group)
    dev = flat.device
    payload, minimum, scale = empty_many(
        [(-(-n * bits // 8), torch.uint8), (num_groups, torch.bfloat16), (num_groups, torch.int16)], dev)
    if not (_BRANCH_ON_CPU_DATA and dev.type == "cpu" and _encode_finite(flat, spec, seed, payload, minimum, scale)):
        for g0, g1, start, stop in _chunks(num_groups, group, n, dev):
            # group * bits is a multiple of 8 (group >= 32): every chunk starts on a byte
            payload[start * bits // 8: -(-stop * bits // 8)], minimum[g0:g1], scale[g0:g1] = _encode_groups(
                flat[start:stop], g1 - g0, spec, seed, start)
    return _make_packed(x, spec, payload=payload, minimum=minimum, scale=scale.view(torch.bfloat16))


def _chunks(num_groups: int, group: int, n: int, device: torch.device):
    """``(g0, g1, start, stop)``: the group range and element range of each reference chunk."""
    chunk = _groups_per_chunk(num_groups, group, device)
    for g0 in range(0, num_groups, chunk):
        g1 = min(g0 + chunk, num_groups)
        yield g0, g1, g0 * group, min(g1 * group, n)


def _padded_groups(xs: torch.Tensor, num_groups: int, group: int) -> torch.Tensor:
    """The flat elements ``xs`` of ``num_groups`` whole groups as ``(num_groups, group)``; a partial
    last group is padded with a copy of its last element, which is already in that group, so the
    group's min, max and non-finite flag do not change (callers zero the padded codes)."""
    pad = num_groups * group - xs.numel()
    if pad:
        xs = torch.cat([xs, xs[-1:].expand(pad)])
    return xs.view(num_groups, group)


def _encode_finite(flat: torch.Tensor, spec: QuantSpec, seed: int, payload: torch.Tensor, minimum: torch.Tensor,
                   scale: torch.Tensor) -> bool:
    """The CPU path for a tensor without NaN/Inf: writes the pack and returns True, or returns False
    (nothing written) when ``flat`` holds NaN/Inf or a group's range overflows fp32. Same bits as
    ``_encode_groups`` (there every group has ``levels = qmax`` and no reserved codes); the group
    metadata is computed once for the whole tensor and only the codes run in chunks."""
    group, bits = spec.group_size, spec.bits
    qmax = (1 << bits) - 1
    n = flat.numel()
    num_groups = -(-n // group)
    chunks = list(_chunks(num_groups, group, n, flat.device))
    # Pass 1: each group's min and max (they propagate NaN and Inf). amin and amax of fp32 rows are
    # several times faster on CPU than aminmax or reductions in bf16.
    mn = torch.empty(num_groups, dtype=torch.float32, device=flat.device)
    mx = torch.empty_like(mn)
    for g0, g1, start, stop in chunks:
        xg = _padded_groups(flat[start:stop], g1 - g0, group).to(torch.float32)
        torch.amin(xg, 1, out=mn[g0:g1])
        torch.amax(xg, 1, out=mx[g0:g1])
    mn_b = _round_down_to_bf16(mn)
    span = mx - mn_b
    if not bool(torch.isfinite(span).all()):
        return False
    step_bits = _step_bits_reference(span / torch.full_like(mx, float(qmax)))
    s = step_bits.view(torch.float32)
    minimum.copy_(mn_b)  # mn_b is a bf16 value: the conversion is exact
    scale.copy_(step_bits >> 16)
    # Pass 2: the codes. x - mn_b in fp32 (a bf16/fp16 x is promoted exactly), then in place:
    # fresh buffers cost page faults on CPU.
    for g0, g1, start, stop in chunks:
        y = torch.sub(_padded_groups(flat[start:stop], g1 - g0, group), mn_b[g0:g1, None]).div_(s[g0:g1, None])
        _round_codes_(y, spec, seed, start)
        q = y.clamp_(0, qmax).view(-1)
        if q.numel() > stop - start:
            q[stop - start:] = 0  # padded codes
        payload[start * bits // 8: -(-stop * bits // 8)] = _pack_codes(q, bits, stop - start)
    return True


def _encode_groups(chunk: torch.Tensor, num_groups: int, spec: QuantSpec, seed: int, offset: int) -> tuple:
    """payload bytes, bf16 minimum and int16 scale bits of whole groups (the last may be partial)
    of the flat tensor, ``chunk`` starting at element ``offset``."""
    group, bits = spec.group_size, spec.bits
    qmax = (1 << bits) - 1
    n = chunk.numel()
    pad = num_groups * group - n
    xg = _padded_groups(chunk, num_groups, group).to(torch.float32)  # padded codes are zeroed below
    finite = torch.isfinite(xg)
    # min/max over the finite values: one nan_to_num pass each sends NaN/Inf out of the reduction
    inf = float("inf")
    mn = torch.nan_to_num(xg, nan=inf, posinf=inf, neginf=inf).amin(1)
    mx = torch.nan_to_num(xg, nan=-inf, posinf=-inf, neginf=-inf).amax(1)
    has_finite = mn <= mx
    mn = torch.where(has_finite, mn, 0.0)
    mx = torch.where(has_finite, mx, 0.0)
    flagged = ~finite.all(1)

    mn_b = _round_down_to_bf16(mn)
    levels = torch.where(flagged, max(qmax - 3, 0), qmax).to(torch.float32)
    # Divide by a tensor: a Python-scalar divisor becomes a reciprocal multiply on CUDA.
    raw = (mx - mn_b) / levels.clamp_min(1.0)
    step_bits = _step_bits_reference(raw)
    s = step_bits.view(torch.float32)

    # NaN -> qmax, +Inf -> qmax - 1, -Inf -> qmax - 2 (only read where not finite), in one pass
    special = torch.nan_to_num(xg, nan=float(qmax), posinf=float(qmax - 1), neginf=float(qmax - 2))
    # NaN/Inf run through the arithmetic below and are replaced by their codes at the end.
    # In place after the first op: fresh buffers cost page faults on CPU.
    y = torch.sub(xg, mn_b[:, None]).div_(s[:, None])
    _round_codes_(y, spec, seed, offset)
    q = torch.minimum(y.clamp_min_(0), levels[:, None])
    q = torch.where(finite, q, special).view(-1)
    if pad:
        q[n:] = 0
    scale_bits = (step_bits >> 16) | (flagged.to(torch.int32) << 15)
    # mn_b is a bf16 value: the conversion is exact
    return _pack_codes(q, bits, n), mn_b.to(torch.bfloat16), scale_bits.to(torch.int16)


def _round_codes_(y: torch.Tensor, spec: QuantSpec, seed: int, offset: int) -> None:
    """``y = floor(y + u)`` in place: ``u = 0.5`` (nearest) or the uniforms of the flat indices."""
    if spec.rounding == "stochastic":
        _add_uniforms_(y.view(-1), seed, offset)
    else:
        y.add_(0.5)
    y.floor_()


@torch.no_grad()
def decode_reference(packed: Packed) -> torch.Tensor:
    """Rebuild the tensor with pure PyTorch ops (in cache-sized chunks of groups on CPU)."""
    _check_packed(packed)
    n = packed.numel
    t = packed.tensors
    if n == 0:
        return torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)
    group, bits = packed.params["group_size"], packed.bits
    num_groups = -(-n // group)
    scale_bits = t["scale"].view(torch.int16).to(torch.int32)
    s = ((scale_bits & 0x7FFF) << 16).view(torch.float32)
    flagged = scale_bits < 0
    mn_b = t["minimum"].to(torch.float32)
    # On CPU a host read is free: with no flagged group there are no reserved codes, and
    # mn_b + q * s of finite operands is never NaN, so no canonical-NaN pass either. A group whose
    # range overflowed fp32 has an infinite step (0 * inf is NaN): it takes the general path.
    fast = _BRANCH_ON_CPU_DATA and packed.device.type == "cpu" and not bool(
        flagged.any() | ~torch.isfinite(s).all())
    out = torch.empty(n, dtype=packed.dtype, device=packed.device)
    for g0, g1, start, stop in _chunks(num_groups, group, n, packed.device):
        codes = _unpack_codes(t["payload"][start * bits // 8: -(-stop * bits // 8)], bits)
        _decode_groups(codes, s[g0:g1], flagged[g0:g1], mn_b[g0:g1], out[start:stop], group, bits, fast)
    return out.view(packed.shape)


def _decode_groups(codes: torch.Tensor, s: torch.Tensor, flagged: torch.Tensor, mn_b: torch.Tensor,
                   out: torch.Tensor, group: int, bits: int, fast: bool) -> None:
    """Decode whole groups (the last may be partial) into ``out``: ``codes`` (uint8, at least
    ``out.numel()``), each group's fp32 step ``s``, non-finite flag and fp32 minimum ``mn_b``."""
    qmax = (1 << bits) - 1
    num_groups, n = mn_b.numel(), out.numel()
    if n == num_groups * group:
        qg = codes[:n].view(num_groups, group)
    else:
        q = torch.zeros(num_groups * group, dtype=torch.uint8, device=codes.device)
        q[:n] = codes[:n]
        qg = q.view(num_groups, group)
    if fast:
        # mul then add, two roundings like the kernel (the uint8 codes are promoted to fp32 exactly)
        if out.dtype == torch.float32 and n == num_groups * group:
            torch.mul(qg, s[:, None], out=out.view(num_groups, group)).add_(mn_b[:, None])
        else:
            out.copy_(torch.mul(qg, s[:, None]).add_(mn_b[:, None]).view(-1)[:n])
        return
    dtype = out.dtype
    qg = qg.to(torch.float32)
    # mul then add, two roundings like the kernel (fp fusion is off there).
    x_hat = qg * s[:, None]
    x_hat.add_(mn_b[:, None])
    special = torch.where(qg == qmax, float("nan"), torch.where(qg == qmax - 1, float("inf"), float("-inf")))
    x_hat = torch.where(flagged[:, None] & (qg >= qmax - 2), special, x_hat)
    res = x_hat.view(-1)[:n].to(dtype)
    # One NaN bit pattern in every backend (torch's vectorized casts may emit another one).
    res_bits = res.view(_INT_OF[dtype])
    res = torch.where(torch.isnan(res), torch.full((), _CANONICAL_NAN[dtype], dtype=res_bits.dtype,
                                                   device=res.device), res_bits)
    out.copy_(res.view(dtype))


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._rng import uniform_triton

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
    def _encode_kernel(
        x_ptr,
        payload_ptr,
        minimum_ptr,
        scale_ptr,
        n,
        num_groups,
        num_bytes,
        k1,
        k2,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_PROGRAM: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        IN_BF16: tl.constexpr,
    ):
        """One pass over a [GROUPS_PER_PROGRAM, GROUP] tile: group stats, step, codes, bit-packing.

        ``x_ptr`` is an int16 view for bf16 input; ``minimum_ptr``/``scale_ptr`` are int16 views.
        """
        QMAX: tl.constexpr = (1 << BITS) - 1
        PER_BYTE: tl.constexpr = 8 // BITS
        FLAGGED_LEVELS: tl.constexpr = QMAX - 3 if QMAX > 3 else 0
        groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        offsets = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        in_range = offsets < n
        if IN_BF16:
            x = _bf16_bits_to_fp32(tl.load(x_ptr + offsets, mask=in_range, other=0))
        else:
            x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")  # false for NaN too
        valid = in_range & finite
        mn = tl.min(tl.where(valid, x, float("inf")), axis=1)
        mx = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        has_finite = mn <= mx
        mn = tl.where(has_finite, mn, 0.0)
        mx = tl.where(has_finite, mx, 0.0)
        flagged = tl.max((in_range & ~finite).to(tl.int32), axis=1)
        mn_b = _round_down_to_bf16_triton(mn)
        levels = tl.where(flagged != 0, FLAGGED_LEVELS, QMAX).to(tl.float32)
        diff = mx - mn_b
        raw = tl.math.div_rn(diff, tl.maximum(levels, 1.0))
        step_bits = (raw.to(tl.int32, bitcast=True) + 0xFFFF) & -65536
        step_bits = tl.maximum(step_bits, 0x00800000)
        s = step_bits.to(tl.float32, bitcast=True)
        keep = groups < num_groups
        tl.store(minimum_ptr + groups, (mn_b.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=keep)
        tl.store(scale_ptr + groups, ((step_bits >> 16) | (flagged << 15)).to(tl.int16), mask=keep)

        mn_b2 = mn_b[:, None]
        xs = tl.where(finite, x, mn_b2)  # keep NaN/Inf out of the arithmetic
        if STOCHASTIC:
            u = uniform_triton(k1, k2, offsets)
        else:
            u = 0.5
        y = tl.math.div_rn(xs - mn_b2, s[:, None] + tl.zeros_like(xs)) + u
        q = tl.minimum(tl.maximum(tl.floor(y), 0.0), levels[:, None])
        special = tl.where(x != x, QMAX, tl.where(x > 0, QMAX - 1, QMAX - 2))
        q = tl.where(finite, q.to(tl.int32), special)
        q = tl.where(in_range, q, 0)
        if PER_BYTE == 1:
            tl.store(payload_ptr + offsets, q.to(tl.uint8), mask=in_range)
        else:
            # Neighbouring codes share a byte: split the last axis in pairs (tl.split keeps each
            # pair in one thread, so the packed bytes stay contiguous per thread: vector stores).
            BYTES_PER_GROUP: tl.constexpr = GROUP // PER_BYTE
            if PER_BYTE == 2:
                lo, hi = tl.split(tl.reshape(q, (GROUPS_PER_PROGRAM, BYTES_PER_GROUP, 2)))
                packed = lo | (hi << 4)
            else:
                pairs = tl.reshape(q, (GROUPS_PER_PROGRAM, BYTES_PER_GROUP, 2, 2))
                low_pair, high_pair = tl.split(pairs)  # elements 4j + {0, 2} and 4j + {1, 3}
                e0, e2 = tl.split(low_pair)
                e1, e3 = tl.split(high_pair)
                packed = e0 | (e1 << 2) | (e2 << 4) | (e3 << 6)
            byte_offsets = groups[:, None] * BYTES_PER_GROUP + tl.arange(0, BYTES_PER_GROUP)[None, :]
            tl.store(payload_ptr + byte_offsets, packed.to(tl.uint8), mask=byte_offsets < num_bytes)

    @triton.jit
    def _decode_kernel(
        payload_ptr,
        minimum_ptr,
        scale_ptr,
        out_ptr,
        n,
        num_groups,
        num_bytes,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_PROGRAM: tl.constexpr,
        OUT_BF16: tl.constexpr,
        OUT_FP16: tl.constexpr,
    ):
        """``x_hat = mn_b + q * s`` (fp32), written in the output dtype with round-to-nearest-even.

        bf16 is handled by hand on the bits (int16 views of ``minimum``, ``scale`` and of a bf16
        ``out``): the Triton interpreter truncates fp32 -> bf16 casts and mangles subnormals, while
        GPUs and torch round to nearest even.
        """
        QMAX: tl.constexpr = (1 << BITS) - 1
        PER_BYTE: tl.constexpr = 8 // BITS
        BYTES_PER_GROUP: tl.constexpr = GROUP // PER_BYTE
        groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        keep = groups < num_groups
        mn_b = _bf16_bits_to_fp32(tl.load(minimum_ptr + groups, mask=keep, other=0))
        scale_bits = tl.load(scale_ptr + groups, mask=keep, other=0).to(tl.int32)
        s = ((scale_bits & 0x7FFF) << 16).to(tl.float32, bitcast=True)
        flagged = scale_bits < 0
        byte_offsets = groups[:, None] * BYTES_PER_GROUP + tl.arange(0, BYTES_PER_GROUP)[None, :]
        byte = tl.load(payload_ptr + byte_offsets, mask=byte_offsets < num_bytes, other=0).to(tl.int32)
        if PER_BYTE == 1:
            q = byte
        elif PER_BYTE == 2:  # tl.join puts the new axis last, in-thread: element 2j, then 2j + 1
            q = tl.reshape(tl.join(byte & 15, byte >> 4), (GROUPS_PER_PROGRAM, GROUP))
        else:
            pairs = tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6))
            q = tl.reshape(pairs, (GROUPS_PER_PROGRAM, GROUP))  # [.., j, a, b] is element 4j + 2a + b
        offsets = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        in_range = offsets < n
        x_hat = mn_b[:, None] + q.to(tl.float32) * s[:, None]
        special = tl.where(q == QMAX, float("nan"), tl.where(q == QMAX - 1, float("inf"), float("-inf")))
        x_hat = tl.where(flagged[:, None] & (q >= QMAX - 2), special, x_hat)
        if OUT_BF16:
            b = x_hat.to(tl.uint32, bitcast=True)
            rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            rounded = tl.where(x_hat != x_hat, 0x7FC0, rounded)  # NaN stays the canonical NaN
            tl.store(out_ptr + offsets, rounded.to(tl.int16), mask=in_range)
        elif OUT_FP16:
            nan16 = tl.full(x_hat.shape, 0x7E00, tl.int16).to(tl.float16, bitcast=True)
            tl.store(out_ptr + offsets, tl.where(x_hat != x_hat, nan16, x_hat.to(tl.float16)), mask=in_range)
        else:
            tl.store(out_ptr + offsets, x_hat, mask=in_range)

    def _launch_shape(num_groups: int, group: int) -> tuple[int, tuple[int]]:
        groups_per_program = _TILE_ELEMENTS // group
        return groups_per_program, (triton.cdiv(num_groups, groups_per_program),)


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def AOT_CONFIGS() -> list[dict]:
    """Every (kernel, constexpr) configuration the launchers below can pick (see benchmarks/kernels.py)."""
    from .specs import GROUP_SIZE_RANGE, QUANT_BITS, ROUNDINGS

    configs = []
    group_sizes = [g for g in (32, 64, 128, 256) if GROUP_SIZE_RANGE[0] <= g <= GROUP_SIZE_RANGE[1]]
    for dtype, tname in _TRITON_DTYPES.items():
        pointer = "*i16" if dtype == torch.bfloat16 else f"*{tname}"
        itemsize = dtype.itemsize
        for bits in QUANT_BITS:
            for group in group_sizes:
                gpp = _TILE_ELEMENTS // group
                minimum = (itemsize + bits / 8 + 4 / group) * 2  # read x, write pack; read pack, write x
                common = dict(BITS=bits, GROUP=group, GROUPS_PER_PROGRAM=gpp)
                for rounding in ROUNDINGS:
                    configs.append(dict(
                        kernel=_encode_kernel,
                        name=f"quant_encode[bits={bits},g={group},{tname},{rounding}]",
                        signature=dict(x_ptr=pointer, payload_ptr="*u8", minimum_ptr="*i16", scale_ptr="*i16",
                                       n="i32", num_groups="i32", num_bytes="i32", k1="i32", k2="i32", BITS="constexpr",
                                       GROUP="constexpr", GROUPS_PER_PROGRAM="constexpr", STOCHASTIC="constexpr",
                                       IN_BF16="constexpr"),
                        constexprs=dict(common, STOCHASTIC=rounding == "stochastic", IN_BF16=dtype == torch.bfloat16),
                        num_warps=_NUM_WARPS, options=dict(enable_fp_fusion=False),
                        elements=_TILE_ELEMENTS, divisible=("n", "num_groups", "num_bytes"), pair=f"quant[bits={bits},g={group},{tname},{rounding}]",
                        min_bytes_per_element=minimum,
                    ))  # fmt: skip
                configs.append(dict(
                    kernel=_decode_kernel,
                    name=f"quant_decode[bits={bits},g={group},{tname}]",
                    signature=dict(payload_ptr="*u8", minimum_ptr="*i16", scale_ptr="*i16", out_ptr=pointer,
                                   n="i32", num_groups="i32", num_bytes="i32", BITS="constexpr", GROUP="constexpr",
                                   GROUPS_PER_PROGRAM="constexpr", OUT_BF16="constexpr", OUT_FP16="constexpr"),
                    constexprs=dict(common, OUT_BF16=dtype == torch.bfloat16, OUT_FP16=dtype == torch.float16),
                    num_warps=_NUM_WARPS, options=dict(enable_fp_fusion=False),
                    elements=_TILE_ELEMENTS, divisible=("n", "num_groups", "num_bytes"),
                    pair=[f"quant[bits={bits},g={group},{tname},{r}]" for r in ROUNDINGS],
                ))  # fmt: skip
    return configs


@torch.no_grad()
def encode_triton(x: torch.Tensor, spec: QuantSpec, *, seed: int = 0) -> Packed:
    """Quantize ``x`` with one Triton kernel launch (one read of ``x``; no host sync)."""
    _check_arguments(x, spec, seed)
    if not triton_available():
        raise RuntimeError(f"{CODEC}.encode_triton needs triton, which is not installed")
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    if n == 0:
        return _empty_packed(x, spec)
    group, bits = spec.group_size, spec.bits
    num_groups = -(-n // group)
    dev = x.device
    groups_per_program, grid = _launch_shape(num_groups, group)
    payload, minimum, scale = empty_many(
        [(-(-n * bits // 8), torch.uint8), (num_groups, torch.bfloat16), (num_groups, torch.bfloat16)], dev)
    in_bf16 = x.dtype == torch.bfloat16
    k1, k2 = seed_keys(seed)
    _encode_kernel[grid](
        flat.view(torch.int16) if in_bf16 else flat, payload, minimum.view(torch.int16), scale.view(torch.int16),
        n, num_groups, payload.numel(), k1, k2,
        BITS=bits, GROUP=group, GROUPS_PER_PROGRAM=groups_per_program,
        STOCHASTIC=spec.rounding == "stochastic", IN_BF16=in_bf16,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return _make_packed(x, spec, payload=payload, minimum=minimum, scale=scale)


@torch.no_grad()
def decode_triton(packed: Packed) -> torch.Tensor:
    """Rebuild the tensor with one Triton kernel launch (one read of the pack)."""
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
    groups_per_program, grid = _launch_shape(num_groups, group)
    out = torch.empty(n, dtype=packed.dtype, device=dev)
    out_bf16 = packed.dtype == torch.bfloat16
    _decode_kernel[grid](
        t["payload"], t["minimum"].view(torch.int16), t["scale"].view(torch.int16),
        out.view(torch.int16) if out_bf16 else out,
        n, num_groups, t["payload"].numel(),
        BITS=bits, GROUP=group, GROUPS_PER_PROGRAM=groups_per_program, OUT_BF16=out_bf16,
        OUT_FP16=packed.dtype == torch.float16,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return out.view(packed.shape)


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
