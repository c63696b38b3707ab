"""Block-wise optimizer-state quantization and the fused AdamW kernel: maps, code search, round-trip
error, Triton == reference bit for bit (interpreter), NaN/Inf, empty and odd sizes."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU

import zlib

import pytest
import torch

from ciuic_kernels import optim_state as ops
from ciuic_kernels._backend import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])
    return t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = _bits(actual).reshape(-1), _bits(expected).reshape(-1)
    if not torch.equal(a, e):
        where = (a != e).nonzero().view(-1)
        i = where[0].item()
        raise AssertionError(f"{what}: {where.numel()} of {a.numel()} differ; first at {i}: "
                             f"{actual.reshape(-1)[i].item()!r} != {expected.reshape(-1)[i].item()!r}")


@pytest.mark.parametrize("signed,bits", [(True, 8), (False, 8), (True, 4), (False, 4)],
                         ids=["signed8", "unsigned8", "signed4", "unsigned4"])
def test_maps_are_sorted_and_cover_the_range(signed, bits):
    qmap, mids = ops.quantization_map(signed, bits)
    assert qmap.numel() == 2**bits and qmap.dtype == torch.float32
    assert torch.all(qmap[1:] > qmap[:-1]), "map entries must be distinct and sorted"
    assert qmap.max().item() == 1.0
    if signed:
        assert qmap.min().item() < -0.8 and 0.0 in qmap.tolist()
    else:
        assert qmap.min().item() >= 0.0
    if not signed and bits == 4:
        assert 0.0 not in qmap.tolist(), "the 4-bit second-moment map has no zero (zero-point problem)"
    assert torch.isinf(mids[-1]) and torch.all(mids[:-1] > qmap[:-1]) and torch.all(mids[:-1] < qmap[1:])


@pytest.mark.parametrize("signed,bits", [(True, 8), (False, 8), (True, 4), (False, 4)],
                         ids=["signed8", "unsigned8", "signed4", "unsigned4"])
def test_code_search_equals_searchsorted(signed, bits):
    _, mids = ops.quantization_map(signed, bits)
    g = torch.Generator().manual_seed(0)
    y = torch.cat([
        torch.rand(20000, generator=g) * 2 - 1,
        (torch.rand(20000, generator=g) * 2 - 1) * 10.0 ** -torch.randint(0, 8, (20000,), generator=g),
        mids[:-1], torch.nextafter(mids[:-1], torch.tensor(2.0)), torch.nextafter(mids[:-1], torch.tensor(-2.0)),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]),
    ])
    y = y if signed else y.abs()
    expected = torch.searchsorted(mids, y)
    assert torch.equal(ops._search_codes(y, signed, bits), expected)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 255, 4097])
def test_quantize_is_nearest_map_entry_per_block(signed, bits, n):
    """Codes are the brute-force nearest map entry of x / absmax; the error is bounded per block."""
    block = 128
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)  # spans several decades per block
    x = x if signed else x.abs()
    codes, scale = ops.quantize_state(x, signed=signed, bits=bits, block_size=block)
    assert codes.dtype == torch.uint8 and codes.numel() == ops.code_bytes(n, bits)
    assert scale.numel() == ops.num_blocks(n, block)
    x_hat = ops.dequantize_state(codes, scale, signed=signed, bits=bits, block_size=block, numel=n)
    qmap, _ = ops.quantization_map(signed, bits)
    pad = ops.num_blocks(n, block) * block - n
    xb = torch.cat([x, x.new_zeros(pad)]).view(-1, block)
    absmax = xb.abs().amax(1)
    assert torch.equal(scale, absmax)
    y = xb / absmax[:, None]
    nearest = (y[..., None] - qmap).abs().argmin(-1)  # brute force over every entry
    expected = (qmap[nearest] * absmax[:, None]).view(-1)[:n]
    assert torch.equal(x_hat, expected)
    # the worst nearest-entry error on [-1, 1] (signed) or [0, 1]: half the widest gap, or the
    # distance from the range's end to the outermost entry (the signed map stops short of -1)
    worst = max((qmap[1:] - qmap[:-1]).max().item() / 2, (1 + qmap[0].item()) if signed else qmap[0].item())
    bound = (worst * absmax[:, None]).expand_as(xb).reshape(-1)[:n] * (1 + 1e-5)
    assert torch.all((x_hat - x).abs() <= bound)


def test_zero_block_and_nonfinite_values():
    x = torch.zeros(300)
    x[260] = float("nan")
    x[270] = float("inf")
    x[280] = 0.5
    codes, scale = ops.quantize_state(x, signed=True, bits=8, block_size=256)
    assert scale[0].item() == 0.0 and scale[1].item() == 0.5  # absmax of the finite values only
    x_hat = ops.dequantize_state(codes, scale, signed=True, bits=8, block_size=256, numel=300)
    assert torch.all(x_hat[:256] == 0) and x_hat[280].item() == 0.5
    assert x_hat[260].item() == 0.0 and x_hat[270].item() == 0.0  # non-finite -> code of 0


def _state(n, bits, block, g):
    if bits == 32:
        return [torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 1e-2, None, None]
    m, ms = ops.quantize_state(torch.randn(n, generator=g) * 0.1, signed=True, bits=bits, block_size=block)
    v, vs = ops.quantize_state(torch.rand(n, generator=g) * 1e-2, signed=False, bits=bits, block_size=block)
    return [m, v, ms, vs]


def _run(backend, p, grad, state, bits, block, stochastic, step=3):
    p = p.clone()
    state = [t.clone() if t is not None else None for t in state]
    ops.adamw_update(p, grad, *state, bits=bits, block_size=block, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.1, step=step, stochastic_round=stochastic, seed=12345, backend=backend)
    return [p] + state


@needs_triton
@pytest.mark.parametrize("bits,block", [(32, 0), (8, 64), (4, 64), (4, 128)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 41, 23)], ids=["(1,)", "(7,)", "(3,41,23)"])
def test_triton_kernel_equals_reference_bitwise(bits, block, dtype, shape):
    g = torch.Generator().manual_seed(zlib.crc32(repr((bits, dtype, shape)).encode()))  # same in every process
    n = torch.Size(shape).numel()
    p = torch.randn(shape, generator=g).to(DTYPES[dtype])
    grad = (torch.randn(shape, generator=g) * 3).to(DTYPES[dtype])
    state = _state(n, bits, block, g)
    for stochastic in ([False, True] if dtype == "bf16" else [False]):
        ref = _run("torch", p, grad, state, bits, block, stochastic)
        tri = _run("triton", p, grad, state, bits, block, stochastic)
        for name, a, e in zip(["param", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"], tri, ref):
            if e is not None:
                assert_bitwise_equal(a, e, f"{name} (stochastic={stochastic})")


@needs_triton
@pytest.mark.parametrize("bits,block", [(32, 0), (8, 64), (4, 128)], ids=lambda v: str(v))
def test_reference_in_chunks_equals_triton_kernel(monkeypatch, bits, block):
    """On CPU the reference update runs in chunks of whole blocks: a non-contiguous bf16 parameter
    spanning several chunks with a partial last block, stochastic rounding indexed across chunk
    boundaries, gives the kernel's bits (the kernel sees the whole parameter at once)."""
    monkeypatch.setattr(ops, "_CPU_CHUNK_ELEMENTS", 256)
    g = torch.Generator().manual_seed(11)
    n = 23 * 41
    p = torch.randn(41, 23, generator=g).bfloat16().t()  # non-contiguous
    grad = torch.randn(23, 41, generator=g).bfloat16()
    state = _state(n, bits, block, g)
    for stochastic in (False, True):
        ref = _run("torch", p, grad, state, bits, block, stochastic)
        tri = _run("triton", p, grad, state, bits, block, stochastic)
        for name, a, e in zip(["param", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"], tri, ref):
            if e is not None:
                assert_bitwise_equal(a, e, f"{name} (stochastic={stochastic})")


@needs_triton
@pytest.mark.parametrize("bits,block", [(8, 256), (4, 128)], ids=lambda v: str(v))
@pytest.mark.parametrize("min_programs,tiles", [(1, 8), (3, 4)])
def test_triton_kernel_with_several_tiles_per_program_equals_reference(monkeypatch, bits, block, min_programs,
                                                                       tiles):
    """Programs that loop over several tiles (maps loaded once): 20 tiles and a partial one, so the
    last program has a partial tile and tiles wholly past the end; odd size (half a 4-bit byte);
    bf16 with and without stochastic rounding, Triton == reference bit for bit."""
    monkeypatch.setattr(ops, "_MIN_PROGRAMS", min_programs)
    n = 20 * ops._TILE + 1061
    assert ops._tiles_per_program(bits, n) == tiles
    assert ops.num_blocks(n, ops._TILE * tiles) * tiles * ops._TILE - n > ops._TILE  # idle tiles in the last program
    names = {c["name"] for c in ops.AOT_CONFIGS()}
    assert f"adamw_update[bits={bits},block={block},tiles={tiles},bf16,sr]" in names
    g = torch.Generator().manual_seed(zlib.crc32(repr((bits, tiles)).encode()))
    p = torch.randn(n, generator=g).bfloat16()
    grad = (torch.randn(n, generator=g) * 3).bfloat16()
    state = _state(n, bits, block, g)
    for stochastic in (False, True):
        ref = _run("torch", p, grad, state, bits, block, stochastic)
        tri = _run("triton", p, grad, state, bits, block, stochastic)
        for name, a, e in zip(["param", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"], tri, ref):
            assert_bitwise_equal(a, e, f"{name} (stochastic={stochastic})")


def test_tiles_per_program_follow_the_element_count():
    tile = ops._TILE
    assert ops._tiles_per_program(32, 1 << 30) == 1  # fp32 moments: no maps to amortise
    for bits in (8, 4):
        assert ops._tiles_per_program(bits, 1) == 1
        assert ops._tiles_per_program(bits, (2 * ops._MIN_PROGRAMS - 1) * tile) == 1
        assert ops._tiles_per_program(bits, 2 * ops._MIN_PROGRAMS * tile) == 2
        assert ops._tiles_per_program(bits, 4 * ops._MIN_PROGRAMS * tile) == 4
        assert ops._tiles_per_program(bits, 8 * ops._MIN_PROGRAMS * tile) == 8
        assert ops._tiles_per_program(bits, 1 << 34) == 8


@needs_triton
def test_triton_kernel_equals_reference_with_nonfinite_and_fp32_grad_for_bf16():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(300, generator=g).bfloat16()
    grad = torch.randn(300, generator=g)  # fp32 gradient for bf16 weights
    grad[[3, 100, 299]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    state = _state(300, 8, 128, g)
    for stochastic in (False, True):
        ref = _run("torch", p, grad, state, 8, 128, stochastic)
        tri = _run("triton", p, grad, state, 8, 128, stochastic)
        for a, e in zip(tri, ref):
            assert_bitwise_equal(a, e, f"stochastic={stochastic}")


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_nan_and_inf_gradients_match_torch_positions(bits):
    """Where the gradient is NaN/Inf the parameter becomes NaN exactly where torch's AdamW's does;
    the other elements are updated normally (state quantization keeps the block's finite values)."""
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(600, generator=g)
    grad = torch.randn(600, generator=g)
    grad[[5, 300, 599]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    ref = torch.nn.Parameter(p0.clone())
    ref.grad = grad.clone()
    torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False).step()
    block = ops.DEFAULT_BLOCK_SIZE.get(bits, 256)
    if bits == 32:
        state = [torch.zeros(600), torch.zeros(600), None, None]
    else:
        state = [torch.zeros(ops.code_bytes(600, bits), dtype=torch.uint8), torch.zeros(ops.code_bytes(600, bits),
                 dtype=torch.uint8), torch.zeros(ops.num_blocks(600, block)), torch.zeros(ops.num_blocks(600, block))]
    ours, *state = _run(None, p0, grad, state, bits, block, False, step=1)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref.detach()))
    finite = ~torch.isnan(ours)
    torch.testing.assert_close(ours[finite], ref.detach()[finite], rtol=1e-6, atol=1e-6)
    if bits != 32:  # the scales stay finite: the next step with good gradients works everywhere else
        assert torch.isfinite(state[2]).all() and torch.isfinite(state[3]).all()
        nxt = _run(None, ours, torch.randn(600, generator=g), state, bits, block, False, step=2)[0]
        assert torch.equal(torch.isnan(nxt), torch.isnan(ours))


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_empty_parameter_is_a_no_op(bits):
    p = torch.empty(0)
    st = [torch.empty(0), torch.empty(0), None, None] if bits == 32 else [
        torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), torch.empty(0), torch.empty(0)]
    ops.adamw_update(p, torch.empty(0), *st, bits=bits, block_size=128, lr=1e-3, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.0, step=1)


def test_bad_layout_and_step_raise_clear_errors():
    with pytest.raises(ValueError, match=r"bits=5.*allowed: 32, 8, 4"):
        ops.check_layout(5, 128)
    with pytest.raises(ValueError, match=r"block_size=100.*allowed: 64, 128, 256, 512"):
        ops.check_layout(8, 100)
    p = torch.zeros(4)
    with pytest.raises(ValueError, match=r"step=0.*allowed"):
        ops.adamw_update(p, p, p.clone(), p.clone(), bits=32, block_size=128, lr=1e-3, beta1=0.9, beta2=0.999,
                         eps=1e-8, weight_decay=0.0, step=0)


@needs_triton
def test_aot_configs_cover_every_launch():
    configs = ops.AOT_CONFIGS()
    names = {c["name"] for c in configs}
    assert len(names) == len(configs)
    for bits in (8, 4):
        for block in ops.BLOCK_SIZES:
            for tiles in ops._TILES_PER_PROGRAM:
                for dtype in ("fp32", "fp16", "bf16", "bf16,sr"):
                    assert f"adamw_update[bits={bits},block={block},tiles={tiles},{dtype}]" in names
    for dtype in ("fp32", "fp16", "bf16", "bf16,sr"):
        assert f"adamw_update[bits=32,block={ops._TILE},tiles=1,{dtype}]" in names
    for c in configs:
        params = c["kernel"].arg_names
        assert set(c["signature"]) == set(params), c["name"]
        assert set(c["constexprs"]) == {k for k, v in c["signature"].items() if v == "constexpr"}
