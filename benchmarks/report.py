"""Render benchmarks/results/*.json as the markdown tables of BENCHMARKS.md.

    python benchmarks/report.py > /tmp/tables.md

Every number comes from a JSON file written by the benchmark script named in its table.
"""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _load(name: str) -> dict | None:
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def training_curves(dtype: str = "fp32") -> str:
    report = _load(f"training_curves_{dtype}.json")
    if report is None:
        return ""
    lines = [
        f"### Accuracy: char-level LLaMA, {report['steps']} steps, {report['dtype']}, lr {report.get('lr', '?')}",
        "",
        f"Device: {report['device']}, torch {report['torch']}, ciuic {report['ciuic']}, {report['date']}. "
        f"Command: `{report['command'].strip()}`",
        "",
        "| mode | eval loss | vs uncompressed | bound | kept for backward (MiB) | ratio | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        bound = "" if row["bound"] is None else f"+{row['bound']:.1%}"
        lines.append(f"| {row['mode']} | {row['eval_loss']:.4f} | {row['relative']:+.2%} | {bound} | "
                     f"{row['saved_bytes'] / 2**20:.1f} | {row['ratio']:.2f} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def activation_ratio() -> str:
    data = _load("activation_ratio.json")
    if not data:
        return ""
    out = []
    for key, report in data.items():
        out += [
            f"### Saved-activation ratio: five transformers models ({key})",
            "",
            f"{report['date']}, dropout {'on' if report.get('dropout') else 'off'}, "
            f"{report.get('warmup_steps', '?')} warm-up steps. Command: `{report['command']}`",
            "",
            "| model | dtype | mode | baseline MiB | ciuic MiB | ratio | heap ratio (mallinfo2) | agreement |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["results"]:
            for mode, m in r["modes"].items():
                out.append(
                    f"| {r['model']} | {r['dtype']} | {mode} | {r['baseline_bytes'] / 2**20:.2f} | "
                    f"{m['bytes_after'] / 2**20:.2f} | {m['ratio']:.2f} | {m['heap_ratio']:.2f} | "
                    f"{m['heap_agreement']:+.1%} |")
        out.append("")
        out.append("Models: " + "; ".join(sorted({r["description"] for r in report["results"]})) + ".")
        out.append("")
    return "\n".join(out)


def codecs() -> str:
    data = _load("codecs.json")
    if not data:
        return ""
    out = []
    for key, report in data.items():
        out += [
            f"### Codecs ({key}, backend {report['backend']})",
            "",
            f"{report['numel']:,} bf16 elements, median of {report['reps']}, {report['date']}. "
            f"Command: `{report['command']}`",
            "",
            "| codec | ratio vs bf16 | encode GB/s | decode GB/s | copy GB/s | encode / copy | decode / copy | rel. RMSE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["results"]:
            out.append(
                f"| {r['codec']} | {r['ratio_vs_bf16']:.2f} | {r['encode_gbps']:.3f} | {r['decode_gbps']:.3f} | "
                f"{r['copy_gbps']:.1f} | {r['encode_vs_copy']:.1%} | {r['decode_vs_copy']:.1%} | "
                f"{r['rel_rmse']:.4f} |")
        out.append("")
    return "\n".join(out)


def step_time() -> str:
    report = _load("step_time.json")
    if report is None:
        return ""
    lines = [
        f"### Step time ({report['device']}, torch {report['torch']}, {report['date']})",
        "",
        f"Command: `{report['command'].strip()}`. {report['note']}.",
        "",
        "| variant | median step (ms) | overhead vs uncompressed | kept for backward (MiB) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['median_step_s'] * 1e3:.1f} | {r['overhead']:+.1%} | "
                     f"{r['kept_bytes'] / 2**20:.2f} | {(r['ratio'] or 0):.2f} |")
    return "\n".join(lines) + "\n"


def gradient_fidelity() -> str:
    report = _load("gradient_fidelity.json")
    if report is None:
        return ""
    lines = [
        f"### Gradient fidelity per step (diagnostic; {report['device']}, torch {report['torch']}, {report['date']})",
        "",
        f"Command: `{report['command'].strip()}`",
        "",
        "| workload | dtype | mode | gradient cosine | relative error | ratio (engine) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['mode']} | {r['cosine']:.5f} | "
                     f"{r['relative_error']:.4f} | {r['engine_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for part in (training_curves("fp32"), activation_ratio(), gradient_fidelity(), step_time(), codecs()):
        if part:
            print(part)
