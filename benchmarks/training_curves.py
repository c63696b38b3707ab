"""Loss curves of the same char-level LLaMA run, uncompressed vs each ciuic mode.

A LLaMA-style causal LM (transformers LlamaConfig, hidden 128, intermediate 384, 3 layers, 4 heads,
SDPA) trained on Python standard-library source bytes, batch 16 x 128, AdamW lr 1e-3, same seed and
data for every run; eval loss = mean of 20 held-out batches. Writes JSON and a PNG.

Why lr 1e-3 and not the 2e-3 of shared/research: at 2e-3 the uncompressed run is past its stable
learning rate (eval 2.08 at 300 steps vs 1.82 at 1e-3), and quantization noise then *lowers* the
loss (it damps Adam's steps): compressed runs looked 1-7% better than the baseline, which hides
any real accuracy cost. At 1e-3 the baseline is strong and a cost would show.

    python benchmarks/training_curves.py                      # 300 steps, fp32, all modes
    python benchmarks/training_curves.py --steps 50 --modes 4:1 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import ciuic
from ciuic._workloads import byte_splits, train_charlm

BOUNDS = {"lossless": 0.0, "2:1": 0.005, "4:1": 0.01, "8:1": 0.03}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--modes", default="lossless,2:1,4:1,8:1")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "training_curves"))
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        ciuic.CompressionConfig.from_value(m)  # validate before spending minutes

    data = byte_splits()
    runs = {}
    for mode in [None, *modes]:
        name = mode or "uncompressed"
        t0 = time.perf_counter()

        def progress(step: int, loss: float, name: str = name) -> None:
            if step % 25 == 0 or step == args.steps - 1:
                print(f"  [{name}] step {step + 1}/{args.steps} loss {loss:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)

        result = train_charlm(mode, steps=args.steps, dtype=args.dtype, seed=args.seed, data=data, lr=args.lr,
                              progress=progress)
        runs[name] = result.to_dict()
        print(f"{name}: eval loss {result.eval_loss:.4f}, kept for backward {result.saved_bytes / 2**20:.1f} MiB, "
              f"{result.seconds:.0f}s", flush=True)

    base = runs["uncompressed"]
    summary = []
    for name, run in runs.items():
        rel = run["eval_loss"] / base["eval_loss"] - 1
        ratio = base["saved_bytes"] / run["saved_bytes"] if run["saved_bytes"] else float("nan")
        bound = BOUNDS.get(name)
        summary.append({"mode": name, "eval_loss": run["eval_loss"], "relative": rel,
                        "saved_bytes": run["saved_bytes"], "ratio": ratio, "bound": bound,
                        "within_bound": None if bound is None else abs(rel) <= bound or rel <= 0,
                        "seconds": run["seconds"]})
    print(f"\n{'mode':<14}{'eval loss':>10}{'vs base':>9}{'kept MiB':>10}{'ratio':>7}{'bound':>7}")
    for row in summary:
        bound = "" if row["bound"] is None else f"{row['bound']:.1%}"
        print(f"{row['mode']:<14}{row['eval_loss']:>10.4f}{row['relative']:>+9.2%}"
              f"{row['saved_bytes'] / 2**20:>10.1f}{row['ratio']:>7.2f}{bound:>7}")

    report = {
        "benchmark": "training_curves",
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__, "ciuic": ciuic.__version__, "python": sys.version.split()[0],
        "dtype": args.dtype, "steps": args.steps, "seed": args.seed, "lr": args.lr,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/training_curves.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "summary": summary,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "stats"} for k, v in runs.items()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    path = f"{args.out}_{args.dtype}.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    _plot(runs, f"{args.out}_{args.dtype}.png", args)
    print(f"wrote {path}")
    return report


def _plot(runs: dict, path: str, args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install ciuic[dev])")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = 10
    for name, run in runs.items():
        losses = torch.tensor(run["train_losses"])
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        ax.plot(range(window - 1, window - 1 + len(smooth)) if len(losses) >= window else range(len(losses)),
                smooth.tolist(), label=f"{name} (eval {run['eval_loss']:.3f})", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss ({window}-step mean)")
    ax.set_title(f"char-level LLaMA on stdlib source, {args.dtype}, {args.steps} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
