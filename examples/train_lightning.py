"""Lightning: train a small byte-level language model on Python's own sources with
``Trainer(strategy="ciuic")``, on the CPU, and print the activation memory ciuic saved.

    python examples/train_lightning.py                       # strategy="ciuic" (4:1)
    python examples/train_lightning.py --strategy ciuic_8:1  # or ciuic_lossless, ciuic_2:1, auto (no ciuic)
    python examples/train_lightning.py --strategy ciuic_ddp --devices 2
    python examples/train_lightning.py --optimizer adamw8bit --fuse-update  # 8-bit AdamW, update in backward
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F

import ciuic  # noqa: F401  -- registers strategy="ciuic" and friends in Lightning
from common import ByteDataset, TinyGPT, memory_saved


class ByteLM(L.LightningModule):
    def __init__(self, seq_len: int) -> None:
        super().__init__()
        self.model = TinyGPT(seq_len=seq_len)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        loss = F.cross_entropy(self.model(tokens).flatten(0, 1), targets.flatten())
        self.log("loss", loss, prog_bar=True)
        if batch_idx % 10 == 0:
            print(f"step {batch_idx:3d}  loss {loss.item():.3f}")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="ciuic")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--optimizer", default=None, help="adamw8bit or adamw4bit (with --strategy ciuic)")
    parser.add_argument("--fuse-update", action="store_true", help="update each parameter inside backward")
    args = parser.parse_args()
    if args.optimizer or args.fuse_update:
        from ciuic_integrations.lightning import CiuicStrategy

        if args.strategy != "ciuic":
            parser.error("--optimizer/--fuse-update go with --strategy ciuic")
        args.strategy = CiuicStrategy(optimizer=args.optimizer, fuse_update=args.fuse_update)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ByteDataset(args.seq_len), batch_size=args.batch_size, shuffle=True)
    trainer = L.Trainer(
        strategy=args.strategy, accelerator="cpu", devices=args.devices, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(ByteLM(args.seq_len), loader)
    if trainer.is_global_zero:
        print(memory_saved())


if __name__ == "__main__":
    main()
