"""The ciuic demo: train a small LLaMA-style model on real text, with and without compression.

    python -m ciuic.demo                     # 150 steps, fp32, uncompressed vs 4:1 (a few minutes on 2 CPU cores)
    python -m ciuic.demo --modes lossless,4:1,8:1 --steps 300 --dtype bf16

Prints, for each run, the bytes autograd kept for backward in one forward pass, the ratio to the
uncompressed run, and the final train / held-out loss. Data: Python standard-library source bytes.
"""

from __future__ import annotations

import argparse
import time

import torch

import ciuic
from ciuic._workloads import byte_splits, train_charlm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ciuic.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    parser.add_argument("--modes", default="4:1", help="comma-separated ciuic modes (default 4:1)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="fp32 or bf16 autocast")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        ciuic.CompressionConfig.from_value(mode)  # a bad mode fails now, with the valid ones named
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")

    print(f"ciuic {ciuic.__version__} demo: tiny LLaMA (3 layers, hidden 128) on Python stdlib source, "
          f"batch {args.batch}x{args.seq}, {args.steps} steps, {args.dtype}, torch {torch.__version__}")
    data = byte_splits()
    results = []
    for mode in [None, *modes]:
        name = mode or "uncompressed"
        start = time.perf_counter()

        def progress(step: int, loss: float) -> None:
            if (step + 1) % 25 == 0 or step + 1 == args.steps:
                print(f"  [{name}] step {step + 1}/{args.steps}  loss {loss:.4f}  "
                      f"{time.perf_counter() - start:.0f}s", flush=True)

        results.append(train_charlm(mode, steps=args.steps, batch=args.batch, seq=args.seq,
                                    dtype=args.dtype, seed=args.seed, data=data, progress=progress))

    base = results[0]
    print()
    print(f"{'run':<14}{'kept for backward':>19}{'ratio':>8}{'train loss':>12}{'eval loss':>11}{'vs base':>9}{'time':>7}")
    for r in results:
        ratio = base.saved_bytes / r.saved_bytes if r.saved_bytes else float("nan")
        print(f"{r.mode:<14}{r.saved_bytes / 2**20:>15.2f} MiB{ratio:>7.2f}x{r.train_losses[-1]:>12.4f}"
              f"{r.eval_loss:>11.4f}{r.eval_loss / base.eval_loss - 1:>+9.2%}{r.seconds:>6.0f}s")
    print("\nkept for backward = bytes autograd holds for the backward pass after one forward "
          "(uncompressed: every saved storage; ciuic: every pack's exact nbytes).")


if __name__ == "__main__":
    main()
