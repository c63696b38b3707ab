"""One GPU run that answers every open speed and memory question (< 20 minutes on one H100/H200).

    python benchmarks/gpu_suite.py              # on a CUDA machine (bash run.sh gpu)
    python benchmarks/gpu_suite.py --dry-run    # tiny sizes on the CPU (< 1 minute; run by the tests)

Sections, in this order (a time budget, --budget-minutes, skips what is left and says so):

1. codecs: GB/s of encode and of decode (input bytes / time) of every codec at several sizes,
   against ``copy_`` of the same bytes (``triton.testing.do_bench`` on CUDA; the Triton kernels),
   and the host µs per encode/decode of a tiny tensor (the per-saved-tensor launch cost).
2. step: LLaMA-style models (transformers ``LlamaConfig``, random weights, bf16 weights, AdamW)
   at hidden 1024 / 2048 / 4096: median step time (forward, backward, optimizer) and peak memory
   (``torch.cuda.max_memory_allocated``) for: uncompressed, full activation checkpointing,
   ``torch.autograd.graph.save_on_cpu(pin_memory=True)``, ciuic ``"2:1"``, ``"4:1"``, ``"8:1"``
   (``ciuic.compression(mode)`` around the forward; ``ciuic.stats()`` for the saved-bytes ratio).
3. loss: a bf16 loss curve of ``"8:1"`` vs uncompressed on real text (Python standard-library
   sources, bytes), same seed and data.
4. max_batch: the largest batch that fits for every variant and model (doubling, then bisection,
   one training step per try, out-of-memory caught).

Writes ``benchmarks/results/gpu_suite_<device>.json`` and ``.png`` (the device name made a file
name; ``--dry-run`` writes ``gpu_suite_dry-run.json`` unless --out says otherwise). Uses only the
public API: ``ciuic.compression``, ``ciuic.stats``, ``ciuic.reset_stats`` and ``ciuic_kernels``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ciuic  # noqa: E402
import ciuic_kernels  # noqa: E402
from _common import device_name, git_revision  # noqa: E402
from ciuic_kernels import BitmaskSpec, FP8Spec, QuantSpec, SparseSpec  # noqa: E402

VARIANTS = ("uncompressed", "checkpointing", "save_on_cpu", "2:1", "4:1", "8:1")
CODECS = {
    "int8": QuantSpec(8, 64),
    "int4": QuantSpec(4, 64),
    "int2": QuantSpec(2, 64),
    "int4-g128-stochastic": QuantSpec(4, 128, "stochastic"),
    "fp8-e4m3-group": FP8Spec("e4m3", "group", 64),
    "fp8-e4m3-tensor": FP8Spec("e4m3", "tensor"),
    "bitmask": BitmaskSpec(check=False),
    "sparse-1%-int4": SparseSpec(0.01, 4, 64),
}
# (hidden, layers, heads, intermediate, seq, batch for the step-time table)
GPU_MODELS = [(1024, 8, 8, 2816, 2048, 8), (2048, 8, 16, 5632, 2048, 4), (4096, 4, 32, 11008, 2048, 2)]
DRY_MODELS = [(32, 1, 2, 64, 16, 1)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


class Suite:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.start = time.perf_counter()
        self.budget = args.budget_minutes * 60
        self.skipped: list[str] = []
        self.backend = "triton" if self.cuda else "torch"

    def time_left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    # ------------------------------------------------------------------------------------- codecs

    def bench(self, fn, reps: int) -> float:
        """Median seconds of ``fn``."""
        if self.cuda:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def codecs(self, sizes, progress) -> list[dict]:
        rows = []
        gen = torch.Generator().manual_seed(0)
        for numel in sizes:
            x = torch.randn(numel, generator=gen).to(torch.bfloat16).to(self.device)
            mask = (x > 0).to(torch.bfloat16)
            copy_dst = torch.empty_like(x)
            copy_s = self.bench(lambda: copy_dst.copy_(x), self.args.reps)
            for name, spec in CODECS.items():
                progress.set_postfix_str(f"codec {name} n={numel}")
                if self.time_left() < 0:
                    self.skipped.append(f"codec {name} n={numel}")
                    continue
                src = mask if isinstance(spec, BitmaskSpec) else x
                packed = ciuic_kernels.encode(src, spec, backend=self.backend)
                enc = self.bench(lambda: ciuic_kernels.encode(src, spec, backend=self.backend), self.args.reps)
                dec = self.bench(lambda: ciuic_kernels.decode(packed, backend=self.backend), self.args.reps)
                out = ciuic_kernels.decode(packed, backend=self.backend)
                err = (out.float() - src.float()).pow(2).mean().sqrt() / src.float().pow(2).mean().sqrt()
                rows.append({
                    "codec": name, "numel": numel, "input_bytes": src.nbytes, "packed_bytes": packed.nbytes,
                    "ratio_vs_bf16": src.nbytes / packed.nbytes,
                    "encode_s": enc, "decode_s": dec, "copy_s": copy_s,
                    "encode_GBps": src.nbytes / enc / 1e9, "decode_GBps": src.nbytes / dec / 1e9,
                    "copy_GBps": src.nbytes / copy_s / 1e9, "rel_rmse": err.item(),
                })  # fmt: skip
            progress.update(1)
        return rows

    def overhead(self) -> list[dict]:
        """Host µs per encode/decode of a 256-element tensor (no synchronization: the launch cost a
        saved tensor adds to the CPU side of a step)."""
        x = torch.randn(256, device=self.device).to(torch.bfloat16)
        rows = []
        for name, spec in CODECS.items():
            src = (x > 0).to(torch.bfloat16) if isinstance(spec, BitmaskSpec) else x
            packed = ciuic_kernels.encode(src, spec, backend=self.backend)
            row = {"codec": name, "numel": 256}
            for what, fn in (("encode_us", lambda: ciuic_kernels.encode(src, spec, backend=self.backend)),
                             ("decode_us", lambda: ciuic_kernels.decode(packed, backend=self.backend))):
                for _ in range(10):
                    fn()
                self.sync()
                times = []
                for _ in range(self.args.reps * 10):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                row[what] = statistics.median(times) * 1e6
                self.sync()
            rows.append(row)
        return rows

    # ------------------------------------------------------------------------------------- training

    def model(self, hidden, layers, heads, intermediate, vocab=32000, seq=2048):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=max(seq, 128), attn_implementation="sdpa")  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=self.device, dtype=torch.bfloat16)
        model.train()
        return model

    def step_fn(self, model, optimizer, variant: str):
        """One training step under ``variant``; returns the loss (a tensor)."""
        engine = ciuic.compression(variant) if variant in ("2:1", "4:1", "8:1") else None
        if variant == "checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

        def step(x, y):
            if variant == "save_on_cpu":
                context = torch.autograd.graph.save_on_cpu(pin_memory=self.cuda)
            elif engine is not None:
                context = engine
            else:
                context = _Null()
            with context:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step

    def batch(self, vocab, batch, seq, seed=0):
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(self.device)
        return tokens[:, :-1], tokens[:, 1:]

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def steps(self, models, progress) -> list[dict]:
        rows = []
        for hidden, layers, heads, inter, seq, batch in models:
            vocab = 32000 if self.cuda else 256
            model = self.model(hidden, layers, heads, inter, vocab, seq)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            x, y = self.batch(vocab, batch, seq)
            for variant in VARIANTS:
                progress.set_postfix_str(f"step h={hidden} {variant}")
                if self.time_left() < 0:
                    self.skipped.append(f"step h={hidden} {variant}")
                    progress.update(1)
                    continue
                row = {"hidden": hidden, "layers": layers, "seq": seq, "batch": batch, "variant": variant,
                       "params": sum(p.numel() for p in model.parameters())}
                try:
                    step = self.step_fn(model, optimizer, variant)
                    for _ in range(self.args.warmup):  # ciuic calibrates in its first passes
                        step(x, y)
                    self.sync()
                    if self.cuda:
                        torch.cuda.reset_peak_memory_stats()
                    ciuic.reset_stats()
                    times = []
                    for _ in range(self.args.steps):
                        self.sync()
                        t = time.perf_counter()
                        step(x, y)
                        self.sync()
                        times.append(time.perf_counter() - t)
                    row["median_step_s"] = statistics.median(times)
                    row["tokens_per_s"] = batch * seq / row["median_step_s"]
                    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() if self.cuda else None
                    row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() if self.cuda else None
                    if variant in ("2:1", "4:1", "8:1"):
                        s = ciuic.stats()
                        row["saved_ratio"] = s.bytes_before / s.bytes_after if s.bytes_after else None
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                optimizer.zero_grad(set_to_none=True)
                self.free()
                rows.append(row)
                progress.update(1)
            model.gradient_checkpointing_disable()
            del model, optimizer
            self.free()
        base = {(r["hidden"]): r for r in rows if r["variant"] == "uncompressed" and "median_step_s" in r}
        for r in rows:
            b = base.get(r["hidden"])
            if b and "median_step_s" in r:
                r["time_vs_uncompressed"] = r["median_step_s"] / b["median_step_s"]
                if self.cuda:
                    r["peak_vs_uncompressed"] = r["peak_allocated_bytes"] / b["peak_allocated_bytes"]
        return rows

    def fits(self, model, optimizer, variant, vocab, batch, seq) -> bool:
        step = self.step_fn(model, optimizer, variant)
        try:
            x, y = self.batch(vocab, batch, seq, seed=batch)
            for _ in range(2 if variant in ("2:1", "4:1", "8:1") else 1):  # calibration, then a planned pass
                step(x, y)
            self.sync()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            self.free()

    def max_batch(self, models, progress) -> list[dict]:
        rows = []
        cap = self.args.max_batch_cap
        for hidden, layers, heads, inter, seq, _ in models:
            vocab = 32000 if self.cuda else 256
            model = self.model(hidden, layers, heads, inter, vocab, seq)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            for variant in VARIANTS:
                progress.set_postfix_str(f"max batch h={hidden} {variant}")
                if self.time_left() < 0:
                    self.skipped.append(f"max batch h={hidden} {variant}")
                    progress.update(1)
                    continue
                lo, hi = 0, 1
                while hi <= cap and self.time_left() > 0 and self.fits(model, optimizer, variant, vocab, hi, seq):
                    lo, hi = hi, hi * 2
                hi = min(hi, cap + 1)
                while hi - lo > 1 and self.time_left() > 0:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if self.fits(model, optimizer, variant, vocab, mid, seq) else (lo, mid)
                rows.append({"hidden": hidden, "layers": layers, "seq": seq, "variant": variant, "max_batch": lo,
                             "capped": lo >= cap, "complete": hi - lo <= 1})  # fmt: skip
                progress.update(1)
            model.gradient_checkpointing_disable()
            del model, optimizer
            self.free()
        return rows

    def loss_curves(self, progress) -> dict:
        from ciuic._workloads import byte_splits

        a = self.args
        train, _ = byte_splits(max_bytes=2_000_000 if self.cuda else 200_000)
        curves = {}
        hidden, layers, heads, inter = (1024, 8, 8, 2816) if self.cuda else (32, 1, 2, 64)
        batch, seq = (16, 512) if self.cuda else (2, 16)
        for variant in ("uncompressed", "8:1"):
            progress.set_postfix_str(f"loss {variant}")
            if self.time_left() < 0:
                self.skipped.append(f"loss {variant}")
                progress.update(1)
                continue
            model = self.model(hidden, layers, heads, inter, vocab=256, seq=seq)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
            step = self.step_fn(model, optimizer, variant)
            gen = torch.Generator().manual_seed(1)
            losses = []
            for _ in range(a.loss_steps):
                ix = torch.randint(0, train.numel() - seq - 1, (batch,), generator=gen)
                tokens = torch.stack([train[i : i + seq + 1] for i in ix.tolist()]).long().to(self.device)
                losses.append(step(tokens[:, :-1], tokens[:, 1:]))
            curves[variant] = [float(v) for v in torch.stack(losses).cpu()]
            del model, optimizer
            self.free()
            progress.update(1)
        if len(curves) == 2:
            tail = max(1, len(curves["8:1"]) // 10)
            base = statistics.mean(curves["uncompressed"][-tail:])
            ours = statistics.mean(curves["8:1"][-tail:])
            curves["final_relative_difference"] = (ours - base) / base
        curves["config"] = {"hidden": hidden, "layers": layers, "batch": batch, "seq": seq, "lr": 3e-4,
                            "steps": a.loss_steps, "data": "stdlib bytes"}
        return curves


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    codecs = report.get("codecs", [])
    if codecs:
        biggest = max(r["numel"] for r in codecs)
        rows = [r for r in codecs if r["numel"] == biggest]
        names = [r["codec"] for r in rows]
        axes[0].bar([i - 0.2 for i in range(len(rows))], [r["encode_GBps"] for r in rows], 0.4, label="encode")
        axes[0].bar([i + 0.2 for i in range(len(rows))], [r["decode_GBps"] for r in rows], 0.4, label="decode")
        axes[0].axhline(rows[0]["copy_GBps"], color="k", ls="--", label="copy_")
        axes[0].set_xticks(range(len(rows)), names, rotation=45, ha="right")
        axes[0].set_ylabel("GB/s of input")
        axes[0].set_title(f"codecs, {biggest} bf16 elements")
        axes[0].legend()
    steps = [r for r in report.get("step", []) if "median_step_s" in r]
    if steps:
        for hidden in sorted({r["hidden"] for r in steps}):
            rs = [r for r in steps if r["hidden"] == hidden]
            y = [(r["peak_allocated_bytes"] or 0) / 2**30 for r in rs]
            axes[1].scatter([r["median_step_s"] for r in rs], y, label=f"hidden {hidden}")
            for r, yy in zip(rs, y):
                axes[1].annotate(r["variant"], (r["median_step_s"], yy), fontsize=7)
        axes[1].set_xlabel("median step time (s)")
        axes[1].set_ylabel("peak allocated (GiB)")
        axes[1].set_title("step time vs peak memory")
        axes[1].legend()
    loss = report.get("loss", {})
    for variant in ("uncompressed", "8:1"):
        if variant in loss:
            axes[2].plot(loss[variant], label=variant)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("loss (bf16)")
    axes[2].set_title("loss: 8:1 vs uncompressed")
    axes[2].legend()
    fig.suptitle(f"{report['device']} | torch {report['torch']} | {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--budget-minutes", type=float, default=18.0)
    parser.add_argument("--sections", default="codecs,step,loss,max_batch")
    parser.add_argument("--out", default=None, help="JSON path (the PNG goes next to it)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        parser.error("no CUDA device: run with --dry-run (tiny sizes on the CPU), or on a GPU")
    args.steps, args.warmup, args.reps = (10, 3, 20) if cuda else (1, 2, 1)
    args.loss_steps = 300 if cuda else 3
    args.max_batch_cap = 256 if cuda else 2
    sizes = [1 << 20, 1 << 24, 1 << 26] if cuda else [4096]
    models = GPU_MODELS if cuda else DRY_MODELS
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"codecs", "step", "loss", "max_batch"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; allowed: codecs, step, loss, max_batch")

    from tqdm import tqdm

    suite = Suite(args)
    name = device_name("cuda" if cuda else "cpu")
    report = {"device": name, "dry_run": args.dry_run, "torch": torch.__version__, "ciuic": ciuic.__version__,
              "git_revision": git_revision(), "command": "python benchmarks/gpu_suite.py" + (" --dry-run" if args.dry_run else ""),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    total = (len(sizes) if "codecs" in sections else 0) + len(models) * len(VARIANTS) * (
        ("step" in sections) + ("max_batch" in sections)) + 2 * ("loss" in sections)  # fmt: skip
    with tqdm(total=total, desc="gpu suite", file=sys.stderr, mininterval=1.0) as progress:
        if "codecs" in sections:
            report["codecs"] = suite.codecs(sizes, progress)
            report["codec_overhead"] = suite.overhead()
        if "step" in sections:
            report["step"] = suite.steps(models, progress)
        if "loss" in sections:
            report["loss"] = suite.loss_curves(progress)
        if "max_batch" in sections:
            report["max_batch"] = suite.max_batch(models, progress)
    report["skipped_for_time"] = suite.skipped
    report["seconds"] = round(time.perf_counter() - suite.start, 1)
    out = args.out or os.path.join(HERE, "results", f"gpu_suite_{'dry-run' if args.dry_run else _slug(name)}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    if not args.no_plot:
        plot(report, os.path.splitext(out)[0] + ".png")
    print(f"[gpu_suite] {name}: {report['seconds']} s, wrote {out}" + (f"; skipped for time: {suite.skipped}" if suite.skipped else ""))
    return report


if __name__ == "__main__":
    main()
