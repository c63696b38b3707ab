"""Counter-based random numbers, identical in Triton and in PyTorch, that never touch torch's RNG.

A uniform number in [0, 1) for element ``i`` under ``seed`` is a pure function of (seed, i):

    k1, k2 = mix(seed & 0xFFFFFFFF) & 0x7FFFFFFF, mix((seed >> 32) ^ 0x9E3779B9) & 0x7FFFFFFF
    h = lowbias32(lowbias32((i mod 2**32) ^ k1) ^ k2)
    u = (h >> 8) * 2**-24

``lowbias32`` is C. Wellons' integer hash (xorshift-multiply, constants 0x7feb352d / 0x846ca68b).
The keys are derived on the host so the kernels take two int32 scalars. 32-bit wrap-around products
are exact in Triton's uint32 and are emulated exactly in int64 here (the constant is split in 16-bit
halves so no product exceeds 2**49). The result is bit-identical across backends, which is what the
tests check; the statistics are good enough for stochastic rounding (the unbiasedness tests).
"""

from __future__ import annotations

import torch

from ._backend import triton_available

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_MASK32 = 0xFFFFFFFF


def _mix_int(x: int) -> int:
    """lowbias32 on a Python int (host-side key derivation)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def seed_keys(seed: int) -> tuple[int, int]:
    """The two 31-bit keys passed to kernels for ``seed`` (any non-negative Python int)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} is not valid; allowed: a non-negative int")
    k1 = _mix_int(seed & _MASK32) & 0x7FFFFFFF
    k2 = _mix_int(((seed >> 32) ^ 0x9E3779B9) & _MASK32) & 0x7FFFFFFF
    return k1, k2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _lowbias32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    x = x ^ (x >> 16)
    return x


def uniform_reference(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1) for integer element ``offsets`` (the pure-PyTorch oracle)."""
    k1, k2 = seed_keys(seed)
    x = offsets.to(torch.int64) & _MASK32
    h = _lowbias32_torch(_lowbias32_torch(x ^ k1) ^ k2)
    return (h >> 8).to(torch.float32) * (2.0**-24)


_CPU_CHUNK = 1 << 16  # the hash runs ~30 int64 passes: in cache-sized chunks on CPU (~10x faster at 4M)


def uniform_chunks(seed: int, offset: int, n: int, device: torch.device):
    """``(start, stop, uniform_reference(seed, offset + start .. offset + stop - 1))`` covering
    ``0..n-1``: in cache-sized chunks on CPU, in one piece elsewhere."""
    device = torch.device(device)
    chunk = _CPU_CHUNK if device.type == "cpu" else max(n, 1)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        yield start, stop, uniform_reference(
            seed, torch.arange(offset + start, offset + stop, dtype=torch.int64, device=device))


def uniform_like_reference(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms for offsets 0..n-1."""
    return uniform_reference(seed, torch.arange(n, device=device, dtype=torch.int64))


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _lowbias32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def uniform_triton(k1, k2, offsets):
        """Inside a kernel: uniforms for int offsets (any int dtype), same bits as the reference."""
        x = offsets.to(tl.uint32)
        x = _lowbias32(x ^ k1.to(tl.uint32))
        x = _lowbias32(x ^ k2.to(tl.uint32))
        return (x >> 8).to(tl.float32) * 5.9604644775390625e-08
