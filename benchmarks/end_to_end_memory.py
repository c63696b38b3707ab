"""End-to-end peak memory of a training step: everything ciuic has on vs bf16 autocast + fp32 AdamW.

Workload: a LLaMA-style causal LM (transformers ``LlamaConfig``, random init, SDPA attention,
byte vocabulary) trained on Python standard-library source bytes, the same seed, batches and
held-out batches for every configuration. The default config is chosen so that parameters (and
their optimizer state) and saved activations are both a large share of the baseline's peak.

Configurations (each runs in its own fresh process, so one never sees the other's heap):
  baseline   fp32 weights, bf16 autocast, ``torch.optim.AdamW`` (fp32 moments), gradients kept
             until ``step()`` (the usual mixed-precision recipe)
  ciuic      bf16 weights updated with stochastic rounding (no fp32 master copy), 4-bit AdamW
             moments (``ciuic.optim.AdamW(state_bits=4, bf16_stochastic_round=True)``), the update
             fused into backward (``ciuic.optim.fuse_into_backward``: no full set of gradients),
             saved activations at 4:1 (``ciuic.compression("4:1", model=model)``, which also turns
             on the memory-lean LM head), bf16 autocast
  activations_only   (ablation) the baseline with saved activations at 4:1 (``ciuic.compression``)
  optimizer_only     (ablation) ciuic's optimizer side alone: bf16 weights + stochastic rounding,
             4-bit AdamW, fused update, activations uncompressed
  bf16_weights_only  (ablation) bf16 weights + stochastic rounding, fp32 moments
             (``ciuic.optim.AdamW(state_bits=32, ...)``), fused update, activations uncompressed
  state4_only        (ablation) fp32 weights, 4-bit moments, update after backward, activations
             uncompressed, bf16 autocast

Both compute the loss as ``model(input_ids, labels=input_ids).loss`` (Hugging Face's shifted
causal-LM loss), lr 1e-3, betas (0.9, 0.999), weight decay 0.01, no gradient clipping.

Meters (independent of ciuic's own accounting): the process's **peak RSS** over each measured
step (``VmHWM`` of /proc/self/status, reset before the step by writing 5 to
/proc/self/clear_refs), minus the RSS the process had before the model was built (imports, data,
torch's thread pools); and the **peak glibc heap** (``mallinfo2`` uordblks + hblkhd, sampled by a
thread every ~0.5 ms during the measured steps) minus the heap before the model was built. The
peak is the maximum over steps ``--measure`` (after warm-up and the bit plan's calibration).

The framework rows run the same model and config for a few steps through Lightning
(``Trainer(strategy=CiuicStrategy(optimizer="adamw4bit", fuse_update=True), precision="bf16-true")``
vs ``Trainer(precision="bf16-mixed")`` with ``torch.optim.AdamW``) and through the Hugging Face
``Trainer`` (``CiuicTrainingArguments(ciuic="4:1", ciuic_optim="adamw4bit", ciuic_fuse_update=True)``
with the model in bf16 vs ``TrainingArguments(bf16=True)`` with fp32 weights), with the same two
meters; every worker imports the framework and the model's code before its pre-model readings.

    python benchmarks/end_to_end_memory.py                       # 300 steps + framework rows
    python benchmarks/end_to_end_memory.py --steps 20 --no-frameworks   # quick look
    python benchmarks/end_to_end_memory.py --configs state4_only,optimizer_only   # ablations
    python benchmarks/end_to_end_memory.py --configs baseline,ciuic --seed 1      # another seed

Writes ``benchmarks/results/end_to_end_memory.json`` (keyed by device and versions) and a PNG;
ablations and seeds other than 0 go to ``end_to_end_memory_ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIGS = ("baseline", "ciuic")
# ablations: which part of "everything on" moves the loss (run with --configs; not in the default pair)
ABLATIONS = ("activations_only", "optimizer_only", "bf16_weights_only", "state4_only")
FRAMEWORK_RUNS = ("lightning_baseline", "lightning_ciuic", "hf_baseline", "hf_ciuic")
MEMORY_TARGET, LOSS_TARGET = 3.0, 0.02


# ------------------------------------------------------------------------------------------------
# Meters
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


class HeapSampler:
    """Peak of glibc ``mallinfo2`` heap bytes (uordblks + hblkhd) while running, sampled by a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        from ciuic.memory import _libc

        self._lib = _libc()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> int:
        info = self._lib.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def __enter__(self) -> "HeapSampler":
        self.peak = self.now()
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.now())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# ------------------------------------------------------------------------------------------------
# One configuration, in its own process
# ------------------------------------------------------------------------------------------------
def _model_config(args) -> dict:
    return dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                vocab=256, max_positions=max(1024, args.seq))


def _eval_loss(model, held_out, args, autocast) -> float:
    import torch

    from ciuic._workloads import get_batch

    generator = torch.Generator().manual_seed(10_000)
    model.eval()
    losses = []
    with torch.no_grad(), autocast:
        for _ in range(args.eval_batches):
            x, _ = get_batch(held_out, args.batch, args.seq, generator)
            losses.append(float(model(input_ids=x, labels=x).loss))
    model.train()
    return sum(losses) / len(losses)


def _import_model_code() -> None:
    """Import what building and preparing the model imports, before the pre-model readings: an
    import's heap stays for the life of the process and is not training memory (transformers' LLaMA
    modules alone hold ~5 MiB; the framework rows before 2026-11-26 counted it in every step's peak)."""
    import ciuic_integrations._hf_lm_head  # noqa: F401  (what compression(model=...) imports)
    import transformers.models.llama.modeling_llama  # noqa: F401


def run_config(name: str, args) -> dict:
    import gc

    import torch

    import ciuic
    from ciuic._workloads import byte_splits, get_batch, tiny_llama
    from ciuic.memory import SavedTensorMeter
    from ciuic.optim import AdamW, fuse_into_backward, state_nbytes

    _import_model_code()  # before the pre-model readings
    torch.set_num_threads(args.threads)
    train, held_out = byte_splits(2_000_000)
    generator = torch.Generator().manual_seed(1 + args.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    gc.collect()
    rss_before, heap_before = rss_bytes(), HeapSampler().now()

    model = tiny_llama(seed=args.seed, **_model_config(args))
    parameters = sum(p.numel() for p in model.parameters())
    model.train()
    engine = None
    handle = None
    if name in ("baseline", "activations_only"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    elif name == "state4_only":
        optimizer = AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, state_bits=4)
    else:
        model.to(torch.bfloat16)
        optimizer = AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                          state_bits=32 if name == "bf16_weights_only" else 4, bf16_stochastic_round=True)
        handle = fuse_into_backward(optimizer)
    if name in ("ciuic", "activations_only"):
        engine = ciuic.compression("4:1", model=model)

    measure = set(range(args.measure_from, args.measure_from + args.measure))
    record: dict = {"config": name, "seed": args.seed, "parameters": parameters, "train_losses": [], "steps": args.steps,
                    "peak_rss_step": [], "peak_heap_step": []}
    start = time.perf_counter()
    for step in range(args.steps):
        x, _ = get_batch(train, args.batch, args.seq, generator)
        measured = step in measure
        if measured:
            gc.collect()
            reset_peak_rss()
            sampler = HeapSampler().__enter__()
        if engine is not None:
            engine.__enter__()
        try:
            if engine is None and step == args.measure_from:
                with SavedTensorMeter() as meter, autocast:
                    loss = model(input_ids=x, labels=x).loss
                record["saved_activation_bytes"] = meter.bytes
            else:
                with autocast:
                    loss = model(input_ids=x, labels=x).loss
        finally:
            if engine is not None:
                engine.__exit__(None, None, None)
        if engine is not None and step == args.measure_from:
            record["saved_activation_bytes"] = ciuic.stats().live_after
        loss.backward()
        if handle is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        record["train_losses"].append(float(loss.detach()))
        del loss
        if measured:
            sampler.__exit__(None, None, None)
            record["peak_rss_step"].append(peak_rss_bytes() - rss_before)
            record["peak_heap_step"].append(sampler.peak - heap_before)
        if args.progress and step % 10 == 0:
            print(f"[{name}] step {step} loss {record['train_losses'][-1]:.4f} "
                  f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    record["seconds"] = time.perf_counter() - start
    if handle is not None:
        handle.remove()
    record["optimizer_state_bytes"] = state_nbytes(optimizer)
    record["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    record["eval_loss"] = _eval_loss(model, held_out, args, autocast)
    record["peak_rss"] = max(record["peak_rss_step"])
    record["peak_heap"] = max(record["peak_heap_step"])
    return record


# ------------------------------------------------------------------------------------------------
# Framework rows (a few steps each, peak RSS)
# ------------------------------------------------------------------------------------------------
def _token_dataset(args, size: int):
    import torch

    from ciuic._workloads import byte_splits, get_batch

    train, _ = byte_splits(2_000_000)
    x, _ = get_batch(train, size, args.seq, torch.Generator().manual_seed(1))
    return x


def run_framework(name: str, args) -> dict:
    import gc

    import torch

    from ciuic._workloads import tiny_llama

    torch.set_num_threads(args.threads)
    steps = args.framework_steps
    tokens = _token_dataset(args, args.batch * steps)
    _import_model_code()  # and the framework, below: neither import is training memory
    if name.startswith("lightning"):
        import lightning  # noqa: F401

        import ciuic_integrations.lightning  # noqa: F401
    else:
        import transformers.trainer  # noqa: F401

        import ciuic_integrations.transformers  # noqa: F401
    gc.collect()
    rss_before, heap_before = rss_bytes(), HeapSampler().now()
    model = tiny_llama(seed=0, **_model_config(args))
    peaks: list[int] = []
    heap_peaks: list[int] = []
    losses: list[float] = []
    optimizer_types: list[str] = []
    sampler: list = []

    def on_step_start() -> None:
        gc.collect()
        reset_peak_rss()
        sampler[:] = [HeapSampler().__enter__()]

    def on_step_end(loss: float) -> None:
        sampler[0].__exit__(None, None, None)
        peaks.append(peak_rss_bytes() - rss_before)
        heap_peaks.append(sampler[0].peak - heap_before)
        losses.append(loss)

    if name.startswith("lightning"):
        import lightning as L

        import ciuic  # noqa: F401  (registers the strategies)
        from ciuic_integrations.lightning import CiuicStrategy

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def on_train_batch_start(self, batch, batch_idx):
                on_step_start()

            def training_step(self, batch, batch_idx):
                return self.model(input_ids=batch, labels=batch).loss

            def on_train_batch_end(self, outputs, batch, batch_idx):
                optimizer_types.append(type(self.trainer.optimizers[0]).__module__ + "." +
                                       type(self.trainer.optimizers[0]).__name__)
                on_step_end(float(outputs["loss"]))

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=args.lr, weight_decay=0.01)

        loader = torch.utils.data.DataLoader(tokens, batch_size=args.batch)
        if name == "lightning_baseline":
            strategy, precision = "auto", "bf16-mixed"
        else:
            strategy = CiuicStrategy(mode="4:1", optimizer="adamw4bit", fuse_update=True, lean_lm_head=True)
            precision = "bf16-true"
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision=precision, max_steps=steps,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(Module(), loader)
    else:
        import tempfile

        from transformers import TrainerCallback

        from ciuic_integrations.transformers import CiuicTrainer, CiuicTrainingArguments

        class Meter(TrainerCallback):
            def on_step_begin(self, *a, **k):
                on_step_start()

            def on_step_end(self, args_, state, control, **kwargs):
                optimizer = kwargs["optimizer"]
                inner = getattr(optimizer, "optimizer", optimizer)
                optimizer_types.append(type(inner).__module__ + "." + type(inner).__name__)
                on_step_end(float("nan"))  # the loss arrives in on_log, after this

            def on_log(self, args_, state, control, logs=None, **kwargs):
                if logs and "loss" in logs and losses and losses[-1] != losses[-1]:
                    losses[-1] = float(logs["loss"])  # logging_steps=1: this step's loss

        dataset = [{"input_ids": row, "labels": row} for row in tokens]
        common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=steps,
                      learning_rate=args.lr, weight_decay=0.01, report_to=[], save_strategy="no",
                      logging_strategy="steps", logging_steps=1, use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="constant")
        if name == "hf_baseline":
            training_args = CiuicTrainingArguments(bf16=True, **common)
        else:
            model.to(torch.bfloat16)
            training_args = CiuicTrainingArguments(ciuic="4:1", ciuic_optim="adamw4bit", ciuic_fuse_update=True,
                                                   max_grad_norm=0.0, **common)
        CiuicTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[Meter()]).train()
    # the first steps build the bit plan / lazy state: the peak of the later steps
    settled = peaks[2:] if len(peaks) > 2 else peaks
    heap_settled = heap_peaks[2:] if len(heap_peaks) > 2 else heap_peaks
    return {"run": name, "steps": steps, "peak_rss_step": peaks, "peak_rss": max(settled),
            "peak_heap_step": heap_peaks, "peak_heap": max(heap_settled),
            "optimizer": sorted(set(optimizer_types)), "losses": losses}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _child(kind: str, name: str, args, argv: list[str]) -> dict:
    out = os.path.join(RESULTS, f".e2e_{name}.{os.getpid()}.json")  # drivers may run side by side
    command = [sys.executable, os.path.abspath(__file__), *argv, f"--{kind}", name, "--out", out]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    runs = report["runs"]
    for name, run in runs.items():
        left.plot(run["train_losses"], label=f"{name} (eval {run['eval_loss']:.3f})", lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("train loss")
    left.legend()
    names = list(runs) + [r for r in report.get("frameworks", {})]
    values = [runs[n]["peak_rss"] / 2**20 for n in runs] + [
        report["frameworks"][r]["peak_rss"] / 2**20 for r in report.get("frameworks", {})]
    right.barh(names, values)
    right.set_xlabel("peak RSS over a step (MiB, above the pre-model RSS)")
    fig.suptitle(f"end-to-end memory, {report['model']['parameters'] / 1e6:.1f}M params, "
                 f"batch {report['shape']['batch']} x {report['shape']['seq']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _tail_loss(run: dict, last: int = 20) -> float | None:
    """Mean of the last ``last`` recorded training losses of a framework run (None without any)."""
    values = [v for v in run.get("losses", []) if v == v]
    return sum(values[-last:]) / len(values[-last:]) if values else None


def markdown(report: dict) -> str:
    """The BENCHMARKS.md section for one stored report."""
    mib = 2.0**20
    m, shape, runs = report["model"], report["shape"], report["runs"]
    lines = [
        f"{report['date']}, {report['device']}, torch {report['torch']}, {report['threads']} threads, ciuic "
        f"{report['git_revision']}. Command: `{report['command']}`",
        "",
        f"Model: LLaMA-style, hidden {m['hidden']}, intermediate {m['intermediate']}, {m['layers']} layers, "
        f"{m['heads']} heads, vocabulary 256 ({m['parameters'] / 1e6:.2f}M parameters); batch {shape['batch']} x "
        f"{shape['seq']} tokens; {report['steps']} steps, lr {report['lr']}.",
        "",
        "| configuration | peak RSS over a step (MiB) | peak heap, mallinfo2 (MiB) | saved activations (MiB) | "
        "optimizer state (MiB) | parameters (MiB) | eval loss | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['peak_rss'] / mib:.1f} | {run['peak_heap'] / mib:.1f} | "
            f"{run.get('saved_activation_bytes', 0) / mib:.1f} | {run['optimizer_state_bytes'] / mib:.2f} | "
            f"{run['parameter_bytes'] / mib:.1f} | {run['eval_loss']:.4f} | {run['seconds']:.0f} |")
    summary = report.get("summary", {})
    if "peak_rss_ratio" in summary:
        lines += ["", f"Peak memory ratio (baseline / ciuic): **{summary['peak_rss_ratio']:.2f}x** by peak RSS, "
                  f"**{summary['peak_heap_ratio']:.2f}x** by mallinfo2 heap (target >= {MEMORY_TARGET:.0f}x); "
                  f"eval loss change {summary['eval_loss_change'] * 100:+.2f}% (target within "
                  f"{LOSS_TARGET * 100:.0f}%)."]
    if report.get("frameworks"):
        lines += ["", f"Through the frameworks ({report['frameworks'][next(iter(report['frameworks']))]['steps']} "
                  f"steps each, peak RSS of the steps after the first two). Command: `{report.get('framework_command')}`",
                  "", "| run | peak RSS over a step (MiB) | optimizer in use |", "|---|---|---|"]
        lines[-2:] = ["| run | peak RSS over a step (MiB) | peak heap, mallinfo2 (MiB) | train loss, mean of the "
                      "last 20 steps | optimizer in use |", "|---|---|---|---|---|"]
        frameworks = report["frameworks"]
        for name, run in frameworks.items():
            tail = _tail_loss(run)
            lines.append(f"| {name} | {run['peak_rss'] / mib:.1f} | {run.get('peak_heap', float('nan')) / mib:.1f} | "
                         f"{'n/a' if tail is None else f'{tail:.4f}'} | {', '.join(run['optimizer'])} |")
        for prefix, label in (("lightning", "Lightning"), ("hf", "HF Trainer")):
            base, ours = frameworks.get(f"{prefix}_baseline"), frameworks.get(f"{prefix}_ciuic")
            if base is None or ours is None:
                continue
            line = (f"\n{label}: baseline / ciuic peak RSS **{base['peak_rss'] / ours['peak_rss']:.2f}x**, peak heap "
                    f"**{base['peak_heap'] / ours['peak_heap']:.2f}x**")
            tails = _tail_loss(base), _tail_loss(ours)
            if None not in tails:
                line += f"; train loss (mean of the last 20 steps) {tails[1] / tails[0] - 1:+.2%}"
            lines.append(line + ".")
    return "\n".join(lines)


def _store_ablation(args, configs: list[str], argv: list[str], shape: dict) -> None:
    """Ablations and other seeds go to their own file (end_to_end_memory_ablation.json), one entry
    per ``"<config> seed <seed>"``, merged with the entries already there for the same model."""
    from _common import git_revision, result_key, write_json

    path = os.path.join(RESULTS, "end_to_end_memory_ablation.json")
    for name in configs:
        run = _child("worker", name, args, argv)
        run.update(git_revision=git_revision(), date=time.strftime("%Y-%m-%d"),
                   command="python benchmarks/end_to_end_memory.py " + " ".join(sys.argv[1:]))
        print(f"{name} seed {args.seed}: eval loss {run['eval_loss']:.4f}, peak heap "
              f"{run['peak_heap'] / 2**20:.1f} MiB, {run['seconds']:.0f}s", flush=True)
        stored: dict = {}  # read again after each run: another driver may have added its own
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f).get(result_key("cpu"), {})
        same = (stored.get("model"), stored.get("shape"), stored.get("steps")) == (
            shape["model"], shape["shape"], args.steps)
        runs = {**(stored.get("runs", {}) if same else {}), f"{name} seed {args.seed}": run}
        write_json(path, result_key("cpu"), {**shape, "steps": args.steps, "lr": args.lr, "runs": runs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0,
                        help="model init seed; the batch order uses seed + 1 (0: the recorded runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure-from", type=int, default=3)
    parser.add_argument("--measure", type=int, default=3)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--framework-steps", type=int, default=4)
    parser.add_argument("--no-frameworks", action="store_true")
    parser.add_argument("--frameworks-only", action="store_true",
                        help="run only the framework rows (stored in end_to_end_memory_frameworks.json; "
                        "the next full run or --merge-only adds them to the report)")
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md section of the stored report")
    parser.add_argument("--merge-only", action="store_true",
                        help="add the stored framework rows to the stored report, run nothing")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS + ABLATIONS)}")
    parser.add_argument("--framework-runs", default=",".join(FRAMEWORK_RUNS), help="with --frameworks-only")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--worker", choices=CONFIGS + ABLATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=FRAMEWORK_RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker or args.framework:
        result = run_config(args.worker, args) if args.worker else run_framework(args.framework, args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    sys.path.insert(0, HERE)
    import torch

    from _common import device_name, git_revision, result_key, write_json

    argv = [a for a in sys.argv[1:] if a not in ("--no-frameworks", "--frameworks-only")]
    path = os.path.join(RESULTS, "end_to_end_memory.json")
    previous: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f).get(result_key("cpu"), {})
    side_path = os.path.join(RESULTS, "end_to_end_memory_frameworks.json")
    shape = {"model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads")},
             "shape": {"batch": args.batch, "seq": args.seq}}
    if args.markdown:
        print(markdown(previous))
        return
    if args.frameworks_only:
        frameworks = {name: _child("framework", name, args, argv) for name in args.framework_runs.split(",")}
        write_json(side_path, result_key("cpu"), {
            **shape, "frameworks": frameworks, "date": time.strftime("%Y-%m-%d"), "git_revision": git_revision(),
            "command": "python benchmarks/end_to_end_memory.py " + " ".join(sys.argv[1:])})
        for name, run in frameworks.items():
            print(f"{name:20s} peak RSS {run['peak_rss'] / 2**20:8.1f} MiB  optimizer {run['optimizer']}")
        return
    if args.merge_only:
        if not previous.get("runs"):
            raise SystemExit("--merge-only needs a stored report for this device")
        runs = previous["runs"]
        args.steps, args.lr = previous["steps"], previous["lr"]
        frameworks = {}
    else:
        configs = args.configs.split(",")
        unknown = [c for c in configs if c not in CONFIGS + ABLATIONS]
        if unknown:
            parser.error(f"--configs: unknown {', '.join(unknown)}; allowed: {', '.join(CONFIGS + ABLATIONS)}")
        if args.seed != 0 or not set(configs) <= set(CONFIGS):
            _store_ablation(args, configs, argv, shape)
            return
        runs = {name: _child("worker", name, args, argv) for name in configs}
        frameworks = {} if args.no_frameworks else {name: _child("framework", name, args, argv)
                                                   for name in FRAMEWORK_RUNS}
    side: dict = {}
    if not frameworks and os.path.exists(side_path):
        with open(side_path) as f:
            side = json.load(f).get(result_key("cpu"), {})
        if side.get("model") == shape["model"] and side.get("shape") == shape["shape"]:
            frameworks = side["frameworks"]
        else:
            side = {}
    report = {
        "date": time.strftime("%Y-%m-%d"), "device": device_name("cpu"), "torch": torch.__version__,
        "git_revision": git_revision(), "threads": args.threads,
        "command": "python benchmarks/end_to_end_memory.py " + " ".join(sys.argv[1:]),
        "framework_command": side.get("command") or ("python benchmarks/end_to_end_memory.py " + " ".join(sys.argv[1:])),
        "framework_date": side.get("date"), "framework_git_revision": side.get("git_revision"),
        "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                  "heads": args.heads, "vocab": 256,
                  "parameters": next(iter(runs.values()))["parameters"]},
        "shape": {"batch": args.batch, "seq": args.seq}, "steps": args.steps, "lr": args.lr,
        "runs": runs, "frameworks": frameworks,
    }
    if "baseline" in runs and "ciuic" in runs:
        base, ours = runs["baseline"], runs["ciuic"]
        report["summary"] = {
            "peak_rss_ratio": base["peak_rss"] / ours["peak_rss"],
            "peak_heap_ratio": base["peak_heap"] / ours["peak_heap"],
            "eval_loss_change": ours["eval_loss"] / base["eval_loss"] - 1,
            "memory_target": MEMORY_TARGET, "loss_target": LOSS_TARGET,
        }
    for pair in (("lightning_baseline", "lightning_ciuic"), ("hf_baseline", "hf_ciuic")):
        if all(p in frameworks for p in pair):
            for meter in ("peak_rss", "peak_heap"):
                report.setdefault("summary", {})[f"{pair[0].split('_')[0]}_{meter}_ratio"] = (
                    frameworks[pair[0]][meter] / frameworks[pair[1]][meter])
    if args.merge_only:
        report.update({k: previous[k] for k in ("date", "git_revision", "command", "model", "shape", "threads")
                       if k in previous})
    write_json(path, result_key("cpu"), report)
    _plot(report, os.path.join(RESULTS, "end_to_end_memory.png"))
    print(json.dumps(report.get("summary", {}), indent=1))
    mib = 2.0**20
    for name, run in runs.items():
        print(f"{name:10s} peak RSS {run['peak_rss'] / mib:8.1f} MiB  peak heap {run['peak_heap'] / mib:8.1f} MiB  "
              f"eval loss {run['eval_loss']:.4f}  {run['seconds']:.0f}s")
    for name, run in frameworks.items():
        print(f"{name:20s} peak RSS {run['peak_rss'] / mib:8.1f} MiB  optimizer {run['optimizer']}")


if __name__ == "__main__":
    main()
