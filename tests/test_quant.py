"""Per-group k-bit quantization: Triton == reference bit for bit, error bounds, bias, layout, ratios."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU

import math

import pytest
import torch

from ciuic_kernels import quant
from ciuic_kernels._backend import triton_available
from ciuic_kernels._packed import Packed
from ciuic_kernels.specs import QuantSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Machine epsilon and smallest subnormal spacing of each output dtype (decode rounds to these).
DTYPE_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DTYPE_TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
SMALL_SHAPES = {"(0,)": (0,), "()": (), "(1,)": (1,), "(4097,)": (4097,), "(3,41,23)": (3, 41, 23)}

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so NaN compares equal to the same NaN (torch.equal does not)."""
    if t.is_floating_point():
        return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = _bits(actual).reshape(-1), _bits(expected).reshape(-1)
    if not torch.equal(a, e):
        where = (a != e).nonzero().view(-1)
        i = where[0].item()
        raise AssertionError(
            f"{what}: {where.numel()} of {a.numel()} differ; first at flat index {i}: "
            f"{actual.reshape(-1)[i].item()!r} != {expected.reshape(-1)[i].item()!r}"
        )


def assert_packed_equal(actual: Packed, expected: Packed) -> None:
    assert (actual.codec, actual.shape, actual.dtype, actual.bits) == (
        expected.codec,
        expected.shape,
        expected.dtype,
        expected.bits,
    )
    assert dict(actual.params) == dict(expected.params)
    assert set(actual.tensors) == set(expected.tensors)
    for name, value in expected.tensors.items():
        if isinstance(value, Packed):
            assert_packed_equal(actual.tensors[name], value)
        else:
            assert_bitwise_equal(actual.tensors[name], value, name)


def make_input(shape, dtype, *, seed=0, nonfinite=False, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    if transposed:
        x = (torch.randn(shape[::-1], generator=gen) * 3 + 1).to(dtype).transpose(0, -1)
        assert not x.is_contiguous()
        return x
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    if nonfinite and x.numel() >= 3:
        flat = x.view(-1)
        picks = torch.randperm(x.numel(), generator=gen)[: max(3, x.numel() // 50)]
        specials = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
        flat[picks] = specials.repeat(picks.numel() // 3 + 1)[: picks.numel()]
        if x.numel() >= 200:  # one whole group of 64 non-finite: its stats must fall back to 0
            flat[64:128] = math.nan
    return x


def group_steps(packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(minimum, step) per group in float64, read from the stored bf16 fields as documented: the
    step is |scale| (its sign is the group's non-finite flag)."""
    t = packed.tensors
    return t["minimum"].to(torch.float64), t["scale"].to(torch.float64).abs()


def per_element(values: torch.Tensor, n: int, group: int) -> torch.Tensor:
    return values.repeat_interleave(group)[:n]


def unpack_independently(payload: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes from the documented layout: element i sits at bits (i % (8 // bits)) * bits of byte i // (8 // bits)."""
    i = torch.arange(n)
    per = 8 // bits
    return (payload.to(torch.int64)[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)


# ------------------------------------------------------------------ Triton == reference (interpreter)


@needs_triton
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"], ids=lambda r: f"rounding={r}")
@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"bits={b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize("values", ["normal", "nonfinite"], ids=lambda v: f"values={v}")
def test_triton_matches_reference(values, dtype, bits, rounding):
    spec = QuantSpec(bits=bits, group_size=64, rounding=rounding)
    cases = [(name, make_input(shape, dtype, seed=7, nonfinite=values == "nonfinite")) for name, shape in SMALL_SHAPES.items()]
    cases.append(("transposed (23,41)", make_input((41, 23), dtype, seed=8, nonfinite=values == "nonfinite", transposed=True)))
    for name, x in cases:
        ref = quant.encode(x, spec, seed=11, backend="torch")
        tri = quant.encode(x, spec, seed=11, backend="triton")
        try:
            assert_packed_equal(tri, ref)
            expected = quant.decode(ref, backend="torch")
            assert_bitwise_equal(quant.decode(ref, backend="triton"), expected, "decode")
            assert_bitwise_equal(quant.decode(tri, backend="triton"), expected, "decode")
        except AssertionError as error:
            raise AssertionError(f"shape {name}: {error}") from None
        assert expected.shape == x.shape and expected.dtype == x.dtype and expected.is_contiguous()


@needs_triton
@pytest.mark.parametrize("group_size", [32, 128, 256], ids=lambda g: f"group={g}")
@pytest.mark.parametrize("bits", [4, 2], ids=lambda b: f"bits={b}")
def test_triton_matches_reference_group_sizes(group_size, bits):
    spec = QuantSpec(bits=bits, group_size=group_size, rounding="stochastic")
    for shape in [(1,), (33,), (4097,), (3, 41, 23)]:
        x = make_input(shape, torch.bfloat16, seed=group_size, nonfinite=True)
        ref = quant.encode(x, spec, seed=2**40 + 5, backend="torch")
        assert_packed_equal(quant.encode(x, spec, seed=2**40 + 5, backend="triton"), ref)
        assert_bitwise_equal(quant.decode(ref, backend="triton"), quant.decode(ref, backend="torch"), "decode")


@needs_triton
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"], ids=lambda r: f"rounding={r}")
@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"bits={b}")
def test_reference_in_chunks_matches_triton(monkeypatch, bits, rounding):
    """On CPU the reference runs in chunks of groups (a tensor without NaN/Inf through the shorter
    path, one with NaN/Inf through the general one): chunk boundaries, a NaN-free chunk next to a
    flagged one and a partial last group give the kernel's bits (the kernel sees the whole tensor
    at once)."""
    monkeypatch.setattr(quant, "_CPU_CHUNK_ELEMENTS", 256)  # 4 groups of 64 per chunk
    spec = QuantSpec(bits=bits, group_size=64, rounding=rounding)
    x = make_input((2000 + 37,), torch.bfloat16, seed=3)
    x[300] = math.nan  # chunk 1 flagged, chunks 0 and 2.. not
    x[1900:1903] = torch.tensor([math.inf, -math.inf, math.nan])
    finite = x.nan_to_num(nan=0.5, posinf=2.0, neginf=-2.0)
    # with NaN/Inf (bf16, fp32), without (bf16, fp16, fp32), huge finite values
    for case in (x, x.float(), finite, finite.half(), finite.float(), x.float()[:1000] * 1e30):
        ref = quant.encode(case, spec, seed=5, backend="torch")
        assert_packed_equal(quant.encode(case, spec, seed=5, backend="triton"), ref)
        assert_bitwise_equal(quant.decode(ref, backend="torch"), quant.decode(ref, backend="triton"), "decode")


@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"bits={b}")
def test_cpu_fast_path_equals_the_branch_free_path(monkeypatch, bits):
    """On CPU, chunks without NaN/Inf take a shorter path (switched by ``_BRANCH_ON_CPU_DATA``); it
    must give the bits of the branch-free path (checked against the kernel above) on normal data,
    huge finite values, and groups whose range overflows fp32 (an infinite step: decodes to NaN)."""
    monkeypatch.setattr(quant, "_CPU_CHUNK_ELEMENTS", 256)  # several chunks, a partial last group
    spec = QuantSpec(bits=bits, rounding="stochastic" if bits == 2 else "nearest")
    cases = [make_input((3, 1000), torch.bfloat16, seed=1), make_input((5, 301), torch.float16, seed=4), make_input((777,), torch.float32, seed=2) * 1e36,
             torch.tensor([-3e38, 3e38] * 64 + [1.0] * 64)]
    for x in cases:
        fast = quant.encode(x, spec, seed=9, backend="torch")
        fast_out = quant.decode(fast, backend="torch")
        monkeypatch.setattr(quant, "_BRANCH_ON_CPU_DATA", False)
        plain = quant.encode(x, spec, seed=9, backend="torch")
        assert_packed_equal(fast, plain)
        assert_bitwise_equal(fast_out, quant.decode(plain, backend="torch"), "decode")
        monkeypatch.setattr(quant, "_BRANCH_ON_CPU_DATA", True)


@needs_triton
def test_triton_matches_reference_extreme_ranges():
    # Tiny (subnormal-range) groups, huge fp32 values and constant groups next to wide ones.
    x = torch.cat(
        [
            torch.full((64,), 3.0),
            torch.randn(64) * 1e-39,
            torch.randn(64) * 1e30,
            torch.randn(64) * 1e-30,
            -torch.rand(64) - 5.0,
        ]
    )
    for bits in (8, 4, 2):
        spec = QuantSpec(bits=bits, group_size=64)
        ref = quant.encode(x, spec, backend="torch")
        assert_packed_equal(quant.encode(x, spec, backend="triton"), ref)
        assert_bitwise_equal(quant.decode(ref, backend="triton"), quant.decode(ref, backend="torch"), "decode")


# ------------------------------------------------------------------ error bounds (reference, large shapes)


@pytest.mark.parametrize("shape", [(3, 423, 213), (4097,)], ids=lambda s: f"shape={s}")
@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"bits={b}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=[f"dtype={k}" for k in DTYPES])
def test_nearest_error_is_at_most_half_a_step(shape, bits, dtype):
    group = 64
    x = make_input(shape, dtype, seed=bits)
    packed = quant.encode(x, QuantSpec(bits=bits, group_size=group), backend="torch")
    x_hat = quant.decode(packed, backend="torch")
    n = x.numel()
    minimum, step = group_steps(packed)
    step_e = per_element(step, n, group)
    x64, x_hat64 = x.reshape(-1).to(torch.float64), x_hat.reshape(-1).to(torch.float64)
    qmax = 2**bits - 1

    # The stored step covers the group range: (max - min_b) / qmax <= s, and the code is the tightest one.
    groups = torch.nn.functional.pad(x64, (0, (-n) % group), value=math.nan).view(-1, group)
    true_max = torch.where(groups.isnan(), -math.inf, groups).amax(1)
    true_min = torch.where(groups.isnan(), math.inf, groups).amin(1)
    raw = (true_max - minimum) / qmax
    # fp32 rounding of the division: a relative slack of 2**-22.
    assert bool((step >= raw * (1 - 2.0**-22)).all()), "a group step is smaller than its range / qmax"
    # The step is the smallest bf16 >= raw (8 significant bits: one bf16 ulp is step * 2**-7 at most),
    # or the floor 2**-126; no group of finite values is flagged.
    tight = (step == 2.0**-126) | (step * (1 - 2.0**-7) < raw * (1 + 1e-6))
    assert bool(tight.all()), "a group step is not the smallest bf16 step covering its group"
    assert not bool((packed.tensors["scale"] < 0).any()), "a finite group carries the non-finite flag"
    # The stored minimum is the largest bf16 <= the group min.
    assert bool((minimum <= true_min).all())
    bf16_ulp = torch.exp2(torch.floor(torch.log2(true_min.abs().clamp_min(2.0**-126))) - 7)
    assert bool((true_min - minimum < bf16_ulp).all())

    # Independent decode from the documented layout agrees with quant's decode (fp32 arithmetic only).
    codes = unpack_independently(packed.tensors["payload"], bits, n).to(torch.float64)
    rebuilt = per_element(minimum, n, group) + codes * step_e
    assert bool(codes.max() <= qmax)
    tolerance = 2.0**-22 * (per_element(minimum.abs(), n, group) + qmax * step_e)
    output_rounding = DTYPE_EPS[dtype] / 2 * x_hat64.abs() + DTYPE_TINY[dtype]
    assert bool(((x_hat64 - rebuilt).abs() <= tolerance + output_rounding).all())

    error = (x64 - x_hat64).abs()
    bound = step_e / 2 + tolerance + output_rounding
    bad = error > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} elements exceed s/2; worst at {int((error - bound).argmax())}: "
        f"error {error[bad].max().item():.3g}"
    )


def test_error_shrinks_as_bits_grow():
    x = torch.randn(8 * 4097, generator=torch.Generator().manual_seed(1))
    errors = {}
    for bits in (2, 4, 8):
        x_hat = quant.decode(quant.encode(x, QuantSpec(bits=bits, group_size=64), backend="torch"))
        errors[bits] = (x_hat - x).abs().mean().item()
    assert errors[2] > errors[4] > errors[8] > 0, errors
    # Each extra bit roughly halves the step: 4 bits vs 2 bits is ~5x, 8 vs 4 is ~17x.
    assert errors[2] / errors[4] > 3 and errors[4] / errors[8] > 10, errors


# ------------------------------------------------------------------ stochastic rounding


@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"bits={b}")
def test_stochastic_rounding_is_unbiased(bits):
    n_seeds, n = 256, 512
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(bits=bits, group_size=64, rounding="stochastic")
    errors = torch.stack(
        [quant.decode(quant.encode(x, spec, seed=seed, backend="torch")).to(torch.float64) - x for seed in range(n_seeds)]
    )
    # The grid does not depend on the seed: element i is rounded up with probability f, its position
    # between grid points, so its error has standard deviation s * sqrt(f (1 - f)).
    minimum, step = group_steps(quant.encode(x, spec, seed=0, backend="torch"))
    step = per_element(step, n, 64)
    position = (x.to(torch.float64) - per_element(minimum, n, 64)) / step
    f = position - position.floor()
    std = step * (f * (1 - f)).sqrt()
    # Per element: |mean| within 5 standard errors plus one hit's worth (seeds are fixed: no flakes).
    mean = errors.mean(0)
    per_element_ok = mean.abs() <= 5 * std / math.sqrt(n_seeds) + step / n_seeds + 1e-6 * step
    assert bool(per_element_ok.all()), f"biased elements: {(~per_element_ok).nonzero().view(-1)[:10].tolist()}"
    # Aggregate over all elements: the overall bias is within 4 standard errors of 0.
    assert abs(errors.mean().item()) < 4 * errors.std().item() / math.sqrt(errors.numel())
    # Stochastic is not nearest: the decode varies with the seed, and differs from nearest's.
    assert bool((errors.var(0) > 0).float().mean() > 0.9)
    nearest = quant.decode(quant.encode(x, QuantSpec(bits=bits, group_size=64), backend="torch"))
    stochastic = quant.decode(quant.encode(x, spec, seed=0, backend="torch"))
    assert not torch.equal(nearest, stochastic)


def test_stochastic_rounding_depends_only_on_the_seed():
    x = torch.randn(1000)
    spec = QuantSpec(bits=4, rounding="stochastic")
    a = quant.encode(x, spec, seed=5, backend="torch")
    assert_packed_equal(quant.encode(x, spec, seed=5, backend="torch"), a)
    assert not torch.equal(quant.encode(x, spec, seed=6, backend="torch").tensors["payload"], a.tensors["payload"])


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=needs_triton)], ids=lambda b: f"backend={b}"
)
def test_global_rng_is_untouched(backend):
    x = torch.randn(300)
    state = torch.get_rng_state()
    packed = quant.encode(x, QuantSpec(bits=2, rounding="stochastic"), seed=9, backend=backend)
    quant.decode(packed, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ layout, accounting, special inputs


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=needs_triton)], ids=lambda b: f"backend={b}"
)
def test_bit_layout(backend):
    # Values 0..qmax in one group give min 0, raw step 1, code 0: every code equals its value.
    nibbles = quant.encode(torch.arange(16.0), QuantSpec(bits=4, group_size=32), backend=backend)
    expected = torch.tensor([(2 * j) | ((2 * j + 1) << 4) for j in range(8)], dtype=torch.uint8)
    assert torch.equal(nibbles.tensors["payload"], expected)
    crumbs = quant.encode(torch.tensor([0.0, 1, 2, 3, 3, 2, 1, 0, 3]), QuantSpec(bits=2, group_size=32), backend=backend)
    assert torch.equal(crumbs.tensors["payload"], torch.tensor([0b11100100, 0b00011011, 0b11], dtype=torch.uint8))
    whole = quant.encode(torch.arange(256.0), QuantSpec(bits=8, group_size=256), backend=backend)
    assert torch.equal(whole.tensors["payload"], torch.arange(256).to(torch.uint8))
    for packed, values in ((nibbles, torch.arange(16.0)), (whole, torch.arange(256.0))):
        assert torch.equal(quant.decode(packed, backend=backend), values)


# The three-pass format (bf16 minimum + 8-bit scale code per group + a tensor-wide fp32 reference)
# kept 0.523 / 0.273 / 0.148 of bf16 bytes at g64; the one-pass format may cost at most 0.01 more.
@pytest.mark.parametrize("bits,before", [(8, 0.523), (4, 0.273), (2, 0.148)], ids=["int8", "int4", "int2"])
def test_nbytes_ratio_against_bf16(bits, before):
    from ciuic.policy import quant_nbytes

    for n in (64 * 1024, 4097, 1):
        x = torch.randn(n).to(torch.bfloat16)
        packed = quant.encode(x, QuantSpec(bits=bits, group_size=64), backend="torch")
        groups = -(-n // 64)
        # Payload + 2-byte minimum + 2-byte scale per group, nothing else.
        assert packed.nbytes == -(-n * bits // 8) + 4 * groups
        assert quant_nbytes(n, bits, 64) == packed.nbytes  # the policy's planner counts the same bytes
    ratio = quant.packed_nbytes(64 * 1024, bits, 64) / (64 * 1024 * 2)
    assert ratio <= before + 0.01, f"int{bits}/g64 ratio {ratio:.4f} > {before} + 0.01"


@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"bits={b}")
def test_groups_of_any_magnitude_keep_their_precision(bits):
    # Every group's step is absolute: a group 2**-60 small next to one 2**60 large keeps the same
    # relative precision (a step coded against a tensor-wide reference could not).
    gen = torch.Generator().manual_seed(bits)
    magnitudes = torch.exp2(torch.arange(-60, 61, 4).to(torch.float32)).repeat_interleave(64)
    x = torch.randn(magnitudes.numel(), generator=gen) * magnitudes
    packed = quant.encode(x, QuantSpec(bits=bits, group_size=64), backend="torch")
    x_hat = quant.decode(packed).to(torch.float64).view(-1, 64)
    groups = x.to(torch.float64).view(-1, 64)
    spread = groups.amax(1) - groups.amin(1)
    worst = ((x_hat - groups).abs().amax(1) / spread).max().item()
    # half a step of range / qmax, the step one bf16 ulp wide at most, the minimum rounded down to bf16
    assert worst <= 0.5 * (1 + 2.0**-7) / (2**bits - 1) + 2.0**-7, worst


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=[f"dtype={k}" for k in DTYPES])
@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=needs_triton)], ids=lambda b: f"backend={b}"
)
def test_nonfinite_values_survive(backend, dtype):
    x = make_input((5, 97), dtype, nonfinite=True)
    x.view(-1)[-1] = -math.inf
    x_hat = quant.decode(quant.encode(x, QuantSpec(bits=2, rounding="stochastic"), backend=backend), backend=backend)
    for name, test in (("nan", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(test(x_hat), test(x)), f"{name} positions changed"
    assert bool(torch.isfinite(x_hat[torch.isfinite(x)]).all())
    all_nan = torch.full((70,), math.nan, dtype=dtype)
    assert bool(quant.decode(quant.encode(all_nan, QuantSpec(), backend=backend), backend=backend).isnan().all())
    # The flag (sign of the stored scale) marks exactly the groups holding NaN/Inf.
    packed = quant.encode(x, QuantSpec(bits=4, group_size=32), backend=backend)
    groups = torch.nn.functional.pad(x.reshape(-1).float(), (0, (-x.numel()) % 32)).view(-1, 32)
    assert torch.equal(packed.tensors["scale"] < 0, ~torch.isfinite(groups).all(1))
    # In a flagged group finite values still decode within the group's range at 4 and 8 bits.
    for bits in (8, 4):
        x_hat = quant.decode(quant.encode(x, QuantSpec(bits=bits, group_size=32), backend=backend), backend=backend)
        finite = torch.isfinite(x)
        err = (x_hat[finite].float() - x[finite].float()).abs()
        assert err.max().item() <= (x[finite].float().amax() - x[finite].float().amin()).item() / (2**bits - 4) + 0.1


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=[f"dtype={k}" for k in DTYPES])
def test_empty_and_zero_dim(dtype):
    for shape in [(0,), (3, 0, 5)]:
        packed = quant.encode(torch.empty(shape, dtype=dtype), QuantSpec(), backend="torch")
        assert packed.nbytes == 0
        out = quant.decode(packed)
        assert out.shape == shape and out.dtype == dtype
    x = torch.tensor(-2.75, dtype=dtype)
    out = quant.decode(quant.encode(x, QuantSpec(bits=2), backend="torch"))
    assert out.shape == () and out.dtype == dtype
    assert abs(out.item() - x.item()) <= 1e-6 * 2.75


def test_non_contiguous_input_equals_its_contiguous_copy():
    x = torch.randn(40, 30)[::2, 1::3]
    spec = QuantSpec(bits=4)
    assert_packed_equal(quant.encode(x, spec, backend="torch"), quant.encode(x.contiguous(), spec, backend="torch"))
    expanded = torch.randn(1).expand(100)  # stride 0: reshape(-1) does not copy it
    packed = quant.encode(expanded, spec, backend="torch")
    assert_packed_equal(packed, quant.encode(expanded.contiguous(), spec, backend="torch"))
    out = quant.decode(packed)
    # A constant group decodes within half a step of its value; the step spans the gap between
    # the value and its bf16 round-down (at most 2**-8 of it) over 15 levels.
    assert out.is_contiguous() and out.shape == expanded.shape
    assert (out - expanded).abs().max() <= expanded.abs().max() * 2.0**-8 / 15


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"bits=3 .*8, 4, 2"):
        QuantSpec(bits=3)
    with pytest.raises(ValueError, match=r"group_size=48 .*32, 64, 128, 256"):
        QuantSpec(group_size=48)
    with pytest.raises(ValueError, match=r"rounding='up' .*'nearest', 'stochastic'"):
        QuantSpec(rounding="up")
    with pytest.raises(ValueError, match=r"torch.int64.*torch.float32"):
        quant.encode(torch.arange(4), QuantSpec())
    with pytest.raises(TypeError, match="QuantSpec"):
        quant.encode(torch.randn(4), {"bits": 4})
    with pytest.raises(ValueError, match="seed=-1"):
        quant.encode(torch.randn(4), QuantSpec(), seed=-1)
    with pytest.raises(ValueError, match="'cuda'.*'torch', 'triton'"):
        quant.encode(torch.randn(4), QuantSpec(), backend="cuda")
    other = Packed(codec="fp8", shape=torch.Size([1]), dtype=torch.float32, bits=8, tensors={})
    with pytest.raises(ValueError, match="codec='quant'"):
        quant.decode(other)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=needs_triton)], ids=lambda b: f"backend={b}"
)
def test_input_that_requires_grad_leaves_no_graph(backend):
    # A pack holding a grad_fn would keep the activation alive and save no memory.
    x = make_input((5, 60), torch.float32, nonfinite=True).requires_grad_()
    packed = quant.encode(x, QuantSpec(rounding="stochastic"), backend=backend)
    assert all(t.grad_fn is None and not t.requires_grad for t in packed.tensors.values())
    assert not quant.decode(packed, backend=backend).requires_grad


def test_top_level_dispatch():
    import ciuic_kernels

    x = torch.randn(3, 100)
    packed = ciuic_kernels.encode(x, QuantSpec(bits=8), seed=1)
    assert packed.codec == "quant"
    assert_packed_equal(packed, quant.encode_reference(x, QuantSpec(bits=8), seed=1))
    assert_bitwise_equal(ciuic_kernels.decode(packed), quant.decode_reference(packed), "decode")
