"""What the examples share: real text (Python's own standard-library sources, read byte by byte),
a small causal transformer, and the line that reports the memory ciuic saved."""

from __future__ import annotations

import glob
import os

import torch
import torch.nn as nn

import ciuic

VOCAB = 256  # bytes


def stdlib_text(num_bytes: int = 1 << 20) -> bytes:
    """The first ``num_bytes`` of the standard library's ``.py`` files, in a fixed order."""
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= num_bytes:
            break
    return b"".join(chunks)[:num_bytes]


class ByteDataset(torch.utils.data.Dataset):
    """Next-byte prediction: item i is (bytes[i*T : (i+1)*T], the same shifted by one)."""

    def __init__(self, seq_len: int = 128, num_bytes: int = 1 << 20) -> None:
        data = torch.tensor(list(stdlib_text(num_bytes)), dtype=torch.long)
        count = (len(data) - 1) // seq_len
        self.inputs = data[: count * seq_len].view(count, seq_len)
        self.targets = data[1 : count * seq_len + 1].view(count, seq_len)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


class TinyGPT(nn.Module):
    """A small causal transformer over bytes (pre-norm blocks, learned positions)."""

    def __init__(self, hidden: int = 64, layers: int = 2, heads: int = 4, seq_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.position = nn.Parameter(torch.zeros(seq_len, hidden))
        block = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.embed(tokens) + self.position[:length]
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def memory_saved() -> str:
    """What ciuic measured: the peak of the activations kept for backward, without and with it."""
    stats = ciuic.stats()
    if not stats.tensors_packed:
        return "ciuic: compression was off (no saved activation went through it)"
    mib = 2.0**20
    before, after = stats.peak_live_before / mib, stats.peak_live_after / mib
    return (
        f"activations kept for backward, at peak: {before:.2f} MiB without ciuic -> {after:.2f} MiB "
        f"with ciuic ({before - after:.2f} MiB saved, {stats.ratio:.2f}x over {stats.tensors_packed} tensors)"
    )
