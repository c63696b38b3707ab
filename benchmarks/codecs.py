"""Encode / decode throughput of every codec, against a plain ``copy_`` of the same input bytes.

GB/s = input bytes / seconds (1 GB = 1e9 bytes), median of ``--reps`` timed runs after warm-up: on
CUDA ``triton.testing.do_bench`` (it synchronizes), on CPU ``time.perf_counter``. On a GPU the
Triton kernels run, on a CPU the pure-PyTorch references (what CPU training uses); ``--backend``
forces one. The input is a bf16 tensor of normal values from a private generator (bool for the
bitmask); ``ratio_vs_bf16`` = 2 bytes x elements / ``Packed.nbytes`` (every byte the pack holds,
metadata included), ``rel_rmse`` = RMS round-trip error / RMS of the input.

Writes ``benchmarks/results/codecs.json`` (keyed by device, torch and ciuic versions; other keys in
the file are kept) and ``codecs.png``.

    python benchmarks/codecs.py --quick        # 256k elements, a few reps (CI)
    python benchmarks/codecs.py                # 4M elements on CPU, 64M on a GPU
    python benchmarks/codecs.py --codecs int4,fp8-e4m3-group --numel 1000000
    python benchmarks/codecs.py --overhead     # per-tensor µs on a 256-element tensor -> codec_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, git_revision, write_json  # noqa: E402

import ciuic_kernels
from ciuic_kernels import BitmaskSpec, FP8Spec, QuantSpec, SparseSpec, select_backend

try:
    import ciuic

    _CIUIC_VERSION = ciuic.__version__
except ImportError:  # the kernels package alone is enough for this benchmark
    _CIUIC_VERSION = "unknown"

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GROUP_SIZE = 64

# name -> spec; bitmask gets a bool input, every other codec the bf16 input
CODECS: dict[str, Any] = {
    "int8": QuantSpec(8, GROUP_SIZE, "nearest"),
    "int8-stochastic": QuantSpec(8, GROUP_SIZE, "stochastic"),
    "int4": QuantSpec(4, GROUP_SIZE, "nearest"),
    "int4-stochastic": QuantSpec(4, GROUP_SIZE, "stochastic"),
    "int2": QuantSpec(2, GROUP_SIZE, "nearest"),
    "int2-stochastic": QuantSpec(2, GROUP_SIZE, "stochastic"),
    "fp8-e4m3-group": FP8Spec("e4m3", "group", GROUP_SIZE),
    "fp8-e4m3-tensor": FP8Spec("e4m3", "tensor", GROUP_SIZE),
    "fp8-e5m2-group": FP8Spec("e5m2", "group", GROUP_SIZE),
    "fp8-e5m2-tensor": FP8Spec("e5m2", "tensor", GROUP_SIZE),
    "bitmask": BitmaskSpec(),
    "sparse-1%-int4": SparseSpec(0.01, 4, GROUP_SIZE, "nearest"),
}


def time_median(fn: Callable[[], Any], device: str, reps: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    if device == "cuda":
        import triton.testing

        # do_bench flushes the L2 cache between runs and synchronizes; its reps are in ms of run time
        ms = triton.testing.do_bench(fn, warmup=max(25, warmup), rep=max(100, reps), return_mode="median")
        return ms / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_codec(name: str, spec: Any, x: torch.Tensor, mask: torch.Tensor, backend: str, reps: int,
                warmup: int) -> dict:
    source = mask if isinstance(spec, BitmaskSpec) else x
    device = source.device.type
    in_bytes = source.numel() * source.element_size()
    copy_target = torch.empty_like(source)
    copy_s = time_median(lambda: copy_target.copy_(source), device, reps, warmup)
    packed = ciuic_kernels.encode(source, spec, seed=1, backend=backend)
    encode_s = time_median(lambda: ciuic_kernels.encode(source, spec, seed=1, backend=backend), device, reps, warmup)
    decode_s = time_median(lambda: ciuic_kernels.decode(packed, backend=backend), device, reps, warmup)
    out = ciuic_kernels.decode(packed, backend=backend)
    if isinstance(spec, BitmaskSpec):
        rel_rmse = 0.0 if torch.equal(out, source) else float("nan")
    else:
        err = (out.float() - source.float()).square().mean().sqrt()
        rel_rmse = float(err / source.float().square().mean().sqrt())
    return {
        "codec": name,
        "spec": {"type": type(spec).__name__, **spec.__dict__},
        "input_dtype": str(source.dtype).replace("torch.", ""),
        "numel": source.numel(),
        "input_bytes": in_bytes,
        "packed_bytes": packed.nbytes,
        "ratio_vs_bf16": 2 * source.numel() / packed.nbytes,
        "ratio_vs_input": in_bytes / packed.nbytes,
        "copy_gbps": in_bytes / copy_s / 1e9,
        "encode_gbps": in_bytes / encode_s / 1e9,
        "decode_gbps": in_bytes / decode_s / 1e9,
        "encode_vs_copy": copy_s / encode_s,
        "decode_vs_copy": copy_s / decode_s,
        "encode_ms": encode_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "copy_ms": copy_s * 1e3,
        "rel_rmse": rel_rmse,
    }


def print_table(rows: list[dict]) -> None:
    header = (f"{'codec':<17}{'ratio/bf16':>11}{'encode GB/s':>12}{'decode GB/s':>12}{'copy GB/s':>10}"
              f"{'enc/copy':>9}{'dec/copy':>9}{'rel RMSE':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['codec']:<17}{r['ratio_vs_bf16']:>11.2f}{r['encode_gbps']:>12.3f}{r['decode_gbps']:>12.3f}"
              f"{r['copy_gbps']:>10.2f}{r['encode_vs_copy']:>9.3f}{r['decode_vs_copy']:>9.3f}{r['rel_rmse']:>10.4f}")


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install ciuic[dev])")
        return
    names = [r["codec"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(rows) + 2), 4.5))
    ax.bar([x - 0.2 for x in xs], [r["encode_gbps"] for r in rows], 0.4, label="encode")
    ax.bar([x + 0.2 for x in xs], [r["decode_gbps"] for r in rows], 0.4, label="decode")
    copy = statistics.median(r["copy_gbps"] for r in rows)
    ax.axhline(copy, color="black", linestyle="--", linewidth=0.8, label=f"copy_ ({copy:.1f} GB/s)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("GB/s of input bytes")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def overhead(names: list[str], device: str, backend: str, numel: int, reps: int) -> list[dict]:
    """Per-tensor cost (µs) of encode and decode of a tiny tensor, where the math is negligible:
    the Python and dispatch overhead a saved tensor pays. Median of ``reps`` calls (perf_counter,
    no synchronization on CUDA: that is the host time of the launch, what a GPU step can hide)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen).to(torch.bfloat16).to(device)
    mask = (x > 0).to(torch.bfloat16)
    rows = []

    def median_us(fn):
        for _ in range(20):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    target = torch.empty_like(x)
    copy_us = median_us(lambda: target.copy_(x))
    for name in names:
        spec = CODECS[name]
        src = mask if isinstance(spec, BitmaskSpec) else x
        if isinstance(spec, BitmaskSpec):
            spec = BitmaskSpec(check=False)  # the engine's sync-free use
        packed = ciuic_kernels.encode(src, spec, backend=backend)
        rows.append({"codec": name, "numel": numel, "backend": backend, "copy_us": copy_us,
                     "encode_us": median_us(lambda: ciuic_kernels.encode(src, spec, backend=backend)),
                     "decode_us": median_us(lambda: ciuic_kernels.decode(packed, backend=backend))})
        print(f"  {name:<17} encode {rows[-1]['encode_us']:8.1f} µs  decode {rows[-1]['decode_us']:8.1f} µs", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256k elements and few repetitions (CI)")
    parser.add_argument("--overhead", action="store_true",
                        help="per-tensor µs of encode/decode on a tiny tensor (--numel, default 256) instead of GB/s")
    parser.add_argument("--codecs", default=",".join(CODECS), help=f"comma-separated subset of {','.join(CODECS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default=None, choices=("torch", "triton"),
                        help="default: triton on CUDA, the PyTorch reference on CPU")
    parser.add_argument("--numel", type=int, default=None, help="elements of the input (default by device)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median is reported)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(RESULTS, "codecs"), help="path without extension")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.codecs.split(",") if c.strip()]
    bad = [c for c in names if c not in CODECS]
    if bad or not names:
        raise SystemExit(f"--codecs {args.codecs!r} is not valid; allowed: a comma-separated subset of {', '.join(CODECS)}")
    cuda = args.device == "cuda"
    if args.overhead:
        backend = select_backend(torch.device(args.device), args.backend)
        numel, reps = args.numel or 256, args.reps or 500
        print(f"{device_name(args.device)}, backend {backend}: per-tensor cost, {numel} bf16 elements, median of {reps}")
        rows = overhead(names, args.device, backend, numel, reps)
        key = f"{device_name(args.device)} | torch {torch.__version__} | ciuic {_CIUIC_VERSION} | {backend}"
        report = {"benchmark": "codec_overhead", "device": device_name(args.device), "backend": backend,
                  "torch": torch.__version__, "git": git_revision(), "threads": torch.get_num_threads(),
                  "date": time.strftime("%Y-%m-%d"), "numel": numel, "reps": reps, "results": rows,
                  "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
                  "command": "python benchmarks/codecs.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        write_json(os.path.join(os.path.dirname(args.out), "codec_overhead.json"), key, report)
        return report
    numel = args.numel or (2**18 if args.quick else (2**26 if cuda else 2**22))
    reps = args.reps or (3 if args.quick else (100 if cuda else 15))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (25 if cuda else 3))
    backend = select_backend(torch.device(args.device), args.backend)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen).to(torch.bfloat16).to(args.device)
    mask = (torch.rand(numel, generator=gen) < 0.5).to(args.device)
    print(f"{device_name(args.device)}, backend {backend}, {numel} elements, median of {reps} after {warmup} warm-up",
          flush=True)
    rows = []
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        rows.append(bench_codec(name, CODECS[name], x, mask, backend, reps, warmup))
        r = rows[-1]
        print(f"  [{i}/{len(names)}] {name}: encode {r['encode_gbps']:.3f} GB/s, decode {r['decode_gbps']:.3f} GB/s "
              f"({time.perf_counter() - start:.1f}s)", flush=True)
    print()
    print_table(rows)

    key = f"{device_name(args.device)} | torch {torch.__version__} | ciuic {_CIUIC_VERSION}" + (" | quick" if args.quick else "")
    command = "python benchmarks/codecs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "benchmark": "codecs", "device": device_name(args.device), "backend": backend,
        "torch": torch.__version__, "ciuic": _CIUIC_VERSION, "python": sys.version.split()[0], "git": git_revision(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "command": command.strip(),
        "numel": numel, "reps": reps, "warmup": warmup, "timer": "triton.testing.do_bench" if cuda else "time.perf_counter",
        "results": rows,
    }
    png = args.out + ("_quick" if args.quick else "") + ".png"
    write_json(args.out + ".json", key, report)
    plot(rows, png, f"codec throughput, {numel} elements, backend {backend}; {device_name(args.device)}, "
         f"torch {torch.__version__}")
    print(f"wrote {args.out}.json ({key!r}) and {png}")
    return report


if __name__ == "__main__":
    main()
