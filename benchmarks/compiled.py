"""ciuic under torch.compile: compiled baseline vs compiled + inline hooks per mode, eager beside them.

The char-level LLaMA of ``ciuic._workloads`` (stdlib bytes, AdamW lr 1e-3) is trained by every
variant from the same initial weights on the same batches, the variants alternating step by step
(round-robin) so machine load hits all alike:

* ``compiled``: ``torch.compile(loss_fn)`` (Inductor), nothing else;
* ``compiled+MODE``: the same under ``ciuic.compiled.inline(MODE)`` (quantization inside the graph);
* ``eager``: the uncompiled model; ``eager+MODE``: under ``ciuic.compression(MODE)`` (the eager engine).

Per variant: bytes held between forward and backward, measured by glibc ``mallinfo2`` (heap after
the forward, holding only the loss, minus heap before it; one step after warm-up), the planned
bytes of the inline hooks (sum over saved nodes of the compiled graph), the median step time
(forward + backward + AdamW) after warm-up, the final train loss and the eval loss (20 held-out
batches, evaluated with the uncompiled module under no_grad, identically for every variant).

    python benchmarks/compiled.py                  # 150 steps (about 10 minutes on 2 CPU cores)
    python benchmarks/compiled.py --steps 20 --quick
    python benchmarks/compiled.py --render [results/compiled.json]   # the BENCHMARKS.md table
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ciuic  # noqa: E402
import ciuic.compiled  # noqa: E402
from _common import device_name, git_revision, result_key, write_json  # noqa: E402
from ciuic._workloads import byte_splits, get_batch, tiny_llama  # noqa: E402
from ciuic.memory import heap_available, heap_bytes  # noqa: E402


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation happens here)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--modes", default="lossless,2:1,4:1,8:1", help="inline modes of the compiled variants")
    parser.add_argument("--eager-modes", default="4:1", help="eager engine modes shown beside them")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--quick", action="store_true", help="small model (hidden 64, 1 layer, batch 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compiled.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.batch = 64, 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    eager_modes = [m for m in args.eager_modes.split(",") if m]
    for m in modes:
        ciuic.compiled.InlineOptions(mode=m)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)

    train, held_out = byte_splits()
    variants = ["compiled", *[f"compiled+{m}" for m in modes], "eager", *[f"eager+{m}" for m in eager_modes]]
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    models, optims, fns = {}, {}, {}
    for name in variants:
        model = tiny_llama(hidden=args.hidden, intermediate=3 * args.hidden, layers=args.layers, seed=0)
        model.config.use_cache = False
        model.train()
        models[name] = model
        optims[name] = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fns[name] = torch.compile(lambda x, y, model=model: _loss(model, x, y)) if name.startswith("compiled") \
            else (lambda x, y, model=model: _loss(model, x, y))

    def context(name: str):  # noqa: ANN202
        if name.startswith("compiled+"):
            return ciuic.compiled.inline(name.split("+", 1)[1])
        if name.startswith("eager+"):
            return ciuic.compression(name.split("+", 1)[1])
        return _Null()

    gen = torch.Generator().manual_seed(1)
    batches = [get_batch(train, args.batch, args.seq, gen) for _ in range(args.steps)]
    times = {n: [] for n in variants}
    losses = {n: [] for n in variants}
    held = {n: None for n in variants}
    planned = {n: None for n in variants}
    compile_s = {n: 0.0 for n in variants}
    measure_at = min(args.warmup, args.steps - 1)
    for i, (x, y) in enumerate(batches):
        for name in variants:
            measure = i == measure_at and heap_available()
            if measure:
                ciuic.empty_pool()  # else this forward's packs reuse buffers the heap already counts
                before = heap_bytes()
            start = time.perf_counter()
            with context(name), amp:
                loss = fns[name](x, y)
            if i == 0 and name.startswith("compiled+") and name != "compiled+lossless":
                plan = ciuic.compiled.decisions()  # the graph this variant just compiled
                planned[name] = plan[-1] if plan else None
            if measure:
                held[name] = heap_bytes() - before
            optims[name].zero_grad(set_to_none=True)
            loss.backward()
            optims[name].step()
            elapsed = time.perf_counter() - start
            if i == 0:
                compile_s[name] = elapsed
            if i >= args.warmup and not measure:
                times[name].append(elapsed)
            losses[name].append(float(loss.detach()))
        if (i + 1) % 10 == 0 or i == 0:
            print(f"step {i + 1}/{args.steps}: " + ", ".join(f"{n} {losses[n][-1]:.3f}" for n in variants), flush=True)

    egen = torch.Generator().manual_seed(10_000)
    eval_batches = [get_batch(held_out, args.batch, args.seq, egen) for _ in range(20)]
    rows = []
    base = {"compiled": None, "eager": None}
    for name in variants:
        model = models[name]
        model.eval()
        with torch.no_grad(), amp:
            eval_loss = sum(float(_loss(model, x, y)) for x, y in eval_batches) / len(eval_batches)
        plan = planned[name]
        row = {
            "variant": name,
            "median_step_s": statistics.median(times[name]) if times[name] else None,
            "first_step_s": compile_s[name],
            "held_bytes": held[name],
            "train_loss_last10": sum(losses[name][-10:]) / len(losses[name][-10:]),
            "eval_loss": eval_loss,
        }
        if plan:
            row["planned_baseline_bytes"] = sum(d.baseline_bytes for d in plan.values())
            row["planned_kept_bytes"] = sum(d.kept_bytes for d in plan.values())
            row["bits"] = {d.name: d.bits for d in plan.values()}
            row["classes"] = {d.name: d.cls for d in plan.values()}
        rows.append(row)
        if name in base:
            base[name] = row
    for row in rows:
        ref = base["eager" if row["variant"].startswith("eager") else "compiled"]
        row["held_ratio"] = ref["held_bytes"] / row["held_bytes"] if row["held_bytes"] else None
        row["step_vs_compiled"] = (row["median_step_s"] / base["compiled"]["median_step_s"] - 1
                                   if row["median_step_s"] and base["compiled"]["median_step_s"] else None)
        row["eval_vs_compiled"] = row["eval_loss"] / base["compiled"]["eval_loss"] - 1
        if "planned_kept_bytes" in row:
            row["planned_ratio"] = row["planned_baseline_bytes"] / max(row["planned_kept_bytes"], 1)

    print(f"\n{'variant':<18}{'held MiB':>10}{'ratio':>8}{'plan':>7}{'step ms':>10}{'vs comp':>9}{'eval':>9}{'vs comp':>9}")
    for r in rows:
        print(f"{r['variant']:<18}{(r['held_bytes'] or 0) / 2**20:>10.2f}{(r['held_ratio'] or 0):>8.2f}"
              f"{r.get('planned_ratio', float('nan')):>7.2f}{(r['median_step_s'] or 0) * 1e3:>10.1f}"
              f"{(r['step_vs_compiled'] or 0):>+9.1%}{r['eval_loss']:>9.4f}{r['eval_vs_compiled']:>+9.2%}")
    report = {
        "benchmark": "compiled",
        "device": device_name("cpu"), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "ciuic": ciuic.__version__, "python": sys.version.split()[0],
        "git": git_revision(), "date": time.strftime("%Y-%m-%d"), "args": vars(args),
        "filtering_mode": ciuic.compiled.FILTERING_MODE,
        "command": "python benchmarks/compiled.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    write_json(args.out, result_key("cpu") + f" | {args.dtype} | steps {args.steps}", report)
    print(f"wrote {args.out}")
    return report


def markdown(path: str) -> str:
    """The BENCHMARKS.md table of every report stored in ``path`` (``--render``)."""
    import json

    with open(path) as f:
        data = json.load(f)
    out = []
    for key, report in data.items():
        a = report["args"]
        out += [f"### Under torch.compile: char-level LLaMA, {a['steps']} steps, "
                f"{a['dtype']} ({key}, {report['threads']} threads, git {report['git']}, {report['date']})", "",
                f"Command: `{report['command']}`. Model: tiny_llama hidden {a['hidden']}, {a['layers']} layer(s), "
                f"batch {a['batch']} x {a['seq']} tokens. held = glibc mallinfo2 heap held between forward and "
                f"backward (one step after warm-up); ratio vs the compiled (or eager) baseline; plan = the inline "
                f"plan's own bytes (saved nodes of the graph, before / after); filtering mode "
                f"`{report['filtering_mode']}`.", "",
                "| variant | held (MiB) | ratio | plan ratio | median step (ms) | vs compiled | first step (s) | "
                "train loss (last 10) | eval loss | vs compiled |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["rows"]:
            plan = f"{r['planned_ratio']:.2f}" if "planned_ratio" in r else ""
            out.append(f"| {r['variant']} | {(r['held_bytes'] or 0) / 2**20:.2f} | {(r['held_ratio'] or 0):.2f} | {plan} | "
                       f"{(r['median_step_s'] or 0) * 1e3:.1f} | {(r['step_vs_compiled'] or 0):+.1%} | "
                       f"{r['first_step_s']:.0f} | {r['train_loss_last10']:.4f} | {r['eval_loss']:.4f} | "
                       f"{r['eval_vs_compiled']:+.2%} |")
        out.append("")
    return "\n".join(out)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    if "--render" in sys.argv:
        print(markdown(sys.argv[sys.argv.index("--render") + 1] if len(sys.argv) > sys.argv.index("--render") + 1
                       else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compiled.json")))
    else:
        main()
