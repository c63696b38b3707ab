"""Saved-activation ratio of ciuic on five transformers models, checked by an independent heap meter.

For LLaMA, GPT-2, BERT (masked LM), ViT (image classification) and T5 (encoder-decoder), built from
transformers configs with random weights, under fp32 and bf16 autocast, and for each mode:

(a) baseline: bytes the uncompressed forward keeps for backward (``ciuic.memory.SavedTensorMeter``:
    unique storages, parameters excluded);
(b) ciuic: bytes the engine keeps for that same forward (``ciuic.stats().bytes_after`` of one
    forward after ``reset_stats()``, measured after two warm-up training steps with the same
    engine, since the bit plan is solved after the first forward + backward);
    ratio = a / b;
(c) cross-check: heap bytes the autograd graph holds = ``heap_bytes()`` (glibc mallinfo2; on CUDA
    ``torch.cuda.memory_allocated()``) right after forward minus the same reading once the graph is
    gone (backward frees it, then the loss and gradients are dropped), for the baseline and for
    ciuic; heap ratio = baseline / ciuic. Acceptance: the heap ratio agrees with the accounting
    ratio within 15%.

The graph is freed by backward rather than by ``del loss``: a saved_tensors_hooks pack that returns
an op's own output as is (the meter always does, the engine does for tensors it keeps exact) makes
a reference cycle through C++ that ``del`` and ``gc`` cannot break; backward releases it.

Losses are float cross-entropies of the outputs against random labels from a private
``torch.Generator``. Writes ``benchmarks/results/activation_ratio.json`` (keyed by device, torch
and ciuic versions; other keys already in the file are kept) and ``activation_ratio.png``.

    python benchmarks/activation_ratio.py --quick            # CI-sized shapes (about a minute on a CPU core)
    python benchmarks/activation_ratio.py                    # hidden 256, batch 2 x 256 (~10 min on a CPU core)
    python benchmarks/activation_ratio.py --models llama,t5 --modes 4:1 --dtypes bf16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, git_revision, result_key, write_json  # noqa: E402
import torch.nn.functional as F

import ciuic
from ciuic.memory import SavedTensorMeter, heap_available, heap_bytes

MODELS = ("llama", "gpt2", "bert", "vit", "t5")
MODES = ("lossless", "2:1", "4:1", "8:1")
DTYPES = ("fp32", "bf16")
WARMUP_STEPS = 2  # the engine solves its bit plan after the first forward + backward
HEAP_TOLERANCE = 0.15  # |heap ratio / accounting ratio - 1| must stay within this
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Shape:
    """Model width and input size. ``seq`` is the token count (ViT: image patches + [CLS])."""

    hidden: int
    layers: int
    heads: int
    batch: int
    seq: int
    vocab: int

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden  # GPT-2, BERT, ViT, T5

    @property
    def gated_intermediate(self) -> int:
        return 11 * self.hidden // 4  # LLaMA's SwiGLU MLP (TinyLlama: 5632 / 2048)


# seq >= 256 everywhere; ViT uses a 256x256 image with 16x16 patches: 256 patches + [CLS] = 257 tokens.
SHAPES = {
    "quick": Shape(hidden=64, layers=2, heads=2, batch=1, seq=256, vocab=256),
    "full": Shape(hidden=256, layers=2, heads=4, batch=2, seq=256, vocab=1024),
}


@dataclass
class Workload:
    """A model in training mode and a closure computing its float loss on one fixed batch."""

    name: str
    model: torch.nn.Module
    loss: Callable[[], torch.Tensor]
    description: str
    device: str


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _without_dropout(config: Any) -> Any:
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key) and hasattr(config, key):
            setattr(config, key, 0.0)
    return config


def build_workload(name: str, shape: Shape, seed: int = 0, device: str = "cpu", dropout: bool = True) -> Workload:
    """One of ``MODELS`` with random weights (seeded) and a batch from a private generator.

    ``dropout=True`` keeps each config's default dropout (GPT-2, BERT, T5: 0.1; LLaMA, ViT: 0);
    ``False`` sets every dropout probability to 0.

    The loss closure copies its inputs first, so the autograd graph is their only owner: the
    meter counts a saved input (ViT's pixels, saved by the patch convolution) and so must the heap.
    """
    import transformers

    torch.manual_seed(seed)  # weight init only; the batch uses its own generator
    cpu = torch.Generator().manual_seed(seed + 1)

    def tokens(high: int, *size: int) -> torch.Tensor:
        return torch.randint(0, high, size, generator=cpu).to(device)

    h, n, a, b, t, v = shape.hidden, shape.layers, shape.heads, shape.batch, shape.seq, shape.vocab
    common = dict(attn_implementation="sdpa")
    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=v, hidden_size=h, intermediate_size=shape.gated_intermediate, num_hidden_layers=n,
            num_attention_heads=a, num_key_value_heads=a, max_position_embeddings=t, **common)
        model = transformers.LlamaForCausalLM(config if dropout else _without_dropout(config))
        ids, labels = tokens(v, b, t), tokens(v, b, t)

        def loss() -> torch.Tensor:
            return _token_loss(model(input_ids=ids.clone(), use_cache=False).logits, labels)
    elif name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=v, n_embd=h, n_layer=n, n_head=a, n_positions=t, n_inner=shape.intermediate,
            bos_token_id=0, eos_token_id=0, **common)
        model = transformers.GPT2LMHeadModel(config if dropout else _without_dropout(config))
        ids, labels = tokens(v, b, t), tokens(v, b, t)

        def loss() -> torch.Tensor:
            return _token_loss(model(input_ids=ids.clone(), use_cache=False).logits, labels)
    elif name == "bert":
        config = transformers.BertConfig(
            vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
            intermediate_size=shape.intermediate, max_position_embeddings=t, **common)
        model = transformers.BertForMaskedLM(config if dropout else _without_dropout(config))
        ids, labels = tokens(v, b, t), tokens(v, b, t)

        def loss() -> torch.Tensor:
            return _token_loss(model(input_ids=ids.clone()).logits, labels)
    elif name == "vit":
        side = 16 * round((t - 1) ** 0.5)  # (side / 16)**2 patches + [CLS]
        config = transformers.ViTConfig(
            image_size=side, patch_size=16, num_channels=3, hidden_size=h, num_hidden_layers=n,
            num_attention_heads=a, intermediate_size=shape.intermediate, num_labels=10, **common)
        model = transformers.ViTForImageClassification(config if dropout else _without_dropout(config))
        pixels = torch.randn(b, 3, side, side, generator=cpu).to(device)
        labels = tokens(10, b)

        def loss() -> torch.Tensor:
            return F.cross_entropy(model(pixel_values=pixels.clone()).logits.float(), labels)
    elif name == "t5":
        config = transformers.T5Config(
            vocab_size=v, d_model=h, d_kv=h // a, d_ff=shape.intermediate, num_layers=n,
            num_decoder_layers=n, num_heads=a, decoder_start_token_id=0, **common)
        model = transformers.T5ForConditionalGeneration(config if dropout else _without_dropout(config))
        ids, decoder_ids = tokens(v, b, t), tokens(v, b, t)
        labels = tokens(v, b, t)

        def loss() -> torch.Tensor:
            out = model(input_ids=ids.clone(), decoder_input_ids=decoder_ids.clone(), use_cache=False)
            return _token_loss(out.logits, labels)
    else:
        raise ValueError(f"model={name!r} is not valid; allowed: {', '.join(map(repr, MODELS))}")
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    description = (f"{type(model).__name__} hidden {h}, {n} layers, {a} heads, batch {b} x {t} tokens"
                   + (f", vocab {v}" if name != "vit" else "") + f", {params / 1e6:.2f}M params"
                   + ("" if dropout else ", dropout off"))
    return Workload(name=name, model=model, loss=loss, description=description, device=device)


def _autocast(device: str, dtype: str) -> Any:
    return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")


class HeapMeter:
    """Bytes the process holds: ``torch.cuda.memory_allocated`` on CUDA, glibc mallinfo2 on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.name = "cuda.memory_allocated" if device == "cuda" else "mallinfo2 (uordblks + hblkhd)"

    def available(self) -> bool:
        return self.device == "cuda" or heap_available()

    def __call__(self) -> int:
        if self.device == "cuda":
            gc.collect()
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return heap_bytes()


def _train_step(workload: Workload, optimizer: torch.optim.Optimizer, dtype: str, context: Any) -> None:
    with context, _autocast(workload.device, dtype):
        loss = workload.loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _measured_forward(workload: Workload, optimizer: torch.optim.Optimizer, dtype: str, context: Any,
                      meter: HeapMeter, after_forward: Callable[[], Any] = lambda: None) -> tuple[int | None, Any]:
    """One forward inside ``context``. Returns (heap bytes the graph held, ``after_forward()``)."""
    optimizer.zero_grad(set_to_none=True)
    check = meter.available()
    if check:
        ciuic.empty_pool()  # buffers earlier steps left in ciuic's pack pool must not be freed mid-measure
    # autocast's weight-cast cache is freed when autocast exits, before the heap is read
    with context, _autocast(workload.device, dtype):
        loss = workload.loss()
    seen = after_forward()
    held = meter() if check else None
    loss.backward()  # frees the graph (see the module docstring)
    optimizer.zero_grad(set_to_none=True)
    del loss
    if check:
        ciuic.empty_pool()  # this forward's freed packs wait in the pool: hand them back first
        held -= meter()
    return held, seen


def measure(model: str, dtype: str, modes: tuple[str, ...] = MODES, *, shape: Shape | None = None,
            seed: int = 0, device: str = "cpu", dropout: bool = True, warmup: int = WARMUP_STEPS,
            progress: Callable[[str], None] | None = None) -> dict:
    """The baseline and every mode for one model and dtype, on one model instance.

    Returns a JSON-ready dict: ``baseline_bytes`` (meter), ``baseline_heap_bytes`` and, per mode,
    ``bytes_after``, ``ratio`` (baseline_bytes / bytes_after), ``heap_bytes``, ``heap_ratio``,
    ``heap_agreement`` (heap_ratio / ratio - 1) and the engine's per-class and per-codec bytes.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; allowed: {', '.join(map(repr, DTYPES))}")
    for mode in modes:
        ciuic.CompressionConfig.from_value(mode)  # fail before minutes of work
    shape = shape or SHAPES["quick"]
    say = progress or (lambda message: None)
    workload = build_workload(model, shape, seed, device, dropout)
    meter = HeapMeter(device)
    optimizer = torch.optim.AdamW(workload.model.parameters(), lr=1e-4)

    start = time.perf_counter()
    # one uncompressed step first: lazy initialisations that persist must not land in a measurement
    _train_step(workload, optimizer, dtype, contextlib.nullcontext())
    counter = SavedTensorMeter()
    heap_base, _ = _measured_forward(workload, optimizer, dtype, counter, meter)
    baseline = counter.bytes
    say(f"{model:<6}{dtype:<5} baseline   kept {_mib(baseline):8.2f} MiB ({time.perf_counter() - start:.1f}s)")
    record = {
        "model": model, "dtype": dtype, "description": workload.description,
        "shape": dict(shape.__dict__), "device": device, "dropout": dropout, "warmup_steps": warmup,
        "heap_meter": meter.name,
        "baseline_bytes": baseline, "baseline_tensors": counter.tensors, "baseline_heap_bytes": heap_base,
        "modes": {},
    }
    for mode in modes:
        start = time.perf_counter()
        engine = ciuic.compression(mode)
        for _ in range(warmup):  # calibration forward + backward, then a step with the solved plan
            _train_step(workload, optimizer, dtype, engine)
        ciuic.reset_stats()
        heap, st = _measured_forward(workload, optimizer, dtype, engine, meter, after_forward=ciuic.stats)
        ratio = baseline / st.bytes_after if st.bytes_after else float("inf")
        heap_ratio = heap_base / heap if heap_base and heap and heap > 0 else None
        agreement = heap_ratio / ratio - 1 if heap_ratio is not None else None
        record["modes"][mode] = {
            "bytes_after": st.bytes_after,
            "ratio": ratio,
            "heap_bytes": heap,
            "heap_ratio": heap_ratio,
            "heap_agreement": agreement,
            "heap_within_tolerance": None if agreement is None else abs(agreement) <= HEAP_TOLERANCE,
            "engine_bytes_before": st.bytes_before,
            "engine_ratio": st.ratio,
            "tensors_packed": st.tensors_packed,
            "by_class": _table(st.by_class),
            "by_codec": _table(st.by_codec),
            "seconds": time.perf_counter() - start,
        }
        heap_text = "n/a" if heap_ratio is None else f"{heap_ratio:5.2f} ({agreement:+.1%})"
        say(f"{model:<6}{dtype:<5} {mode:<10} kept {_mib(st.bytes_after):8.2f} MiB  ratio {ratio:5.2f}  "
            f"heap ratio {heap_text} ({time.perf_counter() - start:.1f}s)")
    return record


def _table(counts: dict) -> dict:
    return {k: {"tensors": c.tensors, "before": c.before, "after": c.after} for k, c in counts.items()}


def _mib(n: int | None) -> float:
    return float("nan") if n is None else n / 2**20


def print_table(records: list[dict]) -> None:
    header = (f"{'model':<7}{'dtype':<6}{'mode':<10}{'baseline MiB':>13}{'ciuic MiB':>11}{'ratio':>8}"
              f"{'heap base MiB':>15}{'heap ciuic MiB':>16}{'heap ratio':>11}{'agree':>8}")
    print(header)
    print("-" * len(header))
    for r in records:
        for mode, m in r["modes"].items():
            agree = "n/a" if m["heap_agreement"] is None else f"{m['heap_agreement']:+.1%}"
            heap_ratio = "n/a" if m["heap_ratio"] is None else f"{m['heap_ratio']:.2f}"
            print(f"{r['model']:<7}{r['dtype']:<6}{mode:<10}{_mib(r['baseline_bytes']):>13.2f}"
                  f"{_mib(m['bytes_after']):>11.2f}{m['ratio']:>8.2f}{_mib(r['baseline_heap_bytes']):>15.2f}"
                  f"{_mib(m['heap_bytes']):>16.2f}{heap_ratio:>11}{agree:>8}")


def plot(records: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install ciuic[dev])")
        return
    modes = [m for m in MODES if any(m in r["modes"] for r in records)]
    groups = [f"{r['model']}\n{r['dtype']}" for r in records]
    width = 0.8 / max(1, 2 * len(modes))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(records) + 3), 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        acct = [r["modes"].get(mode, {}).get("ratio", float("nan")) for r in records]
        heap = [r["modes"].get(mode, {}).get("heap_ratio") or float("nan") for r in records]
        xs = [g + (2 * i - len(modes) + 0.5) * width for g in range(len(records))]
        ax.bar(xs, acct, width, color=colors[i % len(colors)], label=f"{mode} accounting")
        ax.bar([x + width for x in xs], heap, width, color=colors[i % len(colors)], alpha=0.45,
               hatch="//", label=f"{mode} heap")
        if mode in ("2:1", "4:1", "8:1"):
            ax.axhline(float(mode.split(":")[0]), color=colors[i % len(colors)], linestyle=":", linewidth=0.8)
    tallest = max([m.get(k) or 0 for r in records for m in r["modes"].values() for k in ("ratio", "heap_ratio")] + [1])
    ax.set_ylim(0, tallest * 1.3)  # room for the legend above the bars
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("bytes kept for backward: uncompressed / ciuic")
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=len(modes), fontsize=7, loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"--{what} {text!r} is not valid; allowed: a comma-separated subset of {', '.join(allowed)}")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized shapes (hidden 64, 2 layers, batch 1 x 256); results go to *_quick.png "
                             "and a '| quick' key of the JSON")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-dropout", action="store_true",
                        help="set every dropout probability to 0 (default: each config's own, 0.1 for GPT-2/BERT/T5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "activation_ratio"),
                        help="path without extension of the .json and .png")
    args = parser.parse_args(argv)
    models = _choices(args.models, MODELS, "models")
    modes = _choices(args.modes, MODES, "modes")
    dtypes = _choices(args.dtypes, DTYPES, "dtypes")
    size = "quick" if args.quick else "full"
    shape = SHAPES[size]

    records = []
    total = len(models) * len(dtypes)
    start = time.perf_counter()
    for i, (model, dtype) in enumerate(((m, d) for m in models for d in dtypes), 1):
        print(f"[{i}/{total}] {model} {dtype} ({time.perf_counter() - start:.0f}s elapsed)", flush=True)
        records.append(measure(model, dtype, modes, shape=shape, seed=args.seed, device=args.device,
                               dropout=not args.no_dropout, progress=lambda s: print("   " + s, flush=True)))
    print()
    print_table(records)
    agreements = [m["heap_agreement"] for r in records for m in r["modes"].values() if m["heap_agreement"] is not None]
    if agreements:
        worst = max(agreements, key=abs)
        print(f"\nheap vs accounting: worst disagreement {worst:+.1%} (acceptance: within {HEAP_TOLERANCE:.0%})")

    command = "python benchmarks/activation_ratio.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "benchmark": "activation_ratio",
        "device": device_name(args.device), "torch": torch.__version__, "ciuic": ciuic.__version__,
        "python": sys.version.split()[0], "git": git_revision(), "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"), "command": command.strip(),
        "shape": size, "dropout": not args.no_dropout, "heap_tolerance": HEAP_TOLERANCE, "warmup_steps": WARMUP_STEPS,
        "seconds": round(time.perf_counter() - start, 1),
        "results": records,
    }
    tags = (["quick"] if args.quick else []) + (["no dropout"] if args.no_dropout else [])
    key = " | ".join([result_key(args.device), *tags])
    png = args.out + "".join("_" + tag.replace(" ", "_") for tag in tags) + ".png"
    write_json(args.out + ".json", key, report)
    plot(records, png, f"saved-activation ratio: {shape.hidden} hidden, {shape.layers} layers, batch "
         f"{shape.batch} x {shape.seq} tokens; {device_name(args.device)}, torch {torch.__version__}")
    print(f"wrote {args.out}.json ({key!r}) and {png}")
    return report


if __name__ == "__main__":
    main()
