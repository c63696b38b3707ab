"""Launch settings shared by every codec kernel (one place, as Liger's ``calculate_settings``).

Every codec kernel handles a fixed tile of ``TILE_ELEMENTS`` elements with ``NUM_WARPS`` warps,
whatever the tensor size (the tail tile is masked): 32 elements per thread, so a thread's share of
a bf16 input is 64 bytes (four 128-bit loads) and of a 2-bit payload 8 bytes (one 64-bit store).
One tile size per kernel keeps the number of compiled variants small (``benchmarks/kernels.py``
compiles every one ahead of time); small tensors are launch-bound anyway.
"""

TILE_ELEMENTS = 4096
NUM_WARPS = 4
