"""Accelerate: a stock accelerate training loop for the byte-level language model. Nothing in it
is about ciuic unless you ask for the plugin:

    # no code change: the launcher turns compression on in every process
    ciuic-accelerate launch --ciuic 4:1 --cpu --num_processes 1 examples/train_accelerate.py

    # or in code: CiuicAccelerator(ciuic_plugin=CiuicPlugin(mode="4:1"))
    python examples/train_accelerate.py --plugin 4:1
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from common import ByteDataset, TinyGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", default=None, metavar="MODE", help="use CiuicAccelerator with this mode")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    if args.plugin:
        from ciuic_integrations.accelerate import CiuicAccelerator, CiuicPlugin

        accelerator = CiuicAccelerator(cpu=True, ciuic_plugin=CiuicPlugin(mode=args.plugin))
    else:
        accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = TinyGPT(seq_len=args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(ByteDataset(args.seq_len), batch_size=args.batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    for step, (tokens, targets) in zip(range(args.steps), loader):
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            accelerator.print(f"step {step:3d}  loss {loss.item():.3f}")

    # Under `ciuic-accelerate launch --ciuic`, the launcher prints the memory line at exit.
    if args.plugin and "ciuic" in sys.modules:
        from common import memory_saved

        accelerator.print(memory_saved())


if __name__ == "__main__":
    main()
