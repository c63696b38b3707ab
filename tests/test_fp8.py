"""fp8 codec: torch's own fp8 casts as the oracle, the Triton kernels equal to the reference bit for bit."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import torch

from ciuic_kernels import fp8
from ciuic_kernels.specs import FP8Spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# format -> (torch dtype, max, exponent bias, mantissa bits)
FORMATS = {
    "e4m3": (torch.float8_e4m3fn, 448.0, 7, 3),
    "e5m2": (torch.float8_e5m2, 57344.0, 15, 2),
}
BACKENDS = ["torch", "triton"]
SCALINGS = ["group", "tensor"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaN == NaN and -0.0 != 0.0 in comparisons."""
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.shape}/{actual.dtype} != {expected.shape}/{expected.dtype}"
    )
    a, e = bits(actual.reshape(-1)), bits(expected.reshape(-1))
    bad = (a != e).nonzero().reshape(-1)
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} of {a.numel()} differ; first at flat {bad[:8].tolist()}: "
        f"got {actual.reshape(-1)[bad[:8]].tolist()} expected {expected.reshape(-1)[bad[:8]].tolist()}"
    )


def assert_packs_equal(a, b) -> None:
    assert (a.codec, a.shape, a.dtype, a.bits, dict(a.params)) == (b.codec, b.shape, b.dtype, b.bits, dict(b.params))
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert_same_bits(a.tensors[name], b.tensors[name], name)


def conversion_inputs(fmt: str, n_random: int, seed: int = 0) -> torch.Tensor:
    """fp32 values in [-max, max] that probe every rounding case of fp32 -> fp8, +-max included."""
    fp8_dtype, max_value, bias, mant = FORMATS[fmt]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype).to(torch.float64)
    grid = codes[torch.isfinite(codes) & (codes >= 0)].unique()  # every non-negative fp8 value, sorted
    mid = (grid[1:] + grid[:-1]) / 2  # ties: exact in fp32 (fp8 values have <= 4 significant bits)
    mid32 = mid.to(torch.float32)
    up = torch.nextafter(mid32, torch.tensor(float("inf")))
    down = torch.nextafter(mid32, torch.tensor(0.0))
    quarter = ((grid[1:] * 3 + grid[:-1]) / 4).to(torch.float32)
    special = torch.tensor(
        [0.0, 1e-45, 1e-42, 1.1754942e-38, 1.17549435e-38, 2.0 ** (-bias - mant) * 0.999, 2.0 ** -(bias + mant + 1)],
        dtype=torch.float32,
    )
    g = torch.Generator().manual_seed(seed)
    # random bit patterns, uniform over the fp32 encodings below max: every binade equally likely
    max_bits = int(torch.tensor(max_value, dtype=torch.float32).view(torch.int32))
    random = torch.randint(0, max_bits + 1, (n_random,), generator=g, dtype=torch.int64).to(torch.int32)
    random = random.view(torch.float32)
    positive = torch.cat([grid.to(torch.float32), mid32, up, down, quarter, special, random])
    return torch.cat([positive, -positive, torch.tensor([max_value, -max_value])])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"format={f}")
def test_payload_is_torch_fp8_cast_when_scale_is_one(fmt, backend):
    fp8_dtype, max_value, _, _ = FORMATS[fmt]
    x = conversion_inputs(fmt, n_random=6000 if backend == "triton" else 400_000)
    packed = fp8.encode(x, FP8Spec(fmt, "tensor"), backend=backend)
    # +-max is in x, so amax / max == 1 exactly: the payload is the bare conversion
    assert_same_bits(packed.tensors["scale"], torch.ones(1), "scale")
    assert_same_bits(packed.tensors["payload"], x.to(fp8_dtype).view(torch.uint8), "payload")
    assert_same_bits(fp8.decode(packed, backend=backend), x.to(fp8_dtype).to(torch.float32), "decoded")


def fp8_half_ulp(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """Half the fp8 spacing at |q| (float64), from the format's definition: 2**(e - mant) above the
    smallest normal 2**(1 - bias), the fixed subnormal step 2**(1 - bias - mant) below it."""
    _, _, bias, mant = FORMATS[fmt]
    a = q.abs().to(torch.float64).clamp_min(2.0 ** (1 - bias))
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(a), (e - 1 - mant).to(torch.int32)) / 2


def varied_input(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    n = x.numel()
    # runs of 32 elements at magnitudes 1e-3 .. 1e3: groups of very different scale
    magnitude = 10.0 ** torch.randint(-3, 4, (-(-n // 32),), generator=g).repeat_interleave(32)[:n]
    return x * magnitude.reshape(shape)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: f"scaling={s}")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"format={f}")
@pytest.mark.parametrize("group_size", [32, 256], ids=lambda g: f"group={g}")
def test_round_trip_error_is_at_most_half_an_fp8_ulp(fmt, scaling, group_size):
    _, max_value, _, _ = FORMATS[fmt]
    x = varied_input((3, 423, 213), seed=1)
    packed = fp8.encode(x, FP8Spec(fmt, scaling, group_size), backend="torch")
    scale = packed.tensors["scale"].to(torch.float64)
    flat = x.reshape(-1).to(torch.float64)
    n = flat.numel()
    if scaling == "group":
        amax = torch.nn.functional.pad(flat.abs(), (0, -n % group_size)).view(-1, group_size).amax(dim=1)
        per_element = scale.repeat_interleave(group_size)[:n]
    else:
        amax = flat.abs().amax().reshape(1)
        per_element = scale.expand(n)
    # fp32 division is correctly rounded; float64 then float32 rounds the same way (53 >= 2*24+2)
    assert_same_bits(scale.to(torch.float32), (amax / max_value).to(torch.float32), "scale")
    error = (fp8.decode(packed).reshape(-1).to(torch.float64) - flat).abs()
    # exact-math bound plus the two fp32 roundings (x / scale and code * scale)
    bound = fp8_half_ulp(flat / per_element, fmt) * per_element + flat.abs() * 2.0**-22
    assert (error <= bound).all(), f"max excess {(error - bound).max().item()}"
    relative = error / flat.abs().clamp_min(1e-30)
    print(f"\n{fmt}/{scaling}/g{group_size}: relative error median {relative.median().item():.4f}, "
          f"mean {relative.mean().item():.4f}")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"], ids=lambda d: f"dtype={d}")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"format={f}")
def test_decode_rounds_once_to_the_original_dtype(fmt, dtype):
    fp8_dtype = FORMATS[fmt][0]
    x = (torch.randn(4097, generator=torch.Generator().manual_seed(2)) * 30).to(DTYPES[dtype])
    packed = fp8.encode(x, FP8Spec(fmt, "group", 64), backend="torch")
    scale = packed.tensors["scale"].repeat_interleave(64)[: x.numel()]
    expected = (packed.tensors["payload"].view(fp8_dtype).to(torch.float32) * scale).to(DTYPES[dtype])
    assert_same_bits(fp8.decode(packed), expected)


SHAPES = {
    "(0,)": lambda g: torch.randn(0, generator=g),
    "()": lambda g: torch.randn((), generator=g),
    "(1,)": lambda g: torch.randn(1, generator=g),
    "(4097,)": lambda g: torch.randn(4097, generator=g),
    "(3,41,23)": lambda g: torch.randn(3, 41, 23, generator=g),
    "transposed": lambda g: torch.randn(41, 23, generator=g).t(),
    "strided": lambda g: torch.randn(3, 41, 46, generator=g)[:, ::2, 1::2],
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"shape={s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: f"scaling={s}")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"format={f}")
def test_triton_matches_reference_bit_for_bit(fmt, scaling, dtype, shape):
    g = torch.Generator().manual_seed(3)
    x = (SHAPES[shape](g) * 10.0 ** torch.randint(-3, 4, (), generator=g)).to(DTYPES[dtype])
    if x.numel() > 100:  # non-finite values ride along on the bigger shapes (written through views)
        x[tuple(d // 2 for d in x.shape)] = float("nan")
        x[tuple(0 for _ in x.shape)] = float("-inf")
    spec = FP8Spec(fmt, scaling, 64)
    reference = fp8.encode(x, spec, backend="torch")
    kernel = fp8.encode(x, spec, backend="triton")
    assert_packs_equal(kernel, reference)
    expected = fp8.decode(reference, backend="torch")
    assert expected.shape == x.shape and expected.dtype == x.dtype and expected.is_contiguous()
    assert_same_bits(fp8.decode(reference, backend="triton"), expected, "decoded")


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"format={f}")
def test_nan_and_inf_survive_exactly(fmt, dtype, backend):
    x = torch.randn(300, generator=torch.Generator().manual_seed(4)).to(DTYPES[dtype])
    positions = [0, 5, 64, 65, 200, 299]
    special = [float("nan"), float("inf"), float("-inf"), float("nan"), 3.0, float("-inf")]
    x[positions] = torch.tensor(special).to(x.dtype)
    if x.dtype == torch.float32:  # a NaN with a non-default payload is still a NaN (the canonical one)
        x[65] = torch.tensor([0x7FA00001], dtype=torch.int32).view(torch.float32)[0]
    canonical_nan = torch.tensor(float("nan"), dtype=x.dtype)
    for scaling in SCALINGS:
        packed = fp8.encode(x, FP8Spec(fmt, scaling, 64), backend=backend)
        assert set(packed.tensors) == {"payload", "scale"}  # in-band: no side channel
        out = fp8.decode(packed, backend=backend)
        expected = torch.where(torch.isnan(x), canonical_nan, x)
        assert_same_bits(out[[0, 5, 64, 65, 299]], expected[[0, 5, 64, 65, 299]], "non-finite")
        assert torch.isfinite(out[torch.isfinite(x)]).all()
        # the non-finite neighbours do not spoil the group scale: 3.0 comes back within fp8 precision
        assert abs(out[200].item() - 3.0) <= 3.0 * 2.0 ** -FORMATS[fmt][3]
        if fmt == "e4m3":  # e4m3 has no inf: groups (or the tensor) holding NaN/Inf are flagged
            flagged = packed.tensors["scale"] < 0
            if scaling == "group":
                groups = torch.nn.functional.pad(x.float(), (0, (-300) % 64)).view(-1, 64)
                assert torch.equal(flagged, ~torch.isfinite(groups).all(1))
            else:
                assert flagged.tolist() == [True]
        else:
            assert bool((packed.tensors["scale"] > 0).all())


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
def test_flagged_e4m3_group_keeps_fp8_precision(backend):
    # In a flagged e4m3 group finite values scale to +-416 (two codes mean +-Inf): still within half
    # an fp8 ulp (relative 2**-4) of the value, the group max included.
    x = torch.randn(128, generator=torch.Generator().manual_seed(2)) * 100
    x[3], x[70] = float("inf"), float("nan")
    out = fp8.decode(fp8.encode(x, FP8Spec("e4m3", "group", 64), backend=backend), backend=backend)
    finite = torch.isfinite(x)
    rel = ((out - x).abs() / x.abs().clamp_min(1e-3))[finite]
    assert rel.max().item() <= 2.0**-4 * (1 + 1e-6), rel.max().item()
    assert out[3].item() == float("inf") and torch.isnan(out[70])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
def test_signed_zero_and_tiny_values(backend):
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-44, 0.0] + [0.0] * 59 + [-0.0] * 3)
    for fmt in FORMATS:
        out = fp8.decode(fp8.encode(x, FP8Spec(fmt, "group", 64), backend=backend), backend=backend)
        assert torch.isfinite(out).all()
        assert torch.equal(torch.signbit(out[[0, 1, 64]]), torch.tensor([False, True, True]))
        assert (out - x).abs().max() <= 1e-44


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"backend={b}")
def test_torch_rng_state_untouched(backend):
    x = torch.randn(1000)
    before = torch.get_rng_state()
    for scaling in SCALINGS:
        fp8.decode(fp8.encode(x, FP8Spec("e4m3", scaling), seed=123, backend=backend), backend=backend)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256], ids=lambda g: f"group={g}")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"format={f}")
def test_nbytes_match_the_format_arithmetic(fmt, group_size):
    n = 256 * 100
    x = torch.randn(n).to(torch.bfloat16)
    group = fp8.encode(x, FP8Spec(fmt, "group", group_size), backend="torch")
    # 1 byte per element + one fp32 scale per group, against 2 bytes per bf16 element
    assert group.nbytes == n + 4 * (n // group_size)
    assert group.nbytes / x.nbytes == pytest.approx(0.5 + 4 / (2 * group_size))
    assert group.original_nbytes == x.nbytes
    tensor = fp8.encode(x, FP8Spec(fmt, "tensor"), backend="torch")
    assert tensor.nbytes == n + 4
    x32 = x.float()
    assert fp8.encode(x32, FP8Spec(fmt, "group", group_size)).nbytes / x32.nbytes == pytest.approx(
        0.25 + 4 / (4 * group_size)
    )
    print(f"\n{fmt} group={group_size}: ratio vs bf16 {group.nbytes / x.nbytes:.5f}; "
          f"tensor scaling {tensor.nbytes / x.nbytes:.5f}")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"int64.*allowed: torch.float32"):
        fp8.encode(torch.arange(4), FP8Spec())
    with pytest.raises(TypeError, match="FP8Spec"):
        fp8.encode(torch.randn(4), object())
    with pytest.raises(ValueError, match=r"'e3m4'.*allowed: 'e4m3', 'e5m2'"):
        FP8Spec(format="e3m4")
    packed = fp8.encode(torch.randn(4), FP8Spec())
    with pytest.raises(ValueError, match="allowed: 'torch', 'triton'"):
        fp8.decode(packed, backend="cuda")


def test_top_level_dispatch():
    import ciuic_kernels

    x = torch.randn(5, 7)
    packed = ciuic_kernels.encode(x, FP8Spec("e5m2", "tensor"))
    assert packed.codec == "fp8"
    assert_same_bits(ciuic_kernels.decode(packed), fp8.decode(packed))
