"""bitmask codec: lossless 1-bit masks; the Triton pack/unpack equal the reference bit for bit."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import torch

from ciuic_kernels import bitmask
from ciuic_kernels.specs import BitmaskSpec

SHAPES = [(0,), (), (1,), (7,), (4097,), (3, 423, 213)]
KERNEL_SHAPES = [(0,), (), (1,), (7,), (9,), (4097,), (3, 41, 23)]
# name -> (dtype, nonzero value)
KINDS = {
    "bool": (torch.bool, True),
    "fp32{0,1}": (torch.float32, 1.0),
    "bf16{0,1}": (torch.bfloat16, 1.0),
    "fp16{0,1}": (torch.float16, 1.0),
    "fp32{0,1/(1-0.1)}": (torch.float32, 1 / 0.9),
    "bf16{0,1/(1-0.1)}": (torch.bfloat16, 1 / 0.9),
    "fp16{0,2}": (torch.float16, 2.0),
    "int64{0,1}": (torch.int64, 1),
    "fp32{0,-inf}": (torch.float32, float("-inf")),
}


def make_mask(shape, kind: str, seed: int = 0, p: float = 0.4) -> torch.Tensor:
    dtype, value = KINDS[kind]
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > p
    if dtype == torch.bool:
        return keep
    return torch.where(keep, torch.tensor(value, dtype=dtype), torch.tensor(0, dtype=dtype))


def expected_payload(x: torch.Tensor) -> torch.Tensor:
    """Independent packing: element 8j + r is bit r of byte j, built with Python ints."""
    flags = [bool(v) for v in (x.reshape(-1) != 0).tolist()]
    return torch.tensor(
        [sum(1 << r for r, f in enumerate(flags[j : j + 8]) if f) for j in range(0, len(flags), 8)],
        dtype=torch.uint8,
    )


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{actual.shape}/{actual.dtype} != {expected.shape}/{expected.dtype}"
    )
    bad = (actual.reshape(-1) != expected.reshape(-1)).nonzero().reshape(-1)
    assert torch.equal(actual, expected), (
        f"{bad.numel()} differ; first at flat {bad[:8].tolist()}: got {actual.reshape(-1)[bad[:8]].tolist()} "
        f"expected {expected.reshape(-1)[bad[:8]].tolist()}"
    )


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"input={k}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"shape={s}")
def test_reference_round_trip_is_lossless(shape, kind):
    x = make_mask(shape, kind)
    packed = bitmask.encode(x, BitmaskSpec(), backend="torch")
    assert (packed.codec, packed.bits, packed.shape, packed.dtype) == ("bitmask", 1.0, x.shape, x.dtype)
    out = bitmask.decode(packed, backend="torch")
    assert out.is_contiguous()
    assert_equal(out, x)
    if x.numel() <= 4097:
        assert_equal(packed.tensors["payload"], expected_payload(x))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"input={k}")
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: f"shape={s}")
def test_triton_matches_reference_bit_for_bit(shape, kind):
    x = make_mask(shape, kind, seed=1)
    reference = bitmask.encode(x, BitmaskSpec(), backend="torch")
    kernel = bitmask.encode(x, BitmaskSpec(), backend="triton")
    assert set(kernel.tensors) == set(reference.tensors)
    for name in reference.tensors:
        assert_equal(kernel.tensors[name], reference.tensors[name])
    assert_equal(bitmask.decode(reference, backend="triton"), x)


@pytest.mark.parametrize("backend", ["torch", "triton"], ids=lambda b: f"backend={b}")
@pytest.mark.parametrize("kind", ["bool", "bf16{0,1/(1-0.1)}"], ids=lambda k: f"input={k}")
def test_non_contiguous_inputs(kind, backend):
    base = make_mask((41, 46), kind, seed=2)
    for x in (base.t(), base[::3, 1::2], base.t()[5]):
        assert not x.is_contiguous()
        packed = bitmask.encode(x, BitmaskSpec(), backend=backend)
        assert_equal(packed.tensors["payload"], expected_payload(x))
        assert_equal(bitmask.decode(packed, backend=backend), x)


def test_dropout_mask_from_torch_is_stored_with_its_scale():
    p = 0.25
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(4097, generator=g) > p).to(torch.bfloat16) / (1 - p)  # what dropout saves
    packed = bitmask.encode(mask)
    assert packed.tensors["value"].dtype == torch.bfloat16
    assert packed.tensors["value"].item() == pytest.approx(1 / (1 - p), rel=1e-2)
    assert_equal(bitmask.decode(packed), mask)


def test_all_zero_tensor_round_trips():
    for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.int32):
        x = torch.zeros(3, 5, dtype=dtype)
        for backend in ("torch", "triton"):
            assert_equal(bitmask.decode(bitmask.encode(x, backend=backend), backend=backend), x)


@pytest.mark.parametrize("shape", [(4096,), (3, 423, 213)], ids=lambda s: f"shape={s}")
def test_nbytes_ratio(shape):
    n = torch.Size(shape).numel()
    floats = make_mask(shape, "bf16{0,1}")
    bools = make_mask(shape, "bool")
    ratio_bf16 = bitmask.encode(floats).nbytes / floats.nbytes
    ratio_bool = bitmask.encode(bools).nbytes / bools.nbytes
    assert bitmask.encode(bools).nbytes == -(-n // 8)  # the payload only
    assert bitmask.encode(floats).nbytes == -(-n // 8) + 2  # plus the bf16 value
    assert ratio_bf16 <= 0.07 and ratio_bool <= 0.13
    print(f"\n{shape}: ratio vs bf16 {ratio_bf16:.5f}, vs bool {ratio_bool:.5f}")


@pytest.mark.parametrize("backend", ["torch", "triton"], ids=lambda b: f"backend={b}")
def test_bad_inputs_raise_value_error_naming_the_value(backend):
    cases = [
        (torch.tensor([0.0, 1.0, 2.0, 1.0]), r"found value 2\.0 at flat index 2 .*allowed: \{0, 1\}"),
        (torch.tensor([0.0, 0.5, -0.5]), r"found value -0\.5 at flat index 2"),
        (torch.tensor([0.0, float("nan"), 1.0]), r"found value nan at flat index 1"),
        (torch.tensor([3, 0, 1]), r"found value 1 at flat index 2"),
    ]
    for x, message in cases:
        with pytest.raises(ValueError, match=message):
            bitmask.encode(x, BitmaskSpec(), backend=backend)
    with pytest.raises(ValueError, match=r"complex64.*allowed: torch.bool"):
        bitmask.encode(torch.zeros(3, dtype=torch.complex64), BitmaskSpec(), backend=backend)
    with pytest.raises(TypeError, match="BitmaskSpec"):
        bitmask.encode(torch.zeros(3), object(), backend=backend)


def test_torch_rng_state_untouched():
    x = make_mask((1000,), "fp32{0,1/(1-0.1)}")
    before = torch.get_rng_state()
    for backend in ("torch", "triton"):
        bitmask.decode(bitmask.encode(x, BitmaskSpec(), seed=7, backend=backend), backend=backend)
    assert torch.equal(torch.get_rng_state(), before)


def test_top_level_dispatch():
    import ciuic_kernels

    x = make_mask((5, 7), "bool")
    packed = ciuic_kernels.encode(x, BitmaskSpec())
    assert packed.codec == "bitmask"
    assert_equal(ciuic_kernels.decode(packed), x)


@pytest.mark.parametrize("backend", ["torch", "triton"], ids=lambda b: f"backend={b}")
def test_unchecked_spec_trusts_the_caller(backend):
    # check=False: no validation (no host sync); c is the first nonzero element, found on the device.
    for kind in ("fp32{0,1/(1-0.1)}", "bf16{0,1/(1-0.1)}", "int64{0,1}", "fp32{0,-inf}", "bool"):
        x = make_mask((4097,), kind, seed=3)
        packed = bitmask.encode(x, BitmaskSpec(check=False), backend=backend)
        assert_equal(packed.tensors["payload"], expected_payload(x))
        assert_equal(bitmask.decode(packed, backend=backend), x)
    # A tensor that is not a mask is the caller's responsibility: every nonzero decodes as the first one.
    x = torch.tensor([0.0, 0.0, 2.0, 3.0, 0.0, -1.0] * 700)
    out = bitmask.decode(bitmask.encode(x, BitmaskSpec(check=False), backend=backend), backend=backend)
    assert_equal(out, torch.where(x != 0, torch.tensor(2.0), torch.tensor(0.0)))
    zeros = torch.zeros(9000, dtype=torch.bfloat16)  # no nonzero element: c = 1, decodes to zeros
    packed = bitmask.encode(zeros, BitmaskSpec(check=False), backend=backend)
    assert packed.tensors["value"].item() == 1.0
    assert_equal(bitmask.decode(packed, backend=backend), zeros)
    with pytest.raises(ValueError, match=r"check='no' .*True, False"):
        BitmaskSpec(check="no")
