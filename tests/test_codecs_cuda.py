"""The codecs' compiled Triton kernels on a real GPU, with the CPU reference as the oracle.

The rest of the codec tests run the kernels through the Triton interpreter on CPU tensors (this
process has TRITON_INTERPRET=1, see conftest.py). When CUDA is present, this file runs the same
bit-for-bit comparisons with the kernels compiled for the GPU, in a subprocess without the
interpreter: every codec, bit width, rounding, dtype, odd shapes and NaN/Inf, plus
``torch.cuda.set_sync_debug_mode("error")`` around encode + decode (no host sync). On a CPU-only
machine the same check runs through the interpreter, so the script cannot rot.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _specs():
    from ciuic_kernels import BitmaskSpec, FP8Spec, QuantSpec, SparseSpec

    specs = [QuantSpec(b, g, r) for b in (8, 4, 2) for g in (32, 256) for r in ("nearest", "stochastic")]
    specs += [FP8Spec(f, s, 64) for f in ("e4m3", "e5m2") for s in ("group", "tensor")]
    specs += [SparseSpec(0.01, 4, 64, "stochastic"), BitmaskSpec(check=False)]
    return specs


# On CPU the interpreter is slow and the other codec tests cover it: a small run keeps the script alive.
_DTYPES = {"cuda": (torch.float32, torch.bfloat16, torch.float16), "cpu": (torch.bfloat16,)}
_SHAPES = {"cuda": ((1,), (4097,), (3, 41, 23), (70_000,)), "cpu": ((1,), (700,))}


def _bits(t):
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _same(a, b, what):
    a, b = _bits(a), _bits(b)
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    if not torch.equal(a, b):
        bad = (a.reshape(-1) != b.reshape(-1)).nonzero().reshape(-1)
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} differ, first at {bad[:5].tolist()}")


def _same_pack(a, b, what):
    assert set(a.tensors) == set(b.tensors), what
    for name, value in a.tensors.items():
        if hasattr(value, "tensors"):
            _same_pack(value, b.tensors[name], f"{what}.{name}")
        else:
            _same(value, b.tensors[name], f"{what}.{name}")


def parity(device: str) -> int:
    """Compare the Triton kernels on ``device`` with the reference on CPU; returns the cases checked."""
    import ciuic_kernels
    from ciuic_kernels import BitmaskSpec

    gen = torch.Generator().manual_seed(0)
    cases = 0
    for spec in _specs():
        for dtype in _DTYPES[device]:
            for shape in _SHAPES[device]:
                x = (torch.randn(shape, generator=gen) * 3).to(dtype)
                if isinstance(spec, BitmaskSpec):
                    x = (x > 0).to(dtype) * 1.5
                elif x.numel() > 10:
                    x.view(-1)[[1, 5, 9]] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
                ref = ciuic_kernels.encode(x, spec, seed=7, backend="torch")
                xd = x.to(device)
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    tri = ciuic_kernels.encode(xd, spec, seed=7, backend="triton")
                    out = ciuic_kernels.decode(tri, backend="triton")
                    out_of_ref = ciuic_kernels.decode(
                        ref if device == "cpu" else _to(ref, device), backend="triton")
                finally:
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
                what = f"{spec} {dtype} {shape}"
                _same_pack(tri, ref, what)
                expected = ciuic_kernels.decode(ref, backend="torch")
                _same(out, expected, what + " decode")
                _same(out_of_ref, expected, what + " decode of the reference pack")
                cases += 1
    return cases


def _to(packed, device):
    import dataclasses

    tensors = {k: (_to(v, device) if hasattr(v, "tensors") else v.to(device)) for k, v in packed.tensors.items()}
    return dataclasses.replace(packed, tensors=tensors)


def _run(device: str, interpret: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_codecs_cuda as t; print(t.parity({device!r}), 'cases')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    assert int(done.stdout.split()[-2]) == len(_specs()) * len(_DTYPES[device]) * len(_SHAPES[device])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled kernels on a GPU)")
def test_compiled_kernels_on_cuda_equal_the_reference_bit_for_bit_without_host_syncs():
    _run("cuda", interpret=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU test above runs instead")
def test_the_parity_script_runs_through_the_interpreter():
    _run("cpu", interpret=True)
