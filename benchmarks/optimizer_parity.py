"""Low-bit AdamW parity: the char-level LLaMA run of ``training_curves.py`` with each optimizer.

Same model (transformers LlamaConfig, hidden 128, intermediate 384, 3 layers, 4 heads), data
(Python standard-library source bytes), batch 16 x 128, lr 1e-3, weight decay 1e-2, seed and
steps for every run (``ciuic._workloads.train_charlm``); eval loss = mean of 20 held-out batches.
Optimizer-state bytes are counted from the state tensors after the run (``ciuic.optim.state_nbytes``).

Runs (``--runs``, comma-separated):
  torch            torch.optim.AdamW, fp32 weights (the baseline of the 8/4-bit runs)
  ciuic8 ciuic4    ciuic.optim.AdamW(state_bits=8 | 4), fp32 weights
  torchao8         torchao.optim.AdamW8bit (needs torch.compile; compiles on first use)
  bnb8             bitsandbytes.optim.AdamW8bit
  torch_bf16       torch.optim.AdamW, fp32 master weights + bf16 autocast (baseline of the bf16 runs)
  ciuic8_sr        ciuic AdamW 8-bit, bf16 weights, bf16_stochastic_round=True, bf16 autocast
  ciuic4_sr        the same at 4 bits
  torch_bf16w      torch.optim.AdamW on bf16 weights (round to nearest; no master copy)

    python benchmarks/optimizer_parity.py                              # all runs, 300 steps
    python benchmarks/optimizer_parity.py --runs torch,ciuic8 --steps 50
    python benchmarks/optimizer_parity.py --threads 1 --runs torch_bf16,ciuic8_sr --out benchmarks/results/optimizer_parity_bf16

Results are merged into ``benchmarks/results/optimizer_parity.json`` (keyed by device and
versions; runs from several invocations at the same key are kept together), with a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ciuic  # noqa: E402
from _common import device_name, git_revision, result_key, write_json  # noqa: E402
from ciuic._workloads import byte_splits, train_charlm  # noqa: E402
from ciuic.optim import AdamW, state_nbytes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# name: (label, optimizer factory(lr) or None for torch's default, dtype, bf16 weights, baseline, bound)
BOUND_8, BOUND_4, BOUND_SR = 0.01, 0.02, 0.02


def _torchao8(lr):
    from torchao.optim import AdamW8bit

    return lambda params: AdamW8bit(params, lr=lr)


def _bnb8(lr):
    import bitsandbytes as bnb

    return lambda params: bnb.optim.AdamW8bit(params, lr=lr)


RUNS = {
    "torch": ("torch.optim.AdamW (fp32 state)", lambda lr: (lambda p: torch.optim.AdamW(p, lr=lr)), "fp32", False,
              None, None),
    "ciuic8": ("ciuic AdamW 8-bit", lambda lr: (lambda p: AdamW(p, lr=lr, state_bits=8)), "fp32", False, "torch",
               BOUND_8),
    "ciuic4": ("ciuic AdamW 4-bit", lambda lr: (lambda p: AdamW(p, lr=lr, state_bits=4)), "fp32", False, "torch",
               BOUND_4),
    "torchao8": ("torchao AdamW8bit", _torchao8, "fp32", False, "torch", BOUND_8),
    "bnb8": ("bitsandbytes AdamW8bit", _bnb8, "fp32", False, "torch", BOUND_8),
    "torch_bf16": ("torch.optim.AdamW, fp32 master + bf16 autocast",
                   lambda lr: (lambda p: torch.optim.AdamW(p, lr=lr)), "bf16", False, None, None),
    "ciuic8_sr": ("ciuic AdamW 8-bit, bf16 weights + stochastic rounding",
                  lambda lr: (lambda p: AdamW(p, lr=lr, state_bits=8, bf16_stochastic_round=True)), "bf16", True,
                  "torch_bf16", BOUND_SR),
    "ciuic4_sr": ("ciuic AdamW 4-bit, bf16 weights + stochastic rounding",
                  lambda lr: (lambda p: AdamW(p, lr=lr, state_bits=4, bf16_stochastic_round=True)), "bf16", True,
                  "torch_bf16", BOUND_SR),
    "torch_bf16w": ("torch.optim.AdamW, bf16 weights (round to nearest)",
                    lambda lr: (lambda p: torch.optim.AdamW(p, lr=lr)), "bf16", True, "torch_bf16", None),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--small", action="store_true",
                        help="the small config of tests/test_optim.py (hidden 64, intermediate 128, 2 layers, 2 heads, "
                             "batch 8 x 64, 8 eval batches) instead of the benchmark model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is much faster than 2 on a loaded 2-core machine)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "optimizer_parity"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    for name in names:
        if name not in RUNS:
            raise SystemExit(f"--runs: {name!r} is not a run; allowed: {', '.join(RUNS)}")

    path = args.out + ".json"
    key = result_key()
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get(key, {})
        if (old.get("steps"), old.get("lr"), old.get("seed"), old.get("small", False)) == (
                args.steps, args.lr, args.seed, args.small):
            previous = old.get("runs", {})
    runs = dict(previous)

    data = byte_splits()
    for name in names:
        label, make, dtype, bf16_weights, _, _ = RUNS[name]
        try:
            factory = make(args.lr)
        except ImportError as error:
            print(f"{name}: skipped ({error})", flush=True)
            runs[name] = {"label": label, "skipped": f"not installed: {error}"}
            continue
        created = []

        def build(params, factory=factory, created=created):
            created.append(factory(params))
            return created[-1]

        t0 = time.perf_counter()

        def progress(step: int, loss: float, name: str = name) -> None:
            if step % 50 == 0 or step == args.steps - 1:
                print(f"  [{name}] step {step + 1}/{args.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)",
                      flush=True)

        try:
            size = (dict(batch=8, seq=64, eval_batches=8, model_kwargs=dict(hidden=64, intermediate=128, layers=2,
                                                                              heads=2)) if args.small else {})
            result = train_charlm(None, steps=args.steps, dtype=dtype, seed=args.seed, data=data, lr=args.lr,
                                  progress=progress, optimizer=build, bf16_weights=bf16_weights, **size)
        except Exception as error:  # a third-party optimizer that does not run here
            print(f"{name}: failed ({type(error).__name__}: {error})", flush=True)
            runs[name] = {"label": label, "skipped": f"failed: {type(error).__name__}: {str(error)[:300]}"}
            continue
        opt = created[-1]
        params = [p for g in opt.param_groups for p in g["params"]]
        runs[name] = {
            "label": label, "dtype": dtype, "bf16_weights": bf16_weights, "eval_loss": result.eval_loss,
            "train_losses": result.train_losses, "seconds": result.seconds, "state_bytes": state_nbytes(opt),
            "param_count": sum(p.numel() for p in params),
        }
        print(f"{name}: eval loss {result.eval_loss:.4f}, state {runs[name]['state_bytes'] / 2**20:.2f} MiB, "
              f"{result.seconds:.0f}s", flush=True)
        report = _write(path, key, runs, args, argv)  # after every run: a long job keeps what it finished
    report = _write(path, key, runs, args, argv)
    print(markdown_table(report))
    print(f"wrote {path}")
    return report


def _write(path: str, key: str, runs: dict, args: argparse.Namespace, argv) -> dict:
    summary = _summary(runs)
    report = {
        "benchmark": "optimizer_parity", "device": device_name(), "torch": torch.__version__,
        "ciuic": ciuic.__version__, "git": git_revision(), "python": sys.version.split()[0],
        "steps": args.steps, "seed": args.seed, "lr": args.lr, "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/optimizer_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "small": args.small, "threads": torch.get_num_threads(), "libraries": _versions(), "summary": summary, "runs": runs,
    }
    write_json(path, key, report)
    _plot(runs, args.out + ".png", args)
    return report


def _versions() -> dict:
    out = {}
    for module in ("torchao", "bitsandbytes"):
        try:
            out[module] = __import__(module).__version__
        except Exception:  # not installed, or broken on this machine
            out[module] = None
    return out


def _summary(runs: dict) -> list[dict]:
    rows = []
    for name, (label, _, dtype, bf16_weights, baseline, bound) in RUNS.items():
        run = runs.get(name)
        if run is None:
            continue
        row = {"run": name, "label": label, "dtype": dtype, "bf16_weights": bf16_weights, "baseline": baseline,
               "bound": bound}
        if "skipped" in run:
            row["skipped"] = run["skipped"]
            rows.append(row)
            continue
        row.update(eval_loss=run["eval_loss"], state_bytes=run["state_bytes"], seconds=run["seconds"])
        base = runs.get(baseline) if baseline else None
        if base is not None and "eval_loss" in base:
            row["relative"] = run["eval_loss"] / base["eval_loss"] - 1
            row["within_bound"] = None if bound is None else row["relative"] <= bound
        fp32_state = (runs.get("torch") or runs.get("torch_bf16") or {}).get("state_bytes")
        if fp32_state:
            row["state_ratio"] = run["state_bytes"] / fp32_state
        rows.append(row)
    return rows


def markdown_table(report: dict) -> str:
    lines = ["| optimizer | weights / compute | eval loss | vs baseline (bound) | state bytes (vs fp32 AdamW) | s |",
             "|---|---|---|---|---|---|"]
    for row in report["summary"]:
        if "skipped" in row:
            lines.append(f"| {row['label']} | | {row['skipped']} | | | |")
            continue
        weights = ("bf16 weights" if row["bf16_weights"] else "fp32 weights") + (
            ", bf16 autocast" if row["dtype"] == "bf16" else "")
        if "relative" in row:
            bound = f" (<= +{row['bound']:.0%})" if row["bound"] is not None else ""
            ok = "" if row.get("within_bound") is None else (" ok" if row["within_bound"] else " **over**")
            rel = f"{row['relative']:+.2%} vs {row['baseline']}{bound}{ok}"
        else:
            rel = "baseline"
        ratio = f" ({row['state_ratio']:.3f}x)" if "state_ratio" in row else ""
        lines.append(f"| {row['label']} | {weights} | {row['eval_loss']:.4f} | {rel} | "
                     f"{row['state_bytes'] / 2**20:.2f} MiB{ratio} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def _plot(runs: dict, path: str, args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install ciuic[dev])")
        return
    panels = [d for d in ("fp32", "bf16") if any(r.get("dtype") == d and "train_losses" in r for r in runs.values())]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), sharey=True, squeeze=False)
    axes = list(axes[0])
    window = 10
    for name, run in runs.items():
        if "train_losses" not in run:
            continue
        ax = axes[panels.index(run["dtype"])]
        losses = torch.tensor(run["train_losses"])
        if len(losses) >= window:
            smooth = losses.unfold(0, window, 1).mean(1)
            xs = range(window - 1, window - 1 + len(smooth))
        else:
            smooth, xs = losses, range(len(losses))
        ax.plot(xs, smooth.tolist(), label=f"{run['label']} (eval {run['eval_loss']:.3f})", linewidth=1.1)
    titles = {"fp32": "fp32 weights", "bf16": "bf16 autocast / bf16 weights"}
    for ax, title in zip(axes, (titles[p] for p in panels)):
        ax.set_xlabel("step")
        ax.set_title(f"char-level LLaMA{' (small)' if args.small else ''}, {title}, {args.steps} steps, lr {args.lr:g}",
                     fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"train loss ({window}-step mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
