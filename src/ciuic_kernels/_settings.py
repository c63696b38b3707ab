"""Launch settings shared by every kernel (one helper, as Liger's ``calculate_settings``)."""

from __future__ import annotations

import triton


def calculate_settings(n: int, max_block: int = 4096) -> tuple[int, int]:
    """Block size (a power of two >= n, capped) and number of warps for a 1-D elementwise kernel."""
    block = min(max_block, triton.next_power_of_2(max(int(n), 16)))
    if block >= 4096:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps


def grid_1d(n: int, block: int) -> tuple[int]:
    return (max(1, triton.cdiv(int(n), block)),)
