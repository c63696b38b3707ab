"""Outlier split: exact outliers, bounded error on the rest, Triton == reference bit for bit."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU

import math

import pytest
import torch

from ciuic_kernels import quant, sparse
from ciuic_kernels._backend import triton_available
from ciuic_kernels.specs import QuantSpec, SparseSpec
from test_quant import (
    DTYPE_EPS,
    DTYPE_TINY,
    DTYPES,
    SMALL_SHAPES,
    assert_bitwise_equal,
    assert_packed_equal,
    group_steps,
    make_input,
    per_element,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def heavy_tailed(n, dtype=torch.float32, seed=0):
    """Normal bulk with ~0.3% of values 30-300x larger (activation-like outliers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    spikes = torch.rand(n, generator=gen) < 0.003
    x[spikes] *= 30 + 270 * torch.rand(int(spikes.sum()), generator=gen)
    return x.to(dtype)


# ------------------------------------------------------------------ Triton == reference (interpreter)


@needs_triton
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1], ids=lambda f: f"fraction={f}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize("values", ["normal", "nonfinite"], ids=lambda v: f"values={v}")
def test_triton_matches_reference(values, dtype, fraction):
    spec = SparseSpec(fraction=fraction, bits=4, group_size=64, rounding="stochastic")
    nonfinite = values == "nonfinite"
    cases = [(name, make_input(shape, dtype, seed=3, nonfinite=nonfinite)) for name, shape in SMALL_SHAPES.items()]
    cases.append(("transposed (23,41)", make_input((41, 23), dtype, seed=4, nonfinite=nonfinite, transposed=True)))
    for name, x in cases:
        ref = sparse.encode(x, spec, seed=1, backend="torch")
        tri = sparse.encode(x, spec, seed=1, backend="triton")
        try:
            assert_packed_equal(tri, ref)
            expected = sparse.decode(ref, backend="torch")
            assert_bitwise_equal(sparse.decode(ref, backend="triton"), expected, "decode")
            assert_bitwise_equal(sparse.decode(tri, backend="triton"), expected, "decode")
        except AssertionError as error:
            raise AssertionError(f"shape {name}: {error}") from None
        assert expected.shape == x.shape and expected.dtype == x.dtype and expected.is_contiguous()


@needs_triton
@pytest.mark.parametrize("bits", [8, 2], ids=lambda b: f"bits={b}")
def test_triton_matches_reference_other_bits(bits):
    x = heavy_tailed(4097, torch.bfloat16, seed=bits)
    spec = SparseSpec(fraction=0.02, bits=bits, group_size=128)
    ref = sparse.encode(x, spec, backend="torch")
    assert_packed_equal(sparse.encode(x, spec, backend="triton"), ref)
    assert_bitwise_equal(sparse.decode(ref, backend="triton"), sparse.decode(ref, backend="torch"), "decode")


# ------------------------------------------------------------------ what is kept, and the error of the rest


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize("shape", [(3, 423, 213), (4097,)], ids=lambda s: f"shape={s}")
def test_outliers_exact_and_rest_within_half_a_step(shape, dtype):
    n = math.prod(shape)
    x = heavy_tailed(n, dtype, seed=n % 97).view(shape)
    spec = SparseSpec(fraction=0.01, bits=4, group_size=64)
    packed = sparse.encode(x, spec, backend="torch")
    x_hat = sparse.decode(packed, backend="torch")
    flat, flat_hat = x.reshape(-1), x_hat.reshape(-1)

    # The k = ceil(1% of n) largest |x| are the outliers, and they come back bit for bit.
    index = packed.tensors["outlier_index"]
    k = math.ceil(n / 100)
    assert index.dtype == torch.int32 and index.numel() == k
    is_outlier = torch.zeros(n, dtype=torch.bool)
    is_outlier[index.long()] = True
    assert flat[is_outlier].abs().min() >= flat[~is_outlier].abs().max()
    assert_bitwise_equal(flat_hat[is_outlier], flat[is_outlier], "outliers")
    assert_bitwise_equal(packed.tensors["outlier_value"], flat[index.long()], "outlier_value")

    # Every other element is within half a step of its group's quantization (the rest's own steps).
    rest = packed.tensors["rest"]
    minimum, step = group_steps(rest)
    step_e = per_element(step, n, 64)
    error = (flat.to(torch.float64) - flat_hat.to(torch.float64)).abs()
    slack = 2.0**-22 * (per_element(minimum.abs(), n, 64) + 15 * step_e)
    slack += DTYPE_EPS[dtype] / 2 * flat_hat.to(torch.float64).abs() + DTYPE_TINY[dtype]
    bad = (error > step_e / 2 + slack) & ~is_outlier
    assert not bool(bad.any()), f"{int(bad.sum())} non-outlier elements exceed half a step"

    # Outliers do not stretch their groups: each group's step fits the range of its non-outliers.
    x64 = flat.to(torch.float64)
    pad = (-n) % 64
    groups = torch.cat([x64, x64.new_zeros(pad)]).view(-1, 64)
    kept = torch.cat([~is_outlier, torch.zeros(pad, dtype=torch.bool)]).view(-1, 64)
    kept_max = groups.masked_fill(~kept, -math.inf).amax(1)
    kept_min = groups.masked_fill(~kept, math.inf).amin(1)
    assert bool((minimum <= kept_min).all() and (minimum >= kept_min - kept_min.abs() / 64).all())
    # the step is (range / 15) rounded up to bf16 (8 significant bits), at least 2**-126
    tight = step <= (kept_max - minimum) / 15 * (1 + 2.0**-7) * (1 + 1e-5)
    assert bool(((step == 2.0**-126) | tight).all())
    # Accounting: the rest, plus 4 bytes of index and one value per outlier.
    assert packed.nbytes == rest.nbytes + k * (4 + x.element_size())


def test_max_error_is_much_smaller_than_plain_quant_on_heavy_tails():
    x = heavy_tailed(64 * 1024, seed=5)
    spec = SparseSpec(fraction=0.01, bits=4, group_size=64)
    sparse_error = (sparse.decode(sparse.encode(x, spec, backend="torch")) - x).abs()
    quant_error = (quant.decode(quant.encode(x, spec.quant, backend="torch")) - x).abs()
    assert sparse_error.max() < 0.1 * quant_error.max(), (sparse_error.max(), quant_error.max())
    assert sparse_error.mean() < 0.5 * quant_error.mean(), (sparse_error.mean(), quant_error.mean())
    ratio = sparse.encode(x.bfloat16(), spec, backend="torch").nbytes / (x.numel() * 2)
    assert ratio < 0.33, ratio  # int4/g64 (0.273) + 1% outliers at 6 bytes each (0.03)


def test_outlier_count_uses_exact_decimal_fraction():
    # 0.01 * 300 is 3.0000000000000004 in binary floating point; the count must still be 3.
    x = torch.randn(300)
    assert sparse.encode(x, SparseSpec(fraction=0.01), backend="torch").tensors["outlier_index"].numel() == 3
    assert sparse.encode(x, SparseSpec(fraction=0.015), backend="torch").tensors["outlier_index"].numel() == 5


def test_zero_fraction_is_plain_quant():
    x = torch.randn(1000)
    packed = sparse.encode(x, SparseSpec(fraction=0.0, bits=2), backend="torch")
    assert packed.tensors["outlier_index"].numel() == 0
    assert_packed_equal(packed.tensors["rest"], quant.encode(x, QuantSpec(bits=2), backend="torch"))


# ------------------------------------------------------------------ special inputs and errors


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=needs_triton)], ids=lambda b: f"backend={b}"
)
def test_nonfinite_survive_and_are_not_outliers(backend, dtype):
    x = make_input((7, 50), dtype, nonfinite=True)
    x.view(-1)[3] = 1e4  # a finite outlier bigger than anything else
    spec = SparseSpec(fraction=0.05, rounding="stochastic")
    state = torch.get_rng_state()
    packed = sparse.encode(x, spec, seed=3, backend=backend)
    x_hat = sparse.decode(packed, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    index = packed.tensors["outlier_index"].long()
    assert bool(torch.isfinite(x.view(-1)[index]).all()) and 3 in index.tolist()
    assert index.numel() == math.ceil(0.05 * x.numel())  # of all elements: no host sync to count
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(x_hat), test(x))
    assert x_hat.view(-1)[3].item() == x.view(-1)[3].item()


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=needs_triton)], ids=lambda b: f"backend={b}"
)
def test_empty_and_zero_dim(backend):
    empty = torch.empty(2, 0)
    out = sparse.decode(sparse.encode(empty, SparseSpec(), backend=backend), backend=backend)
    assert out.shape == (2, 0) and out.dtype == torch.float32
    x = torch.tensor(1.5, dtype=torch.bfloat16)
    packed = sparse.encode(x, SparseSpec(fraction=0.5), backend=backend)
    assert packed.tensors["outlier_index"].tolist() == [0]  # the only element is the outlier
    out = sparse.decode(packed, backend=backend)
    assert out.shape == () and out.dtype == torch.bfloat16 and out.item() == 1.5


def test_input_that_requires_grad_leaves_no_graph():
    x = heavy_tailed(500).requires_grad_()
    packed = sparse.encode(x, SparseSpec(fraction=0.05), backend="torch")
    tensors = list(packed.tensors.values())[:2] + list(packed.tensors["rest"].tensors.values())
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)
    assert not sparse.decode(packed).requires_grad


def test_bad_arguments_raise_clear_errors():
    for fraction in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"fraction=.* allowed: a number in \[0, 1\)"):
            SparseSpec(fraction=fraction)
    with pytest.raises(ValueError, match=r"bits=16 .*8, 4, 2"):
        SparseSpec(bits=16)
    with pytest.raises(TypeError, match="SparseSpec"):
        sparse.encode(torch.randn(4), QuantSpec())
    with pytest.raises(ValueError, match="codec='sparse'"):
        sparse.decode(quant.encode(torch.randn(4), QuantSpec()))
