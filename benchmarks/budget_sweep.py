"""Can a byte budget be trusted? ``mode="auto", budget="N%"`` swept from 10% to 60% of the bytes the
uncompressed forward keeps for backward, on the char-level LLaMA (stdlib source, fp32).

For every budget, one training run from the same initial weights and batches:

- ``budget_bytes``, ``planned_bytes``, ``feasible``, ``min_bytes`` (smallest reachable at the lowest
  precision each tensor class allows) and ``pass_before``: the engine's plan (``ciuic.stats().plan``);
  ``met``: what ``ciuic.memory_report()`` says at the end of the run;
- ``kept``: bytes ciuic kept for backward in each pass, measured per pass (``stats().bytes_after``
  after the forward minus before it), split into passes run on a solved plan and calibration passes
  (the first, and every ``recalibrate_every``), which keep more while they measure;
- acceptance: ``max kept on a solved plan <= budget_bytes`` at every budget the report says is met;
- the eval loss after the run (held-out bytes, fixed batches) against the uncompressed baseline, and
  the bit widths the plan chose.

The uncompressed bytes are also counted independently (``SavedTensorMeter`` on the baseline run),
and compared with the plan's ``pass_before``. Writes ``benchmarks/results/budget_sweep.json`` (keyed
by device and versions) and ``budget_sweep.png``.

    python benchmarks/budget_sweep.py                         # 10%..60%, 300 steps, batch 16
    python benchmarks/budget_sweep.py --steps 120 --batch 8   # what fits ~10 minutes on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, git_revision, result_key, write_json  # noqa: E402

import ciuic  # noqa: E402
from ciuic._workloads import byte_splits, get_batch, tiny_llama  # noqa: E402
from ciuic.memory import SavedTensorMeter  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BUDGETS = (10, 20, 30, 40, 50, 60)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def run(budget: int | None, *, steps: int, batch: int, seq: int, lr: float, seed: int, eval_batches: int,
        data: tuple, progress=None, eval_seed: int | None = None) -> dict:
    """One training run: ``budget`` percent (``mode="auto"``) or None for the uncompressed baseline.
    ``seed`` sets the initial weights and the batches; the held-out batches come from ``eval_seed``
    (default: ``seed``)."""
    train, held_out = data
    model = tiny_llama(seed=seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    engine = None if budget is None else ciuic.compression("auto", budget=f"{budget}%")
    ciuic.reset_stats()
    record: dict = {"budget_percent": budget, "train_losses": [], "kept_solved": [], "kept_calibration": []}
    caught_warnings: list[str] = []
    start = time.perf_counter()
    for step in range(steps):
        x, y = get_batch(train, batch, seq, generator)
        if engine is None:
            meter = SavedTensorMeter() if step == 0 else None
            if meter is not None:
                with meter:
                    loss = _loss(model, x, y)
                record["meter_bytes"] = meter.bytes
            else:
                loss = _loss(model, x, y)
        else:
            before = ciuic.stats().bytes_after
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with engine:
                    loss = _loss(model, x, y)
            caught_warnings += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
            kept = ciuic.stats().bytes_after - before
            calibrating = bool(getattr(getattr(engine, "planner", None), "calibrating", False))
            record["kept_calibration" if calibrating else "kept_solved"].append(kept)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        record["train_losses"].append(value)
        if progress is not None:
            progress(step, value)
    record["seconds"] = time.perf_counter() - start
    model.eval()
    eval_generator = torch.Generator().manual_seed(10_000 + (seed if eval_seed is None else eval_seed))
    with torch.no_grad():
        losses = [float(_loss(model, *get_batch(held_out, batch, seq, eval_generator))) for _ in range(eval_batches)]
    record["eval_loss"] = sum(losses) / len(losses)
    if engine is not None:
        report = ciuic.memory_report() if hasattr(ciuic, "memory_report") else _report()
        plan = report.plan or {}
        levels: dict = {}
        for per_module in (plan.get("levels_by_module") or {}).values():
            for bits, count in per_module.items():
                levels[str(bits)] = levels.get(str(bits), 0) + count
        solved = record["kept_solved"]
        record.update({
            "budget_bytes": plan.get("budget_bytes"),
            "planned_bytes": plan.get("planned_bytes"),
            "min_bytes": plan.get("min_bytes"),
            "pass_before": plan.get("pass_before"),
            "feasible": plan.get("feasible"),
            "met": report.budget_met,
            "max_kept_solved": max(solved) if solved else None,
            "max_kept_calibration": max(record["kept_calibration"]) if record["kept_calibration"] else None,
            "calibration_passes": len(record["kept_calibration"]),
            "kept_within_budget": (max(solved) <= plan["budget_bytes"]) if solved and plan.get("budget_bytes") else None,
            "levels": levels,  # bits -> saved tensors in the last plan (0 = exact)
            "warnings": sorted(set(caught_warnings)),
            "report_summary": report.summary(),
        })
    return record


def _report():
    from ciuic.report import memory_report

    return memory_report()


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def trend_within_noise(base_loss: float, noise: list[float], runs: list[dict]) -> dict:
    """Does the eval loss degrade monotonically (within noise) as the budget shrinks? Noise =
    the standard deviation of the uncompressed eval loss over seeds (``base_loss`` and ``noise``).
    Monotone within noise: going to each smaller budget, the loss never drops by more than 2 sigma.
    Also: the budgets whose loss is more than 2 sigma above the uncompressed run."""
    losses = [base_loss] + list(noise)
    if len(losses) < 2:
        return {"sigma": None, "monotone": None, "worse_than_uncompressed": [],
                "text": "no noise estimate (--noise-seeds 0): trend not judged"}
    mean = sum(losses) / len(losses)
    sigma = (sum((v - mean) ** 2 for v in losses) / (len(losses) - 1)) ** 0.5
    ordered = sorted(runs, key=lambda r: -r["budget_percent"])  # largest budget first
    drops = [(a["budget_percent"], b["budget_percent"], a["eval_loss"] - b["eval_loss"])
             for a, b in zip(ordered, ordered[1:])]
    monotone = all(d <= 2 * sigma for _, _, d in drops)
    worse = [r["budget_percent"] for r in runs if r["eval_loss"] - base_loss > 2 * sigma]
    spread = f"{min(losses):.4f}..{max(losses):.4f}"
    text = (f"uncompressed eval loss over {len(losses)} seeds: {spread} (sigma {sigma:.4f}); "
            f"monotone within 2 sigma as the budget shrinks: {'yes' if monotone else 'NO'}; "
            f"budgets more than 2 sigma worse than uncompressed: {worse or 'none'}")
    return {"sigma": sigma, "seed_losses": losses, "monotone": monotone, "worse_than_uncompressed": worse,
            "drops": drops, "text": text}


def print_table(baseline: dict, runs: list[dict]) -> None:
    uncompressed = baseline["meter_bytes"]
    header = (f"{'budget':>7}{'budget MiB':>11}{'min MiB':>9}{'met':>5}{'kept MiB (max)':>15}{'kept/budget':>12}"
              f"{'calib MiB':>10}{'eval loss':>10}{'vs base':>9}  bits (tensors)")
    print(header)
    print("-" * len(header))
    print(f"{'none':>7}{_mib(uncompressed):>11}{'':>9}{'':>5}{_mib(uncompressed):>15}{'':>12}{'':>10}"
          f"{baseline['eval_loss']:>10.4f}{'':>9}")
    for r in runs:
        ratio = (r["max_kept_solved"] / r["budget_bytes"]) if r.get("max_kept_solved") and r.get("budget_bytes") else None
        bits = ", ".join(f"{'exact' if b == '0' else b + 'b'}: {n}" for b, n in
                         sorted(r["levels"].items(), key=lambda kv: -int(kv[0]) if kv[0] != "0" else -99))
        rel = r["eval_loss"] / baseline["eval_loss"] - 1
        print(f"{str(r['budget_percent']) + '%':>7}{_mib(r['budget_bytes']):>11}{_mib(r['min_bytes']):>9}"
              f"{'yes' if r['met'] else 'NO':>5}{_mib(r['max_kept_solved']):>15}"
              f"{'n/a' if ratio is None else f'{ratio:.3f}':>12}{_mib(r['max_kept_calibration']):>10}"
              f"{r['eval_loss']:>10.4f}{rel:>+9.2%}  {bits}")


def plot(baseline: dict, runs: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install ciuic[dev])")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r["budget_percent"] for r in runs]
    mib = 2.0**20
    left.bar([x - 1.5 for x in xs], [r["budget_bytes"] / mib for r in runs], width=3, color="#b0b0b0", label="budget")
    left.bar([x + 1.5 for x in xs], [(r["max_kept_solved"] or 0) / mib for r in runs], width=3,
             color=["#1f77b4" if r["met"] else "#d62728" for r in runs], label="kept (max over passes on the plan)")
    left.plot(xs, [r["min_bytes"] / mib for r in runs], "k:", marker=".", label="smallest reachable")
    left.scatter(xs, [(r["max_kept_calibration"] or 0) / mib for r in runs], marker="x", color="#ff7f0e", zorder=3,
                 label="kept by a calibration pass")
    left.set_xlabel("budget (% of the uncompressed pass)")
    left.set_ylabel("MiB kept for backward per pass")
    left.legend(fontsize=7)
    left.set_title("red: the report says NOT met", fontsize=8)
    right.plot(xs, [r["eval_loss"] for r in runs], marker="o", label="ciuic auto")
    right.axhline(baseline["eval_loss"], color="k", linestyle="--", linewidth=1, label="uncompressed")
    right.set_xlabel("budget (% of the uncompressed pass)")
    right.set_ylabel(f"eval loss after {len(baseline['train_losses'])} steps")
    right.legend(fontsize=8)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    """The BENCHMARKS.md section for one result (``--markdown``)."""
    base = report["runs"]["uncompressed"]
    lines = [
        f"### Budget sweep: `mode=\"auto\", budget=\"N%\"` ({report['device']}, {report['threads']} thread(s), "
        f"torch {report['torch']}, ciuic {report['git_revision']}, {report['date']})",
        "",
        f"{report['workload']}. Command: `{report['command'].strip()}` ({report['seconds'] / 60:.0f} min).",
        f"Uncompressed pass: {report['uncompressed_bytes'] / 2**20:.2f} MiB kept for backward (SavedTensorMeter; the "
        f"plan's own count agrees exactly). Kept = bytes ciuic kept in one pass, max over the passes run on a "
        f"solved plan; calibration = max over calibration passes (pass 1, then every 200).",
        "",
        "| budget | budget (MiB) | smallest reachable (MiB) | report says | kept, max (MiB) | kept / budget | "
        "calibration pass kept (MiB) | eval loss | vs uncompressed | bits in the plan (tensors) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| none | | | | {report['uncompressed_bytes'] / 2**20:.2f} | | | {base['eval_loss']:.4f} | | |",
    ]
    for row in report["summary"]:
        kept, budget = row["max_kept_solved"], row["budget_bytes"]
        bits = ", ".join(f"{'exact' if b == '0' else b + '-bit'} {n}" for b, n in
                         sorted(row["levels"].items(), key=lambda kv: -int(kv[0]) if kv[0] != "0" else -99))
        lines.append(
            f"| {row['budget_percent']}% | {budget / 2**20:.2f} | {row['min_bytes'] / 2**20:.2f} | "
            f"{'met' if row['met'] else 'NOT met'} | {kept / 2**20:.2f} | {kept / budget:.3f} | "
            f"{row['max_kept_calibration'] / 2**20:.2f} | {row['eval_loss']:.4f} | "
            f"{row['eval_loss'] / base['eval_loss'] - 1:+.2%} | {bits} |")
    verdict = "yes" if report["all_met_within_budget"] else "NO"
    lines += ["", f"Kept <= budget at every budget the report says is met: **{verdict}**."]
    trend = report.get("trend")
    if trend:
        lines += ["", f"Loss against noise: {trend['text']}."]
    return "\n".join(lines)


def _title(report: dict) -> str:
    return (f"mode='auto', budget=N% on {report['workload']} ({report['device']}, {report['threads']} thread(s), "
            f"torch {report['torch']}, ciuic {report['git_revision']})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                        help="comma-separated percentages of the uncompressed pass (each in 1..100)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--noise-seeds", type=int, default=3,
                        help="rerun the uncompressed baseline from this many other seeds (weights and batches; "
                             "same held-out batches): the seed-to-seed spread of the eval loss is the noise the "
                             "trend over budgets is judged against")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "budget_sweep"), help="path without extension")
    parser.add_argument("--markdown", action="store_true",
                        help="print the BENCHMARKS.md table of the latest result in the JSON, and exit")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the PNG from the JSON (the latest result of this device and versions)")
    args = parser.parse_args(argv)
    if args.plot_only or args.markdown:
        import json

        with open(args.out + ".json") as f:
            results = json.load(f)
        report = max((r for k, r in results.items() if k.startswith(result_key("cpu"))), key=lambda r: r["date"])
        if args.markdown:
            print(markdown(report))
            return report
        runs = [report["runs"][f"{r['budget_percent']}%"] for r in report["summary"]]
        plot(report["runs"]["uncompressed"], runs, args.out + ".png", _title(report))
        print_table(report["runs"]["uncompressed"], runs)
        return report
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--budgets {args.budgets!r} is not valid; allowed: comma-separated ints in 1..100") from None
    if not budgets or any(not 1 <= b <= 100 for b in budgets):
        raise SystemExit(f"--budgets {args.budgets!r} is not valid; allowed: comma-separated ints in 1..100")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = byte_splits()
    settings = dict(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed,
                    eval_batches=args.eval_batches, data=data)
    start = time.perf_counter()

    def progress(name: str):
        def show(step: int, loss: float) -> None:
            if step % 25 == 0 or step == args.steps - 1:
                print(f"  {name} step {step:4d} loss {loss:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
        return show

    print("uncompressed", flush=True)
    baseline = run(None, progress=progress("uncompressed"), **settings)
    noise = []  # the uncompressed run again from other seeds: how far eval losses move by chance
    for k in range(1, args.noise_seeds + 1):
        print(f"uncompressed, seed {args.seed + k}", flush=True)
        noise.append(run(None, progress=progress(f"seed {args.seed + k}"),
                         **{**settings, "seed": args.seed + k}, eval_seed=args.seed)["eval_loss"])
    runs = []
    for budget in budgets:
        print(f"budget {budget}%", flush=True)
        runs.append(run(budget, progress=progress(f"{budget}%"), **settings))
    print()
    print_table(baseline, runs)
    trend = trend_within_noise(baseline["eval_loss"], noise, runs)
    print(f"\n{trend['text']}")
    failures = [r["budget_percent"] for r in runs if r["met"] and not r["kept_within_budget"]]
    print(f"\nkept <= budget wherever the report says met: {'yes' if not failures else 'NO at ' + str(failures)}")
    for r in runs:
        if r["pass_before"]:
            print(f"  {r['budget_percent']}%: plan's uncompressed pass {r['pass_before']} B vs meter "
                  f"{baseline['meter_bytes']} B ({r['pass_before'] / baseline['meter_bytes'] - 1:+.2%})")

    command = "python benchmarks/budget_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = [{k: r.get(k) for k in ("budget_percent", "budget_bytes", "planned_bytes", "min_bytes", "feasible", "met",
                                      "max_kept_solved", "max_kept_calibration", "kept_within_budget", "eval_loss",
                                      "levels", "seconds")} for r in runs]
    report = {
        "benchmark": "budget_sweep",
        "device": device_name("cpu"),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ciuic": ciuic.__version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "workload": f"char-level LLaMA (hidden 128, 3 layers, 4 heads, vocab 256) on stdlib bytes, fp32, "
                    f"batch {args.batch} x {args.seq}, AdamW lr {args.lr}, {args.steps} steps",
        "settings": {k: v for k, v in settings.items() if k != "data"},
        "uncompressed_bytes": baseline["meter_bytes"],
        "baseline_eval_loss": baseline["eval_loss"],
        "all_met_within_budget": not failures,
        "noise_eval_losses": noise,
        "trend": trend,
        "summary": summary,
        "runs": {"uncompressed": baseline, **{f"{r['budget_percent']}%": r for r in runs}},
        "seconds": time.perf_counter() - start,
    }
    key = result_key("cpu") + f" | steps {args.steps} batch {args.batch}"
    write_json(args.out + ".json", key, report)
    plot(baseline, runs, args.out + ".png", _title(report))
    print(f"\nwrote {args.out}.json and {args.out}.png ({report['seconds']:.0f}s)")
    return report


if __name__ == "__main__":
    main()
