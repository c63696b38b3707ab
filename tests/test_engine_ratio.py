"""Acceptance ratios of the activation engine on five transformers models (CPU, random weights).

ratio = bytes the uncompressed forward keeps for backward (``SavedTensorMeter``) / bytes ciuic
keeps for the same forward (``stats().bytes_after``, after two warm-up training steps with the same
engine). Bounds: "2:1" >= 1.9, "4:1" >= 4.0, "8:1" >= 7.5, under fp32 and under bf16 autocast.
Cross-check: the heap ratio (glibc mallinfo2 bytes held by the graph, baseline / ciuic) agrees with
the accounting ratio within 15%. The measurement is ``benchmarks/activation_ratio.py``'s, so the
benchmark and this test cannot drift apart.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest

from ciuic.memory import heap_available

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "activation_ratio.py")
_spec = importlib.util.spec_from_file_location("ciuic_benchmark_activation_ratio", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses resolve the module by name
_spec.loader.exec_module(bench)

BOUNDS = {"2:1": 1.9, "4:1": 4.0, "8:1": 7.5}
# seq >= 256 (ViT: 256 patches + [CLS]). Batch 2, not 1, in bf16 too: a pack's fixed heap cost
# (~2.7 KB of tensor objects) would otherwise dominate the heap check at 8:1.
SHAPE = bench.Shape(hidden=128, layers=2, heads=4, batch=2, seq=256, vocab=512)
CASES = [(model, dtype, mode) for model in bench.MODELS for dtype in bench.DTYPES for mode in BOUNDS]


def _id(model: str, dtype: str, mode: str) -> str:
    return f"model={model}-dtype={dtype}-mode={mode}"


@functools.lru_cache(maxsize=None)
def _measured(model: str, dtype: str) -> dict:
    # one baseline and the three modes on one model instance, shared by all tests of (model, dtype)
    return bench.measure(model, dtype, tuple(BOUNDS), shape=SHAPE)


def _breakdown(record: dict, mode: str) -> str:
    m = record["modes"][mode]
    rows = [f"{cls}: {c['before']} -> {c['after']} B" for cls, c in
            sorted(m["by_class"].items(), key=lambda kv: -kv[1]["after"])]
    return (f"{record['description']}; baseline {record['baseline_bytes']} B, ciuic {m['bytes_after']} B "
            f"(engine's own before/after {m['engine_ratio']:.2f}); by class: " + "; ".join(rows))


@pytest.mark.parametrize("model,dtype,mode", [pytest.param(*c, id=_id(*c)) for c in CASES])
def test_ratio_meets_mode(model: str, dtype: str, mode: str) -> None:
    record = _measured(model, dtype)
    ratio = record["modes"][mode]["ratio"]
    assert ratio >= BOUNDS[mode], (
        f"{model} {dtype} mode {mode}: ratio {ratio:.3f} < {BOUNDS[mode]} — {_breakdown(record, mode)}")


@pytest.mark.skipif(not heap_available(), reason="needs glibc mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.parametrize("model,dtype,mode", [pytest.param(*c, id=_id(*c)) for c in CASES])
def test_heap_agrees_with_accounting(model: str, dtype: str, mode: str) -> None:
    record = _measured(model, dtype)
    m = record["modes"][mode]
    assert m["heap_ratio"] is not None, f"no heap growth measured: {record['baseline_heap_bytes']}, {m['heap_bytes']}"
    assert abs(m["heap_agreement"]) <= bench.HEAP_TOLERANCE, (
        f"{model} {dtype} mode {mode}: heap ratio {m['heap_ratio']:.3f} (baseline heap "
        f"{record['baseline_heap_bytes']} B / ciuic heap {m['heap_bytes']} B) vs accounting ratio "
        f"{m['ratio']:.3f} (baseline {record['baseline_bytes']} B / ciuic {m['bytes_after']} B): "
        f"{m['heap_agreement']:+.1%}, allowed ±{bench.HEAP_TOLERANCE:.0%}")
