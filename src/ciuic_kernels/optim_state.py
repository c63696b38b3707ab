"""Block-wise 8/4-bit optimizer state and the fused AdamW update: a Triton kernel and its reference.

State format (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"; the 4-bit maps
follow Li et al. 2023, "Memory Efficient Optimizers with 4-bit States", as torchao's AdamW4bit):

* A moment of ``n`` elements is cut in blocks of ``B = block_size`` elements (the last block may be
  partial). Per block, ``scale`` (fp32) = max |x| over the block's finite values (0 for an all-zero
  block). Each element keeps a code ``c`` into a sorted fp32 map ``Q`` of ``2**bits`` entries:
  ``x_hat = Q[c] * scale``.
* ``c`` = the nearest map entry to ``y = x / scale`` (IEEE division; ``y = 0`` when ``scale == 0``
  or ``x`` is not finite), ties to the lower code: ``c = #{k : mid[k] < y}`` with
  ``mid[k] = fl32((Q[k] + Q[k+1]) / 2)``, a branchless binary search in the kernel, a lookup on
  the high 16 bits of ``y`` plus one comparison in the reference (``_code_lookup``).
* Maps: the first moment uses the signed dynamic-tree map (Dettmers 2015, "8-Bit Approximations
  for Parallelism in Deep Learning": a sign, a decimal exponent given by leading zeros, then linear
  fraction bits; 7 exponent values at 8 bits, 3 at 4 bits); the second moment uses the unsigned
  dynamic-tree map at 8 bits and the linear map ``{1/16, ..., 16/16}`` without zero at 4 bits (a
  zero code would turn small second moments into zero denominators: Li et al.'s "zero-point
  problem").
* Layout: 8 bits, one code per byte; 4 bits, element ``2j`` in the low nibble and ``2j+1`` in the
  high nibble of byte ``j`` (``ceil(n/2)`` bytes). ``bits=32`` means plain fp32 moments.

The fused update (per parameter; PyTorch's AdamW, decoupled weight decay), all in fp32:

    m = m + (1 - beta1) * (g - m)                  # torch's lerp(m, g, 1 - beta1)
    v = v * beta2 + ((1 - beta2) * g) * g
    p = p * (1 - lr * weight_decay)
    p = p - (lr / (1 - beta1**t)) * (m / (sqrt(v) / sqrt(1 - beta2**t) + eps))

``p`` and ``g`` are read in their dtype and computed in fp32; the moments are dequantized before and
re-quantized after (the parameter update uses the unquantized new moments). The result is written
back in the parameter's dtype: round to nearest even, or for bf16 with ``stochastic_round`` the
fp32 bits plus a 16-bit uniform integer from the counter-based RNG (``_rng.py``, seed and element
index), truncated: unbiased, ``E[bf16(p)] = p`` (Gupta et al. 2015, "Deep Learning with Limited
Numerical Precision"). A NaN is written as the bf16 NaN 0x7FC0 in both roundings.

Non-finite values: a NaN/Inf gradient makes the parameter NaN exactly where torch's AdamW does (the
update uses the unquantized moments); the quantized state keeps the block's finite values and
stores code(0) for the non-finite ones, so one bad element does not poison its block.

Both backends are bit-identical: the scalars are rounded to fp32 on the host, the kernel uses IEEE
division and square root (``div_rn``, ``sqrt_rn``) and no mul+add fusion (``enable_fp_fusion=False``),
and the reference performs the same fp32 operations in the same order.
"""

from __future__ import annotations

import functools
import math

import torch

from ._backend import pick, triton_available
from ._rng import seed_keys, uniform_chunks

STATE_BITS = (32, 8, 4)
BLOCK_SIZES = (64, 128, 256, 512)
DEFAULT_BLOCK_SIZE = {8: 256, 4: 128}
# Elements per program (ROWS quantization blocks, or one row at 32 bits) on _NUM_WARPS warps: 16 per
# thread, so a thread's share moves in 128-bit accesses (fp32/bf16 parameter, gradient and moments,
# 8-bit codes) or 64-bit ones (4-bit codes).
_TILE = 2048
_NUM_WARPS = 4
# Tiles per program with quantized moments (each program loads both moments' maps once, 2 KiB at 8
# bits and 128 B at 4 bits, computes their midpoints, then updates its tiles one after the other): the largest
# of these that still leaves at least _MIN_PROGRAMS programs, about two waves of resident programs
# on an H100 (132 SMs x 4 programs of 128 threads at <= 128 registers); small parameters keep one
# tile per program. fp32 moments have no maps: always one tile.
_TILES_PER_PROGRAM = (8, 4, 2, 1)
_MIN_PROGRAMS = 1024


# --------------------------------------------------------------------------------------------------
# Quantization maps
# --------------------------------------------------------------------------------------------------


def _dynamic_tree_map(signed: bool, bits: int) -> list[float]:
    """The dynamic-tree map (Dettmers 2015) with ``2**bits`` sorted entries, 0 and 1 included.

    Decade ``i`` of ``E`` (``E = bits - 1`` exponents, values ``10**(i - E + 1) * f``) holds
    ``2**i`` fractions per sign when signed, ``2**(i+1)`` when unsigned; the fractions are the
    midpoints of an even split of [0.1, 1] into that many intervals.
    """
    exponents = bits - 1
    values: list[float] = [0.0, 1.0]
    for i in range(exponents):
        count = 2**i if signed else 2 ** (i + 1)
        edges = [0.1 + 0.9 * k / count for k in range(count + 1)]
        fractions = [(edges[k] + edges[k + 1]) / 2 for k in range(count)]
        decade = 10.0 ** (i - exponents + 1)
        values += [decade * f for f in fractions]
        if signed:
            values += [-decade * f for f in fractions]
    if len(values) != 2**bits:
        raise AssertionError(f"dynamic map with {len(values)} entries for {bits} bits")
    return sorted(values)


@functools.lru_cache(maxsize=None)
def _map_values(signed: bool, bits: int) -> tuple[float, ...]:
    if bits == 8:
        return tuple(_dynamic_tree_map(signed, 8))
    if bits == 4:
        if signed:
            return tuple(_dynamic_tree_map(True, 4))
        return tuple(k / 16 for k in range(1, 17))
    raise ValueError(f"bits={bits!r} is not valid for a quantization map; allowed: 8, 4")


@functools.lru_cache(maxsize=None)
def quantization_map(signed: bool, bits: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(map ``Q``: ``2**bits`` fp32 values, midpoints: ``2**bits`` fp32, the last one +inf) on ``device``.

    The map is computed in float64 on the host and rounded to fp32 once; the midpoints are then
    ``(Q[k] + Q[k+1]) * 0.5`` in fp32 arithmetic, which the Triton kernel recomputes from the map
    it holds (one rounding, in the add; the halving is exact), so every backend uses the same bits
    and the kernel reads only the map.
    """
    values = torch.tensor(_map_values(signed, bits), dtype=torch.float64).to(torch.float32)
    mids = torch.cat([(values[:-1] + values[1:]) * 0.5, torch.tensor([math.inf], dtype=torch.float32)])
    return values.to(device), mids.to(device)


@functools.lru_cache(maxsize=None)
def _code_lookup(signed: bool, bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Codes of the smallest value of every bf16-truncation bucket, for the reference's fast search.

    All fp32 values sharing their high 16 bits form one bucket; ``lut[b] = #{mid < min(bucket b)}``.
    The maps' midpoints are at least 1.4% apart (relative), a bucket spans at most 0.8%, so a bucket
    holds at most one midpoint (checked here) and ``#{mid < y} = lut[b] + (mid[lut[b]] < y)``.
    """
    _, mids = quantization_map(signed, bits, "cpu")
    keys = torch.arange(1 << 16, dtype=torch.int32)
    high = keys << 16
    negative = keys >= (1 << 15)
    smallest = torch.where(negative, high | 0xFFFF, high).view(torch.float32)
    largest = torch.where(negative, high, high | 0xFFFF).view(torch.float32)
    finite = torch.isfinite(smallest) & torch.isfinite(largest)
    smallest = torch.where(finite, smallest, 0.0)
    largest = torch.where(finite, largest, 0.0)
    lut = torch.searchsorted(mids, smallest, right=False).clamp_(max=(1 << bits) - 1)
    inside = torch.searchsorted(mids, largest, right=True) - lut
    if int(inside.max()) > 1:
        raise AssertionError(f"a bf16 bucket holds {int(inside.max())} midpoints of the {bits}-bit map")
    return lut.to(torch.uint8).to(device)  # codes < 256: 64 KB per map instead of 512 KB of int64


def _search_codes(y: torch.Tensor, signed: bool, bits: int) -> torch.Tensor:
    """``#{k : mid[k] < y}`` for fp32 ``y`` (int64), exactly ``searchsorted(mid, y)``, ~8x faster on CPU."""
    _, mids = quantization_map(signed, bits, y.device)
    lut = _code_lookup(signed, bits, y.device)
    key = (y.view(torch.int32) >> 16) & 0xFFFF
    code = torch.take(lut, key.to(torch.int64)).to(torch.int64)
    return code + (torch.take(mids, code) < y)


def _fp32(x: float) -> float:
    """``x`` rounded to fp32 (and back to a Python float, exactly)."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def check_layout(bits: int, block_size: int) -> None:
    if bits not in STATE_BITS:
        raise ValueError(f"state bits={bits!r} is not valid; allowed: {', '.join(map(str, STATE_BITS))}")
    if bits != 32 and block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size={block_size!r} is not valid; allowed: {', '.join(map(str, BLOCK_SIZES))}"
        )


_CPU_CHUNK_ELEMENTS = 1 << 14  # the reference update's chunk on CPU (see adamw_update_reference)


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of the codes of a ``numel``-element moment at ``bits`` (8 or 4)."""
    return numel if bits == 8 else -(-numel // 2)


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def _unpack(codes: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int64 codes of ``count`` elements (``count`` >= the stored ones; missing codes are 0)."""
    c = codes.to(torch.int64)
    if bits == 4:
        c = torch.stack([c & 15, c >> 4], dim=1).view(-1)
    out = torch.zeros(count, dtype=torch.int64, device=codes.device)
    k = min(count, c.numel())
    out[:k] = c[:k]
    return out


def _pack(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """int64 codes (length a multiple of 2, >= numel) -> uint8 bytes of ``numel`` elements."""
    if bits == 8:
        return codes[:numel].to(torch.uint8)
    pairs = codes[: 2 * code_bytes(numel, 4)].view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def _dequantize_padded(codes, scale, signed, bits, block_size, numel) -> torch.Tensor:
    """(blocks, B) fp32 values; elements past ``numel`` are 0."""
    nb = num_blocks(numel, block_size)
    qmap, _ = quantization_map(signed, bits, codes.device)
    x = torch.take(qmap, _unpack(codes, bits, nb * block_size)).view(nb, block_size) * scale.view(nb, 1)
    if nb * block_size > numel:
        x.view(-1)[numel:] = 0.0
    return x


def _quantize_padded(x: torch.Tensor, signed: bool, bits: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, B) fp32 -> (uint8 codes of ``numel`` elements, fp32 scale per block). Padding must be 0."""
    finite = torch.isfinite(x)
    scale = torch.where(finite, x.abs(), 0.0).amax(dim=1)
    safe = torch.where(scale > 0, scale, 1.0)
    y = torch.where(finite, x / safe[:, None], 0.0)
    codes = _search_codes(y.reshape(-1).contiguous(), signed, bits)
    return _pack(codes, bits, numel), scale


@torch.no_grad()
def quantize_state(x: torch.Tensor, *, signed: bool, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a moment (any shape, float) to ``(codes uint8, scale fp32)`` as the update kernel does."""
    check_layout(bits, block_size)
    if bits == 32:
        raise ValueError("quantize_state needs bits 8 or 4 (bits=32 keeps the fp32 tensor)")
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = num_blocks(n, block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    return _quantize_padded(padded.view(nb, block_size), signed, bits, n)


@torch.no_grad()
def dequantize_state(codes: torch.Tensor, scale: torch.Tensor, *, signed: bool, bits: int, block_size: int,
                     numel: int) -> torch.Tensor:
    """The fp32 values (flat, ``numel`` elements) of a quantized moment."""
    check_layout(bits, block_size)
    return _dequantize_padded(codes, scale, signed, bits, block_size, numel).reshape(-1)[:numel].clone()


def _bf16_bits_rne(p: torch.Tensor) -> torch.Tensor:
    bits = p.to(torch.bfloat16).view(torch.int16)
    return torch.where(torch.isnan(p), torch.tensor(0x7FC0, dtype=torch.int16, device=p.device), bits)


def _bf16_bits_stochastic(p: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """fp32 -> bf16 bits: add a uniform 16-bit integer to the fp32 bits, keep the high half
    (the uniforms of flat indices ``offset + 0..len(p)-1``)."""
    n = p.numel()
    bits = p.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    noise = torch.empty(n, dtype=torch.int64, device=p.device)
    for start, stop, u in uniform_chunks(seed, offset, n, p.device):
        noise[start:stop] = (u * 65536.0).to(torch.int64)
    high = ((bits + noise) >> 16) & 0xFFFF
    high = torch.where(torch.isnan(p), 0x7FC0, high)
    return (high - ((high >> 15) << 16)).to(torch.int16)


def _write_param(flat: torch.Tensor, p: torch.Tensor, stochastic_round: bool, seed: int, offset: int) -> None:
    """Write fp32 ``p`` into ``flat`` (a contiguous 1-D slice of the parameter, starting at flat
    index ``offset``) in its dtype."""
    if flat.dtype == torch.bfloat16:
        bits = _bf16_bits_stochastic(p, seed, offset) if stochastic_round else _bf16_bits_rne(p)
        flat.view(torch.int16).copy_(bits)
    else:
        flat.copy_(p)


def _scalars(lr, beta1, beta2, eps, weight_decay, step) -> dict[str, float]:
    """Host-side scalars, rounded to fp32 once (both backends read exactly these)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return {
        "decay": _fp32(1 - lr * weight_decay),
        "one_minus_beta1": _fp32(1 - beta1),
        "beta2": _fp32(beta2),
        "one_minus_beta2": _fp32(1 - beta2),
        "step_size": _fp32(lr / bias_correction1),
        "bias_correction2_sqrt": _fp32(math.sqrt(bias_correction2)),
        "eps": _fp32(eps),
    }


def _adam_math(p, g, m, v, s: dict[str, float]):
    """The fp32 update, in the kernel's order (see the module docstring)."""
    m = m + s["one_minus_beta1"] * (g - m)
    v = v * s["beta2"] + (s["one_minus_beta2"] * g) * g
    p = p * s["decay"]
    # torch.sqrt on CPU fp32 is not always correctly rounded; in float64 then rounded to fp32 it is
    # (double rounding is harmless for sqrt), which is what IEEE sqrt_rn in the kernel returns.
    denom = torch.sqrt(v.double()).float() / s["bias_correction2_sqrt"] + s["eps"]
    p = p - s["step_size"] * (m / denom)
    return p, m, v


@torch.no_grad()
def adamw_update_reference(param, grad, exp_avg, exp_avg_sq, exp_avg_scale=None, exp_avg_sq_scale=None, *,
                           bits: int, block_size: int, lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float, step: int, stochastic_round: bool = False,
                           seed: int = 0) -> None:
    """One AdamW step on ``param`` and its state, in place, with PyTorch ops (see ``adamw_update``).

    On CPU it runs in chunks of whole blocks (``_CPU_CHUNK_ELEMENTS``): the fp32/int64 temporaries
    of a step are then a few hundred KB whatever the parameter's size (in a step fused into
    backward they add to the activations' peak), and stay in cache. Blocks are independent and the
    stochastic rounding is indexed by the flat element, so the bits do not depend on the chunking."""
    n = param.numel()
    if n == 0:
        return
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    target = param.detach() if param.is_contiguous() else torch.empty_like(
        param.detach(), memory_format=torch.contiguous_format)
    flat_param = target.view(-1)
    if target is not param:
        flat_param.copy_(param.detach().reshape(-1))
    flat_grad = grad.reshape(-1)
    unit = block_size if bits != 32 else 1
    chunk = max(_CPU_CHUNK_ELEMENTS // unit, 1) * unit if param.device.type == "cpu" else n
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        p = flat_param[start:stop].to(torch.float32)
        g = flat_grad[start:stop].to(torch.float32)
        if bits == 32:
            m_state, v_state = exp_avg.view(-1)[start:stop], exp_avg_sq.view(-1)[start:stop]
            p, m, v = _adam_math(p, g, m_state, v_state, s)
            m_state.copy_(m)
            v_state.copy_(v)
        else:
            code_slice = slice(code_bytes(start, bits), code_bytes(stop, bits))  # start: a whole block
            block_slice = slice(start // block_size, num_blocks(stop, block_size))
            p = _update_quantized(p, g, exp_avg[code_slice], exp_avg_sq[code_slice], exp_avg_scale[block_slice],
                                  exp_avg_sq_scale[block_slice], s, bits, block_size)
        _write_param(flat_param[start:stop], p, stochastic_round, seed, start)
    if target is not param:
        param.copy_(target)


def _update_quantized(p, g, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, s, bits, block_size):
    """The step for whole blocks of fp32 ``p``/``g`` (the last may be partial) with 8/4-bit moments:
    the moments' codes and scales are rewritten in place; returns the new fp32 ``p``."""
    n = p.numel()
    nb = num_blocks(n, block_size)
    padded = nb * block_size
    if padded > n:
        p = torch.cat([p, p.new_zeros(padded - n)])
        g = torch.cat([g, g.new_zeros(padded - n)])
    m_old = _dequantize_padded(exp_avg, exp_avg_scale, True, bits, block_size, n)
    v_old = _dequantize_padded(exp_avg_sq, exp_avg_sq_scale, False, bits, block_size, n)
    p, m, v = _adam_math(p.view(nb, block_size), g.view(nb, block_size), m_old, v_old, s)
    if padded > n:  # the kernel masks elements past n out of the block statistics
        m.view(-1)[n:] = 0.0
        v.view(-1)[n:] = 0.0
    codes, scale = _quantize_padded(m, True, bits, n)
    exp_avg.copy_(codes)
    exp_avg_scale.copy_(scale)
    codes, scale = _quantize_padded(v, False, bits, n)
    exp_avg_sq.copy_(codes)
    exp_avg_sq_scale.copy_(scale)
    return p.reshape(-1)[:n]


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._rng import uniform_triton

    @triton.jit
    def _load_fp32(ptr, offsets, mask, BF16: tl.constexpr):
        if BF16:  # ptr is an int16 view of a bf16 tensor (the interpreter's bf16 casts truncate)
            return (tl.load(ptr + offsets, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _lookup(table, codes):
        """``table[codes]`` for a [ROWS, BLOCK] int32 ``codes`` and a 1-D ``table`` held by the program
        (a gather through shared memory, not a global load per element)."""
        flat = tl.reshape(codes, (codes.shape[0] * codes.shape[1],))
        return tl.reshape(tl.gather(table, flat, 0), codes.shape)

    @triton.jit
    def _midpoints(table, BITS: tl.constexpr):
        """``(Q[k] + Q[k+1]) * 0.5`` of the map ``table`` the program holds, +inf last: the bits of
        ``quantization_map``'s midpoints, without reading them from memory."""
        k = tl.arange(0, 1 << BITS)
        last: tl.constexpr = (1 << BITS) - 1
        following = tl.gather(table, tl.minimum(k + 1, last), 0)
        return tl.where(k == last, float("inf"), (table + following) * 0.5)

    @triton.jit
    def _load_moment(codes_ptr, scale_ptr, table, rows, offsets, mask, n, n_code_bytes, BITS: tl.constexpr,
                     BLOCK: tl.constexpr):
        """Dequantized fp32 moment of the [ROWS, BLOCK] tile ``offsets`` (0 where masked); ``table``:
        the map the program holds."""
        if BITS == 32:
            x = tl.load(codes_ptr + offsets, mask=mask, other=0.0)
        else:
            scale = tl.load(scale_ptr + rows, mask=rows * BLOCK < n, other=0.0)
            if BITS == 8:
                code = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
            else:  # byte j holds element 2j (low nibble) and 2j + 1 (high): tl.join stacks them in-thread
                HALF: tl.constexpr = BLOCK // 2
                byte_index = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
                byte = tl.load(codes_ptr + byte_index, mask=byte_index < n_code_bytes, other=0)
                byte = byte.to(tl.int32)
                code = tl.reshape(tl.join(byte & 15, byte >> 4), (rows.shape[0], BLOCK))
            x = _lookup(table, code) * scale[:, None]
        return tl.where(mask, x, 0.0)

    @triton.jit
    def _adam_math_triton(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, bc2_sqrt, eps):
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + (one_minus_beta2 * g) * g
        p = p * decay
        denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt + tl.zeros_like(v)) + eps
        p = p - step_size * tl.math.div_rn(m, denom)
        return p, m, v

    @triton.jit
    def _encode(x, safe_scale, mids, BITS: tl.constexpr):
        """Nearest map code of ``x / scale`` (ties down): #{k: mid[k] < y}, by branchless binary search
        over the midpoints ``mids`` (a 1-D tensor the program holds)."""
        finite = tl.abs(x) < float("inf")
        y = tl.where(finite, tl.math.div_rn(x, safe_scale[:, None] + tl.zeros_like(x)), 0.0)
        pos = tl.zeros(x.shape, dtype=tl.int32)
        for i in tl.static_range(BITS):
            pos = tl.where(_lookup(mids, pos + ((1 << (BITS - 1 - i)) - 1)) < y, pos + (1 << (BITS - 1 - i)), pos)
        return pos

    @triton.jit
    def _store_moment(codes_ptr, scale_ptr, mids, x, rows, offsets, mask, n, n_code_bytes, BITS: tl.constexpr,
                      BLOCK: tl.constexpr):
        """Quantize the [ROWS, BLOCK] tile ``x`` (masked elements are 0): per-row absmax scale, codes;
        ``mids``: the midpoints the program holds."""
        if BITS == 32:
            tl.store(codes_ptr + offsets, x, mask=mask)
        else:
            absmax = tl.max(tl.where(tl.abs(x) < float("inf"), tl.abs(x), 0.0), axis=1)
            tl.store(scale_ptr + rows, absmax, mask=rows * BLOCK < n)
            code = _encode(x, tl.where(absmax > 0, absmax, 1.0), mids, BITS)
            if BITS == 8:
                tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=mask)
            else:  # tl.split keeps each pair in one thread, so the packed bytes stay contiguous per thread
                HALF: tl.constexpr = BLOCK // 2
                low, high = tl.split(tl.reshape(code, (rows.shape[0], HALF, 2)))
                byte_index = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
                tl.store(codes_ptr + byte_index, (low | (high << 4)).to(tl.uint8), mask=byte_index < n_code_bytes)

    @triton.jit
    def _store_param(p_ptr, offsets, mask, p, k1, k2, P_BF16: tl.constexpr, STOCHASTIC: tl.constexpr):
        if P_BF16:
            b = p.to(tl.uint32, bitcast=True)
            if STOCHASTIC:
                noise = (uniform_triton(k1, k2, offsets) * 65536.0).to(tl.uint32)
                high = (b + noise) >> 16
            else:
                high = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            high = tl.where(p != p, 0x7FC0, high)
            tl.store(p_ptr + offsets, high.to(tl.int16), mask=mask)
        else:
            tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adamw_kernel(
        p_ptr, g_ptr, m_ptr, m_scale_ptr, v_ptr, v_scale_ptr,
        m_map_ptr, v_map_ptr,
        n, n_code_bytes, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, bc2_sqrt, eps, k1, k2,
        BITS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr, P_BF16: tl.constexpr,
        G_BF16: tl.constexpr, STOCHASTIC: tl.constexpr,
    ):  # fmt: skip
        """One program = TILES consecutive [ROWS, BLOCK] tiles, one after the other: each tile is ROWS
        quantization blocks of BLOCK contiguous elements (at ``BITS=32`` just a tile). Each thread
        holds contiguous runs of a row, so the parameter, gradient, moments and codes move in
        64/128-bit accesses; the maps are loaded once per program (before the loop over its tiles),
        their midpoints computed from them, and both indexed with ``tl.gather``."""
        if BITS == 32:
            m_map = 0.0  # unused: plain fp32 moments
            m_mids = 0.0
            v_map = 0.0
            v_mids = 0.0
        else:
            m_map = tl.load(m_map_ptr + tl.arange(0, 1 << BITS))
            v_map = tl.load(v_map_ptr + tl.arange(0, 1 << BITS))
            m_mids = _midpoints(m_map, BITS)
            v_mids = _midpoints(v_map, BITS)
        first_tile = tl.program_id(0).to(tl.int64) * TILES
        for t in range(TILES):
            rows = (first_tile + t) * ROWS + tl.arange(0, ROWS)
            offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
            mask = offsets < n
            p = _load_fp32(p_ptr, offsets, mask, P_BF16)
            g = _load_fp32(g_ptr, offsets, mask, G_BF16)
            m = _load_moment(m_ptr, m_scale_ptr, m_map, rows, offsets, mask, n, n_code_bytes, BITS, BLOCK)
            v = _load_moment(v_ptr, v_scale_ptr, v_map, rows, offsets, mask, n, n_code_bytes, BITS, BLOCK)
            p, m, v = _adam_math_triton(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
                                        bc2_sqrt, eps)
            _store_param(p_ptr, offsets, mask, p, k1, k2, P_BF16, STOCHASTIC)
            if BITS != 32:  # elements past n stay out of the block statistics
                m = tl.where(mask, m, 0.0)
                v = tl.where(mask, v, 0.0)
            _store_moment(m_ptr, m_scale_ptr, m_mids, m, rows, offsets, mask, n, n_code_bytes, BITS, BLOCK)
            _store_moment(v_ptr, v_scale_ptr, v_mids, v, rows, offsets, mask, n, n_code_bytes, BITS, BLOCK)


def _launch_shape(bits: int, block_size: int) -> tuple[int, int]:
    """(BLOCK, ROWS) of a program's [ROWS, BLOCK] tile."""
    block = _TILE if bits == 32 else block_size
    return block, _TILE // block


def _tiles_per_program(bits: int, numel: int) -> int:
    """TILES of a launch over ``numel`` elements (one of ``_TILES_PER_PROGRAM``; 1 at 32 bits)."""
    if bits == 32:
        return 1
    tiles = num_blocks(numel, _TILE)
    return next(t for t in _TILES_PER_PROGRAM if t == 1 or tiles >= t * _MIN_PROGRAMS)


def _kernel_dtype(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the tensor the kernel reads, whether it is an int16 view of bf16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    return t, False


@torch.no_grad()
def adamw_update_triton(param, grad, exp_avg, exp_avg_sq, exp_avg_scale=None, exp_avg_sq_scale=None, *,
                        bits: int, block_size: int, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, step: int, stochastic_round: bool = False, seed: int = 0) -> None:
    """One AdamW step with the fused Triton kernel (one launch per parameter)."""
    if not triton_available():
        raise RuntimeError("optim_state.adamw_update_triton needs triton, which is not installed")
    n = param.numel()
    if n == 0:
        return
    s = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    target = param if param.is_contiguous() else param.contiguous()
    p_arg, p_bf16 = _kernel_dtype(target.view(-1))
    g_arg, g_bf16 = _kernel_dtype(grad.reshape(-1).contiguous())
    block, rows = _launch_shape(bits, block_size)
    dev = param.device
    if bits == 32:
        m_map = v_map = exp_avg  # unused at 32 bits
        m_scale, v_scale = exp_avg, exp_avg_sq
    else:
        m_map, _ = quantization_map(True, bits, dev)  # the kernel computes the midpoints from the map
        v_map, _ = quantization_map(False, bits, dev)
        m_scale, v_scale = exp_avg_scale, exp_avg_sq_scale
    k1, k2 = seed_keys(seed)
    tiles = _tiles_per_program(bits, n)
    grid = (num_blocks(n, _TILE * tiles),)
    _adamw_kernel[grid](
        p_arg, g_arg, exp_avg, m_scale, exp_avg_sq, v_scale, m_map, v_map,
        n, code_bytes(n, bits) if bits == 4 else n, s["one_minus_beta1"], s["beta2"], s["one_minus_beta2"],
        s["decay"], s["step_size"], s["bias_correction2_sqrt"], s["eps"], k1, k2,
        BITS=bits, BLOCK=block, ROWS=rows, TILES=tiles, P_BF16=p_bf16, G_BF16=g_bf16,
        STOCHASTIC=bool(stochastic_round and p_bf16),
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    if target is not param:
        param.copy_(target)


@torch.no_grad()
def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 exp_avg_scale: torch.Tensor | None = None, exp_avg_sq_scale: torch.Tensor | None = None, *,
                 bits: int, block_size: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, stochastic_round: bool = False, seed: int = 0,
                 backend: str | None = None) -> None:
    """One fused AdamW step on ``param`` (in place) and its moments (in place).

    ``bits=32``: ``exp_avg``/``exp_avg_sq`` are fp32 tensors with ``param.numel()`` elements and the
    scales are None. ``bits=8|4``: they are uint8 codes (``code_bytes(n, bits)``) and the scales
    fp32 tensors of ``num_blocks(n, block_size)`` elements (see the module docstring). ``step`` is
    the 1-based step count (for the bias corrections); ``seed`` drives bf16 stochastic rounding
    (applies to bf16 parameters only). Triton on CUDA, the reference elsewhere.
    """
    check_layout(bits, block_size)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step={step!r} is not valid; allowed: an int >= 1")
    impl = pick(param.device, backend, adamw_update_triton, adamw_update_reference)
    impl(param, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, bits=bits, block_size=block_size,
         lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
         stochastic_round=stochastic_round, seed=seed)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time report: every launch configuration of the kernel
# --------------------------------------------------------------------------------------------------

_AOT_DTYPES = (  # (param pointer, grad pointer, param is bf16, grad is bf16, stochastic, name)
    ("*fp32", "*fp32", False, False, False, "fp32"),
    ("*fp16", "*fp16", False, False, False, "fp16"),
    ("*i16", "*i16", True, True, False, "bf16"),
    ("*i16", "*i16", True, True, True, "bf16,sr"),
    ("*i16", "*fp32", True, False, False, "bf16,grad=fp32"),
    ("*i16", "*fp32", True, False, True, "bf16,grad=fp32,sr"),
)


def AOT_CONFIGS() -> list[dict]:
    """Every (bits, block, tiles per program, dtype, rounding) the launcher can pick, for
    ``benchmarks/kernels.py``."""
    if not triton_available():
        return []
    configs = []
    for bits in STATE_BITS:
        blocks = (_TILE,) if bits == 32 else BLOCK_SIZES
        tile_counts = (1,) if bits == 32 else tuple(sorted(_TILES_PER_PROGRAM))
        state = "*fp32" if bits == 32 else "*u8"
        scale = "*fp32"
        for block in blocks:
            _, rows = _launch_shape(bits, block)
            for tiles in tile_counts:
                for p_sig, g_sig, p_bf16, g_bf16, stochastic, name in _AOT_DTYPES:
                    signature = {
                        "p_ptr": p_sig, "g_ptr": g_sig, "m_ptr": state, "m_scale_ptr": scale,
                        "v_ptr": state, "v_scale_ptr": scale, "m_map_ptr": "*fp32",
                        "v_map_ptr": "*fp32", "n": "i32", "n_code_bytes": "i32",
                        "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "decay": "fp32",
                        "step_size": "fp32", "bc2_sqrt": "fp32", "eps": "fp32", "k1": "i32", "k2": "i32",
                        "BITS": "constexpr", "BLOCK": "constexpr", "ROWS": "constexpr", "TILES": "constexpr",
                        "P_BF16": "constexpr", "G_BF16": "constexpr", "STOCHASTIC": "constexpr",
                    }  # fmt: skip
                    configs.append({
                        "kernel": _adamw_kernel,
                        "signature": signature,
                        "constexprs": {"BITS": bits, "BLOCK": block, "ROWS": rows, "TILES": tiles, "P_BF16": p_bf16,
                                       "G_BF16": g_bf16, "STOCHASTIC": stochastic},
                        "name": f"adamw_update[bits={bits},block={block},tiles={tiles},{name}]",
                        "num_warps": _NUM_WARPS,
                        "enable_fp_fusion": False,
                        # the elements one program covers: its loads/stores inside the tile loop run TILES times
                        "elements": _TILE * tiles,
                        # the variant a launch gets when numel % 32 == 0 (masks then cover whole 64/128-bit runs)
                        "divisible": ("n", "n_code_bytes"),
                    })  # fmt: skip
    return configs


__all__ = [
    "STATE_BITS", "BLOCK_SIZES", "DEFAULT_BLOCK_SIZE", "AOT_CONFIGS", "adamw_update", "adamw_update_reference",
    "adamw_update_triton", "quantize_state", "dequantize_state", "quantization_map", "code_bytes", "num_blocks",
    "check_layout",
]
