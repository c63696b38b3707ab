"""Python overhead of the activation engine on CPU, where the math is negligible.

* per op: a chain of elementwise ops on a tiny tensor that does not require grad (nothing is
  saved), with and without ``ciuic.compression`` entered: the cost of the op tracker (a
  ``TorchFunctionMode``) per torch function call;
* per saved tensor: forward + backward of a chain of ``tanh`` on a tensor just above
  ``min_numel`` (each saves its output), uncompressed vs each mode: the cost of pack + unpack
  (classification, accounting, encode and decode of 4096 elements by the CPU reference codecs:
  an upper bound of the host work, since on a GPU encode/decode are kernel launches) per saved tensor.

The budget: a 7B-shaped layer (hidden 4096, seq 4096, bf16) saves ~30 tensors per layer and runs
~0.5 TFLOP per layer forward+backward, about 1 ms on an H100; ciuic's host work for it must stay
well under that so the GPU never waits: ~30 saved tensors x (pack + unpack) + ~60 tracked ops.

    python benchmarks/engine_overhead.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_revision, result_key, write_json  # noqa: E402

import ciuic  # noqa: E402

MODES = ("lossless", "2:1", "4:1", "8:1")


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_op(ops: int, repeat: int) -> dict:
    x = torch.randn(8)

    def chain():
        y = x
        for _ in range(ops):
            y = torch.add(y, 1.0)

    plain = _median_seconds(chain, repeat)
    with ciuic.compression("4:1"):
        tracked = _median_seconds(chain, repeat)
    return {"ops": ops, "plain_us_per_op": 1e6 * plain / ops, "tracked_us_per_op": 1e6 * tracked / ops,
            "overhead_us_per_op": 1e6 * (tracked - plain) / ops}


def per_saved_tensor(saves: int, numel: int, repeat: int) -> dict:
    x0 = torch.randn(numel)
    rows = {}

    def chain():
        x = x0.clone().requires_grad_()
        y = x
        for _ in range(saves):
            y = torch.tanh(y)  # saves its output
        y.sum().backward()

    plain = _median_seconds(chain, repeat)
    for mode in MODES:
        with ciuic.compression(mode, seed=51):
            for _ in range(3):  # calibration and the plan
                chain()
            timed = _median_seconds(chain, repeat)
        rows[mode] = {"us_per_saved_tensor": 1e6 * (timed - plain) / saves}
    return {"saves": saves, "numel": numel, "plain_us_per_tanh_fwd_bwd": 1e6 * plain / saves, "modes": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    op = per_op(2000, args.repeat)
    print(f"op tracker: {op['plain_us_per_op']:.2f} us/op plain, {op['tracked_us_per_op']:.2f} us/op tracked "
          f"(+{op['overhead_us_per_op']:.2f} us)")
    saved = per_saved_tensor(200, 4096, args.repeat)
    for mode, row in saved["modes"].items():
        print(f"pack+unpack at {mode:8}: {row['us_per_saved_tensor']:.1f} us per saved tensor of 4096 fp32 elements")
    worst = max(row["us_per_saved_tensor"] for row in saved["modes"].values())
    budget = 30 * worst + 60 * op["overhead_us_per_op"]
    print(f"host time ciuic adds per 7B-shaped layer (30 saved tensors, 60 ops): {budget / 1000:.2f} ms")
    write_json(os.path.join(args.out, "engine_overhead.json"), result_key(),
               {"git": git_revision(), "per_op": op, "per_saved_tensor": saved,
                "per_7b_layer_ms": budget / 1000, "threads": 1})


if __name__ == "__main__":
    main()
