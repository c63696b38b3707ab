"""Fabric: the same byte-level language model with ``Fabric(strategy="ciuic")``: every forward of a
module returned by ``fabric.setup`` compresses what it saves for backward.

    python examples/train_fabric.py                        # strategy="ciuic" (4:1)
    python examples/train_fabric.py --strategy ciuic_2:1   # or ciuic_8:1, ciuic_lossless, auto (no ciuic)
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F

import ciuic  # noqa: F401  -- registers strategy="ciuic" and friends in Fabric
from common import ByteDataset, TinyGPT, memory_saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="ciuic")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    fabric = L.Fabric(strategy=args.strategy, accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    model = TinyGPT(seq_len=args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(
        torch.utils.data.DataLoader(ByteDataset(args.seq_len), batch_size=args.batch_size, shuffle=True)
    )

    model.train()
    for step, (tokens, targets) in zip(range(args.steps), loader):
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            fabric.print(f"step {step:3d}  loss {loss.item():.3f}")
    fabric.print(memory_saved())


if __name__ == "__main__":
    main()
