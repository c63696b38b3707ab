"""Compressed DDP gradients (``ciuic.distributed``): bytes sent per step and loss, vs uncompressed DDP.

Two processes on gloo (CPU), one thread each: a next-byte model (embedding 256x32 over a context of
4 bytes, a 128->256 GELU layer, a 256-way output; 106k parameters, DDP buckets of 0.1 MB so there
are several) trained with Adam (lr 3e-3, batch 64 per process) on Python standard-library source
bytes for ``--steps`` steps; eval loss on 4096 held-out positions. Runs: DDP's own all-reduce,
ciuic's hook at 8 and 4 bits. Bytes per step are those this process hands to
``torch.distributed.all_reduce`` (a wrapper counts them, independently of the hook's own counter),
compared with torch's ``allreduce_hook`` (fp32) on the same buckets.

    python benchmarks/ddp_gradients.py            # 200 steps (about 1-2 minutes)

Writes ``benchmarks/results/ddp_gradients.json`` (keyed by device and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONTEXT, EMBED, HIDDEN = 4, 32, 256
RUNS = ("uncompressed", "fp32_hook", "int8", "int4")


class ByteMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(256, EMBED)
        self.hidden = nn.Linear(CONTEXT * EMBED, HIDDEN)
        self.out = nn.Linear(HIDDEN, 256)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(self.embed(context).flatten(1))))


def _batch(data: torch.Tensor, generator: torch.Generator, size: int):
    starts = torch.randint(0, len(data) - CONTEXT - 1, (size,), generator=generator)
    window = data[starts[:, None] + torch.arange(CONTEXT + 1)]
    return window[:, :CONTEXT], window[:, CONTEXT]


def _train(rank: int, run: str, steps: int, data, evaluation) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ciuic.distributed as cd

    model = DDP(ByteMLP(), bucket_cap_mb=0.1)
    state = None
    if run == "fp32_hook":
        model.register_comm_hook(None, allreduce_hook)
    elif run != "uncompressed":
        state = cd.compress_ddp_gradients(model, bits=int(run[3:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(100 + rank)
    original = dist.all_reduce
    counted = [0]

    def counting(tensor, *args, **kwargs):
        counted[0] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    losses, start = [], time.perf_counter()
    dist.all_reduce = counting
    try:
        for _ in range(steps):
            x, y = _batch(data, generator, 64)
            counted[0] = 0
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        dist.all_reduce = original
    with torch.no_grad():
        eval_loss = F.cross_entropy(model.module(evaluation[0]), evaluation[1]).item()
    record = {"train_losses": losses, "eval_loss": eval_loss, "bytes_last_step": counted[0],
              "seconds": time.perf_counter() - start}
    if state is not None:
        record.update(hook_bytes_sent_last_step=state.bytes_sent_last_step,
                      hook_fp32_bytes_last_step=state.fp32_bytes_last_step, block_size=state.block_size,
                      residual_bytes=state.residual_bytes)
    return record


def _worker(rank: int, port: int, steps: int, out: str) -> None:
    from ciuic._workloads import stdlib_text

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        text = torch.tensor(list(stdlib_text(300_000)), dtype=torch.long)
        cut = int(len(text) * 0.9)
        evaluation = _batch(text[cut:], torch.Generator().manual_seed(999), 4096)
        results = {run: _train(rank, run, steps, text[:cut], evaluation) for run in RUNS}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table of the stored result")
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from _common import device_name, git_revision, result_key, write_json

    path = os.path.join(RESULTS, "ddp_gradients.json")
    if args.markdown:
        with open(path) as f:
            report = json.load(f)[result_key("cpu")]
        print(f"{report['date']}, {report['device']}, torch {report['torch']}, 2 processes (gloo), ciuic "
              f"{report['git_revision']}. Command: `{report['command']}`\n")
        print("| all-reduce | bytes sent per step (this process) | vs fp32 | eval loss after "
              f"{report['steps']} steps | vs uncompressed |")
        print("|---|---|---|---|---|")
        runs, base = report["runs"], report["runs"]["uncompressed"]["eval_loss"]
        fp32 = runs["fp32_hook"]["bytes_last_step"]
        for name, label in (("fp32_hook", "fp32 (torch allreduce_hook)"), ("uncompressed", "DDP built-in (fp32)"),
                            ("int8", "ciuic int8 + error feedback"), ("int4", "ciuic int4 + error feedback")):
            run = runs[name]
            sent = f"{run['bytes_last_step']:,}" if name != "uncompressed" else "(C++, same as fp32)"
            ratio = f"{run['bytes_last_step'] / fp32:.3f}" if name != "uncompressed" else "1"
            print(f"| {label} | {sent} | {ratio} | {run['eval_loss']:.4f} | "
                  f"{(run['eval_loss'] / base - 1) * 100:+.2f}% |")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "ddp.json")
    mp.spawn(_worker, args=(port, args.steps, out), nprocs=2, join=True)
    with open(out) as f:
        runs = json.load(f)
    report = {"date": time.strftime("%Y-%m-%d"), "device": device_name("cpu"), "torch": torch.__version__,
              "git_revision": git_revision(), "steps": args.steps,
              "command": "python benchmarks/ddp_gradients.py " + " ".join(sys.argv[1:]), "runs": runs}
    write_json(path, result_key("cpu"), report)
    for name, run in runs.items():
        print(f"{name:14s} eval {run['eval_loss']:.4f}  bytes/step {run['bytes_last_step']}")


if __name__ == "__main__":
    main()
