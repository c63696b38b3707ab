"""Step time of a LLaMA-style model: uncompressed vs each ciuic mode vs full activation checkpointing.

Median of --steps timed training steps (forward, backward, AdamW) after --warmup steps, every
variant in the same process, alternating variants round-robin so drift affects all alike. Also
records the bytes each variant keeps for backward after one forward, so "faster than checkpointing
at equal memory" can be read off the same table. On CUDA it uses the Triton codecs and
torch.cuda.synchronize(); on CPU the reference codecs (CPU times are not GPU predictions).

    python benchmarks/step_time.py --quick
    python benchmarks/step_time.py --hidden 1024 --layers 8 --seq 1024 --batch 8 --dtype bf16   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import ciuic
from ciuic._workloads import tiny_llama
from ciuic.memory import SavedTensorMeter


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--modes", default="lossless,2:1,4:1,8:1")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 timed steps (CI smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_time.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.seq, args.batch, args.steps, args.warmup = 64, 2, 4, 128, 4, 3, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        ciuic.CompressionConfig.from_value(m)

    variants = ["uncompressed", "checkpointing", *modes]
    models, opts, engines = {}, {}, {}
    for name in variants:
        model = tiny_llama(hidden=args.hidden, intermediate=args.hidden * 3, layers=args.layers,
                           heads=args.heads, max_positions=max(1024, args.seq)).to(device)
        if name == "checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        models[name] = model
        opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engines[name] = ciuic.compression(name) if name in modes else None

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen).to(device)
               for _ in range(4)]

    def step(name: str, i: int, meter: SavedTensorMeter | None = None) -> float:
        tokens = batches[i % len(batches)]
        x, y = tokens[:, :-1], tokens[:, 1:]
        model, engine = models[name], engines[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if meter is not None:
            meter.__enter__()
        if engine is not None:
            engine.__enter__()
        try:
            with amp:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        finally:
            if engine is not None:
                engine.__exit__(None, None, None)
            if meter is not None:
                meter.__exit__(None, None, None)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    kept = {}
    for name in variants:
        for i in range(args.warmup):
            step(name, i)
        if engines[name] is None:
            meter = SavedTensorMeter()
            step(name, 0, meter)
            kept[name] = meter.bytes
        else:
            ciuic.reset_stats()
            step(name, 0)
            kept[name] = ciuic.stats().bytes_after
        print(f"warmed up {name}", flush=True)
    times = {name: [] for name in variants}
    for i in range(args.steps):
        for name in variants:
            times[name].append(step(name, i))
        print(f"round {i + 1}/{args.steps}", flush=True)

    base_time = statistics.median(times["uncompressed"])
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        rows.append({"variant": name, "median_step_s": t, "overhead": t / base_time - 1,
                     "kept_bytes": kept[name], "ratio": kept["uncompressed"] / kept[name] if kept[name] else None})
    print(f"\n{'variant':<15}{'step ms':>10}{'overhead':>10}{'kept MiB':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['variant']:<15}{r['median_step_s'] * 1e3:>10.1f}{r['overhead']:>+10.1%}"
              f"{r['kept_bytes'] / 2**20:>10.2f}{(r['ratio'] or 0):>8.2f}")
    report = {
        "benchmark": "step_time",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "ciuic": ciuic.__version__, "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"), "args": vars(args),
        "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
        "note": "checkpointing = transformers gradient_checkpointing (non-reentrant), kept bytes measured "
                "with SavedTensorMeter during the forward (recompute happens in backward)",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
