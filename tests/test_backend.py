"""Backend selection rules and the counter-based RNG shared by the Triton kernels and the references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import math

import pytest
import torch
import triton
import triton.language as tl

import ciuic_kernels.quant
from ciuic_kernels import _backend
from ciuic_kernels._backend import select_backend
from ciuic_kernels._rng import seed_keys, uniform_like_reference, uniform_reference, uniform_triton

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CIUIC_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return monkeypatch


# ----------------------------------------------------------------------------------------------
# select_backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unset", [None, "", "auto", " AUTO "], ids=lambda v: f"CIUIC_BACKEND={v!r}")
def test_default_is_triton_on_cuda_and_reference_on_cpu(clean_env, unset):
    if unset is not None:
        clean_env.setenv("CIUIC_BACKEND", unset)
    assert select_backend(CPU) == "torch"
    assert select_backend(CUDA) == "triton"


def test_environment_torch_forces_the_reference_everywhere(clean_env):
    clean_env.setenv("CIUIC_BACKEND", "torch")
    assert select_backend(CPU) == "torch"
    assert select_backend(CUDA) == "torch"
    clean_env.setenv("CIUIC_BACKEND", " Torch ")  # the variable is read leniently
    assert select_backend(CUDA) == "torch"


def test_environment_triton_forces_the_kernels(clean_env):
    clean_env.setenv("CIUIC_BACKEND", "triton")
    assert select_backend(CPU) == "triton"  # allowed because TRITON_INTERPRET=1
    assert select_backend(CUDA) == "triton"


def test_explicit_argument_wins_over_the_environment(clean_env):
    clean_env.setenv("CIUIC_BACKEND", "triton")
    assert select_backend(CUDA, "torch") == "torch"
    clean_env.setenv("CIUIC_BACKEND", "torch")
    assert select_backend(CPU, "triton") == "triton"
    clean_env.setenv("CIUIC_BACKEND", "nonsense")
    assert select_backend(CPU, "torch") == "torch"  # the bad variable is never consulted


@pytest.mark.parametrize("bad", ["cuda", "numpy", "TRITON-X"], ids=lambda v: f"value={v}")
def test_bad_values_raise_value_error_naming_the_allowed_ones(clean_env, bad):
    with pytest.raises(ValueError, match=rf"{bad.lower()!r}.*allowed: 'torch', 'triton'"):
        select_backend(CPU, bad.lower())
    clean_env.setenv("CIUIC_BACKEND", bad)
    with pytest.raises(ValueError, match=r"allowed: 'torch', 'triton'"):
        select_backend(CPU)


@pytest.mark.parametrize("interpret", [None, "0", ""], ids=lambda v: f"TRITON_INTERPRET={v!r}")
def test_triton_on_cpu_without_the_interpreter_raises(clean_env, interpret):
    if interpret is None:
        clean_env.delenv("TRITON_INTERPRET")
    else:
        clean_env.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(CPU, "triton")
    assert select_backend(CUDA, "triton") == "triton"  # CUDA needs no interpreter
    assert select_backend(CPU) == "torch"


def test_without_triton_installed(clean_env):
    clean_env.setattr(_backend, "triton_available", lambda: False)
    assert select_backend(CUDA) == "torch"  # the default falls back quietly
    with pytest.raises(RuntimeError, match="triton is not installed"):
        select_backend(CUDA, "triton")


def test_codec_dispatch_follows_the_environment(clean_env):
    from ciuic_kernels import bitmask

    calls = []
    clean_env.setattr(bitmask, "encode_reference", lambda x, spec, seed=0: calls.append("torch"))
    clean_env.setattr(bitmask, "encode_triton", lambda x, spec, seed=0: calls.append("triton"))
    x = torch.ones(3, dtype=torch.bool)
    bitmask.encode(x)
    clean_env.setenv("CIUIC_BACKEND", "triton")
    bitmask.encode(x)
    bitmask.encode(x, backend="torch")
    assert calls == ["torch", "triton", "torch"]


# ----------------------------------------------------------------------------------------------
# Counter-based RNG
# ----------------------------------------------------------------------------------------------


@triton.jit
def _uniform_kernel(offsets_ptr, out_ptr, n, k1, k2, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    counter = tl.load(offsets_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, uniform_triton(k1, k2, counter), mask=mask)


def uniform_from_kernel(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    out = torch.empty(offsets.numel(), dtype=torch.float32)
    k1, k2 = seed_keys(seed)
    block = 1024
    _uniform_kernel[(triton.cdiv(offsets.numel(), block),)](offsets, out, offsets.numel(), k1, k2, BLOCK=block)
    return out


SEEDS = [0, 1, 12345, 2**32 + 7, 2**63 - 1]


@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64], ids=lambda d: f"offsets={str(d)[6:]}")
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed={s}")
def test_uniform_triton_equals_reference_bit_for_bit(seed, offset_dtype):
    offsets = torch.arange(5000, dtype=torch.int64)
    if offset_dtype == torch.int64:  # counters past 2**32 wrap the same way in both
        offsets = torch.cat([offsets, offsets + 2**32 - 2500, offsets + 2**40])
    offsets = offsets.to(offset_dtype)
    kernel = uniform_from_kernel(seed, offsets)
    reference = uniform_reference(seed, offsets)
    differ = (kernel.view(torch.int32) != reference.view(torch.int32)).nonzero().reshape(-1)
    assert differ.numel() == 0, f"differ at {differ[:8].tolist()}: {kernel[differ[:8]]} vs {reference[differ[:8]]}"
    assert (kernel >= 0).all() and (kernel < 1).all()
    assert kernel.mean().item() == pytest.approx(0.5, abs=6 * math.sqrt(1 / 12 / kernel.numel()))


@pytest.mark.parametrize("seed", [0, 99, 2**40 + 3], ids=lambda s: f"seed={s}")
def test_uniform_statistics(seed):
    n = 1 << 20
    u = uniform_like_reference(seed, n).to(torch.float64)
    assert (u >= 0).all() and (u < 1).all()
    # mean 1/2 (sd sqrt(1/12/n)), variance 1/12 (sd sqrt((1/80 - 1/144)/n)); 6 sigma bounds
    assert abs(u.mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 6 * math.sqrt((1 / 80 - 1 / 144) / n)
    # flat histogram: every one of 64 bins within 6 binomial sigma
    counts = torch.histc(u.float(), bins=64, min=0, max=1)
    expected = n / 64
    assert (counts - expected).abs().max().item() < 6 * math.sqrt(expected * (1 - 1 / 64))
    # neighbouring counters (and the same counter under another seed) are uncorrelated
    centered = u - 0.5
    lag1 = (centered[1:] * centered[:-1]).mean().item() * 12
    other = (uniform_like_reference(seed + 1, n).to(torch.float64) - 0.5) * centered
    assert abs(lag1) < 6 / math.sqrt(n)
    assert abs(other.mean().item() * 12) < 6 / math.sqrt(n)


def test_uniform_is_a_pure_function_of_seed_and_counter():
    offsets = torch.tensor([0, 1, 2, 3, 1000, 7])
    a = uniform_reference(5, offsets)
    assert torch.equal(a, uniform_reference(5, offsets))
    assert torch.equal(a[[4, 1]], uniform_reference(5, torch.tensor([1000, 1])))  # order-free
    assert not torch.equal(a, uniform_reference(6, offsets))


def test_torch_rng_state_untouched():
    before = torch.get_rng_state()
    uniform_like_reference(3, 10_000)
    uniform_from_kernel(3, torch.arange(2048))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None], ids=lambda v: f"seed={v!r}")
def test_bad_seeds_raise_value_error(bad):
    with pytest.raises(ValueError, match=r"seed=.*allowed: a non-negative int"):
        seed_keys(bad)


# ----------------------------------------------------------------------------------------------
# No host syncs: encode + decode of every codec never turns a tensor into a Python value
# ----------------------------------------------------------------------------------------------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import ciuic_kernels  # noqa: E402
from ciuic_kernels.specs import BitmaskSpec, FP8Spec, QuantSpec, SparseSpec  # noqa: E402

# ATen ops that move data to the host or whose output size depends on the data (a sync on a GPU).
_SYNCING_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose",
    "aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave",
}  # fmt: skip
_PYTHON_CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class _SyncCounter(TorchDispatchMode):
    """Counts syncing ATen ops (dispatch level) and Tensor -> Python conversions (Python level)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNCING_OPS and not (name == "aten::repeat_interleave" and isinstance(args[1], int)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_syncs(monkeypatch):
    counter = _SyncCounter()
    # On CPU the quant reference branches on the data (a host read is free there); what must be
    # sync-free is the branch-free path it runs on CUDA, which this switch selects.
    monkeypatch.setattr(ciuic_kernels.quant, "_BRANCH_ON_CPU_DATA", False)

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            counter.seen.append(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    for name in _PYTHON_CONVERSIONS:
        wrap(name)
    return counter


SYNC_FREE_SPECS = {
    **{f"quant{b}-{r}": QuantSpec(b, 64, r) for b in (8, 4, 2) for r in ("nearest", "stochastic")},
    "quant4-g128": QuantSpec(4, 128),
    **{f"fp8-{f}-{s}": FP8Spec(f, s) for f in ("e4m3", "e5m2") for s in ("group", "tensor")},
    "bitmask-unchecked": BitmaskSpec(check=False),
    **{f"sparse{b}": SparseSpec(0.01, b) for b in (8, 4, 2)},
}


@pytest.mark.parametrize("nonfinite", [False, True], ids=lambda v: f"nonfinite={v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: f"dtype={str(d)[6:]}")
@pytest.mark.parametrize("name", SYNC_FREE_SPECS, ids=lambda n: f"codec={n}")
def test_encode_decode_make_no_host_sync(count_syncs, name, dtype, nonfinite):
    spec = SYNC_FREE_SPECS[name]
    gen = torch.Generator().manual_seed(0)
    if isinstance(spec, BitmaskSpec):
        x = (torch.rand(3, 1000, generator=gen) > 0.3).to(dtype) * 1.25
    else:
        x = torch.randn(3, 1000, generator=gen).to(dtype)
        if nonfinite:
            x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    with count_syncs:
        packed = ciuic_kernels.encode(x, spec, seed=5, backend="torch")
        out = ciuic_kernels.decode(packed, backend="torch")
    assert count_syncs.seen == [], f"{name}: host syncs {count_syncs.seen}"
    # the counter is live: the same conversions outside the codecs are seen
    with count_syncs:
        bool(torch.isfinite(out).all())
    assert count_syncs.seen, "the sync counter saw nothing: it is not measuring"
    if nonfinite and not isinstance(spec, BitmaskSpec):
        assert torch.equal(torch.isnan(out), torch.isnan(x)) and torch.equal(torch.isinf(out), torch.isinf(x))


def test_checked_bitmask_syncs_once_and_says_so(count_syncs):
    # The default BitmaskSpec() validates {0, c}: one documented host sync (bool of the check).
    x = (torch.rand(4000) > 0.5).float()
    with count_syncs:
        ciuic_kernels.encode(x, BitmaskSpec(), backend="torch")
    assert count_syncs.seen == ["Tensor.__bool__", "aten._local_scalar_dense.default"], count_syncs.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU check of the same claim")
@pytest.mark.parametrize("name", SYNC_FREE_SPECS, ids=lambda n: f"codec={n}")
def test_triton_codecs_make_no_host_sync_on_cuda(name):
    spec = SYNC_FREE_SPECS[name]
    x = torch.randn(3, 100_000, device="cuda").to(torch.bfloat16)
    if isinstance(spec, BitmaskSpec):
        x = (x > 0).to(torch.bfloat16)
    x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf]) if not isinstance(spec, BitmaskSpec) else x[0, :3]
    ciuic_kernels.decode(ciuic_kernels.encode(x, spec, backend="triton"), backend="triton")  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ciuic_kernels.decode(ciuic_kernels.encode(x, spec, seed=3, backend="triton"), backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape
