"""``ciuic.memory_report()`` and ``python -m ciuic report``.

The report is checked against independent meters: its totals against ``ciuic.stats()`` and the
bytes the uncompressed forward keeps (``SavedTensorMeter``), and the bytes it says ciuic keeps
against the C heap the autograd graph holds (glibc ``mallinfo2``), within 15%. The command runs
small scripts written here (and one shipped example) in a subprocess, as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import ciuic
from ciuic.memory import SavedTensorMeter, heap_available, heap_bytes, timeline_from_trace
from ciuic.report import CodecBytes, MemoryReport, ModuleRow, memory_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAP_TOLERANCE = 0.15
VOCAB = 256


@pytest.fixture(autouse=True)
def _clean_state():
    yield
    ciuic.disable_compression()


# ------------------------------------------------------------------------------------------------
# One compressed step of a small LLaMA (hidden 128, 2 layers, batch 2 x 256 tokens, fp32)
# ------------------------------------------------------------------------------------------------
class _Llama:
    def __init__(self, mode: str) -> None:
        from ciuic._workloads import tiny_llama

        self.model = tiny_llama(hidden=128, intermediate=352, layers=2, heads=4, vocab=VOCAB, seed=0).train()
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (2, 256), generator=generator)
        self.labels = torch.randint(0, VOCAB, (2, 256), generator=generator)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.engine = ciuic.compression(mode)

    def loss(self) -> torch.Tensor:
        # the input is copied so the graph is its only owner (the meter counts it, so must the heap)
        logits = self.model(input_ids=self.ids.clone(), use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), self.labels.reshape(-1))

    def step(self, context) -> None:
        with context:
            loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def measured_forward(self, context, after_forward=lambda: None):
        """(heap bytes the graph held after the forward, ``after_forward()``); as
        benchmarks/activation_ratio.py: read after forward, then once backward freed the graph."""
        self.optimizer.zero_grad(set_to_none=True)
        ciuic.empty_pool()  # buffers earlier steps left in ciuic's pack pool must not be freed mid-measure
        with context:
            loss = self.loss()
        seen = after_forward()
        held = heap_bytes() if heap_available() else None
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        del loss
        if held is not None:
            ciuic.empty_pool()  # this forward's freed packs wait in the pool: hand them back first
            held -= heap_bytes()
        return held, seen


@pytest.fixture(scope="module")
def llama_report():
    """The report of one 4:1 forward after two warm-up steps, with the meters it is checked against."""
    work = _Llama("4:1")
    work.step(contextlib.nullcontext())  # lazy initialisations must not land in a measurement
    meter = SavedTensorMeter()
    work.measured_forward(meter)
    for _ in range(2):  # calibration, then a step with the solved plan
        work.step(work.engine)
    ciuic.reset_stats()
    heap, (report, stats) = work.measured_forward(work.engine, lambda: (memory_report(), ciuic.stats()))
    return {"report": report, "stats": stats, "heap": heap, "baseline": meter.bytes, "after": ciuic.stats()}


_shared = pytest.mark.xdist_group("report_llama")  # one worker computes the fixture for these


@_shared
def test_totals_equal_stats(llama_report):
    report, st = llama_report["report"], llama_report["stats"]
    assert (report.bytes_before, report.bytes_after, report.tensors, report.passes) == (
        st.bytes_before, st.bytes_after, st.tensors_packed, st.passes)
    assert (report.live_before, report.live_after, report.peak_live_before, report.peak_live_after) == (
        st.live_before, st.live_after, st.peak_live_before, st.peak_live_after)
    assert report.passes == 1 and report.tensors > 0
    assert report.ratio == pytest.approx(st.ratio)
    # the pack pool's counters (emptied before the measured forward: its packs are new buffers)
    assert report.pool == st.pool and report.pool["allocations"] > 0
    assert f"pack pool: {report.pool['reuses']} of {report.pool['allocations'] + report.pool['reuses']}" in str(report)
    # the table is the per-module accounting, and per codec within each module
    assert {r.module: (r.tensors, r.before, r.after) for r in report.rows} == {
        m: (c.tensors, c.before, c.after) for m, c in st.by_module.items()}
    for row in report.rows:
        expected = {c: (v.tensors, v.before, v.after) for c, v in st.by_module_codec[row.module].items()}
        assert {c: (v.tensors, v.before, v.after) for c, v in row.codecs.items()} == expected, row.module
    # ...whose rows add up to the totals
    assert sum(r.before for r in report.rows) == report.bytes_before
    assert sum(r.after for r in report.rows) == report.bytes_after
    assert sum(r.tensors for r in report.rows) == report.tensors
    assert sum(report.share(r) for r in report.rows) == pytest.approx(1.0)
    assert [r.after for r in report.rows] == sorted((r.after for r in report.rows), reverse=True)
    # the totals stay the totals after backward freed the packs (only live bytes drop)
    after = llama_report["after"]
    assert (after.bytes_before, after.bytes_after) == (report.bytes_before, report.bytes_after)
    assert report.live_after == report.bytes_after and after.live_after == 0


@_shared
def test_before_equals_the_uncompressed_forward(llama_report):
    # an independent count: the bytes the same forward keeps without ciuic (accounting-only hooks)
    report = llama_report["report"]
    assert report.bytes_before == pytest.approx(llama_report["baseline"], rel=0.01)
    assert report.ratio >= 3.9  # 4:1 (the bound of tests/test_engine_ratio.py's 4:1 within noise)


@_shared
@pytest.mark.skipif(not heap_available(), reason="needs glibc mallinfo2 (Linux, glibc >= 2.33)")
def test_kept_bytes_agree_with_the_heap(llama_report):
    report, heap = llama_report["report"], llama_report["heap"]
    assert heap and heap > 0, f"no heap growth measured: {heap}"
    agreement = heap / report.bytes_after - 1
    assert abs(agreement) <= HEAP_TOLERANCE, (
        f"the graph held {heap} B of heap (mallinfo2) after the forward, the report says ciuic keeps "
        f"{report.bytes_after} B: {agreement:+.1%}, allowed ±{HEAP_TOLERANCE:.0%}\n{report}")


@_shared
def test_str_names_attention_and_mlp_modules(llama_report):
    report = llama_report["report"]
    text = str(report)
    for layer in (0, 1):
        assert f"model.layers.{layer}.self_attn" in text, text
        assert f"model.layers.{layer}.mlp" in text, text
    lines = text.splitlines()
    assert any(line.startswith("total") for line in lines)
    # rows come sorted by the bytes kept, and each names its codecs and bit widths
    attention = report.row("model.layers.0.self_attn")
    assert attention.codecs and attention.bits
    assert any(name.startswith("int") for r in report.rows for name in r.codecs), text
    for row in report.rows[:5]:
        line = next(line for line in lines if line.startswith(row.module + " "))
        for codec in row.codecs:
            assert codec in line, line
    assert f"ratio {report.ratio:.2f}" in text


@_shared
def test_grouped_by_layer(llama_report):
    report = llama_report["report"]
    layers = report.grouped(3)
    names = [r.module for r in layers.rows]
    assert {"model.layers.0", "model.layers.1"} <= set(names) and len(names) == len(set(names))
    assert not any(name.startswith("model.layers.0.") for name in names)
    assert (layers.bytes_before, layers.bytes_after) == (report.bytes_before, report.bytes_after)
    for name in names:  # each group is the sum of the modules under it
        members = [r for r in report.rows if r.module == name or r.module.startswith(name + ".")]
        row = layers.row(name)
        assert (row.tensors, row.before, row.after) == (
            sum(r.tensors for r in members), sum(r.before for r in members), sum(r.after for r in members))
        assert sum(c.after for c in row.codecs.values()) == row.after
    assert "model.layers.0 " in str(layers)
    with pytest.raises(ValueError, match="depth=0"):
        report.grouped(0)


@_shared
def test_json_round_trips(llama_report, tmp_path):
    report = llama_report["report"]
    path = report.to_json(str(tmp_path / "sub" / "report.json"))
    loaded = MemoryReport.from_json(path)
    assert loaded == report
    assert loaded.table() == report.table() and str(loaded) == str(report)
    with open(path) as f:
        data = json.load(f)
    assert data["bytes_after"] == report.bytes_after
    assert {r["module"] for r in data["rows"]} == {r.module for r in report.rows}
    assert data["ratio"] == pytest.approx(report.ratio)


@_shared
def test_plot_is_a_png_that_opens(llama_report, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    path = llama_report["report"].plot(str(tmp_path / "report.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


# ------------------------------------------------------------------------------------------------
# Budgets in the report
# ------------------------------------------------------------------------------------------------
def _auto_run(budget: str, steps: int = 3):
    from ciuic._workloads import tiny_llama

    model = tiny_llama(hidden=64, intermediate=176, layers=2, heads=2, seed=0).train()
    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(3))
    meter = SavedTensorMeter()
    with meter:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    engine = ciuic.compression("auto", budget=budget)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            if step == steps - 1:
                ciuic.reset_stats()  # the last pass alone: one pass of the solved plan
            with engine:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    return memory_report(), meter.bytes, [w for w in caught if issubclass(w.category, UserWarning)]


def test_fractional_budget_met_and_kept_bytes_within_it():
    report, baseline, _ = _auto_run("30%")
    plan = report.plan
    assert plan is not None, "no plan after a calibration pass"
    assert plan["pass_before"] == pytest.approx(baseline, rel=0.01)
    assert plan["budget_bytes"] == pytest.approx(0.30 * plan["pass_before"], rel=0.01)
    assert report.budget_met is True
    assert report.passes == 1
    assert report.bytes_after <= plan["budget_bytes"], report.summary()
    assert "budget per pass" in str(report) and ": met" in str(report)
    assert report.meta["mode"] == "auto"  # from the plan: the block has exited


def test_unreachable_budget_reported_not_met_with_the_smallest_size():
    report, baseline, caught = _auto_run("1%")
    plan = report.plan
    assert report.budget_met is False and plan["feasible"] is False
    assert plan["min_bytes"] > plan["budget_bytes"]
    text = str(report)
    assert "NOT met" in text and "smallest reachable" in text, text
    assert any("budget" in str(w.message) for w in caught), [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------
# CUDA fields and the timeline (logic checked on CPU)
# ------------------------------------------------------------------------------------------------
def test_cuda_peaks_and_fragmentation(monkeypatch):
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 7 * 2**30)
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda device=None: 9 * 2**30)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 2**30)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 8 * 2**30)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: "Fake GPU")
    report = memory_report()
    assert report.cuda["max_memory_allocated"] == 7 * 2**30
    assert report.cuda["max_memory_reserved"] == 9 * 2**30
    assert report.cuda["fragmentation_bytes"] == 2 * 2**30
    assert "fragmentation" in str(report) and "Fake GPU" in str(report) and "2.00 GiB" in str(report)


def test_timeline_from_trace():
    trace = [
        {"action": "segment_alloc", "size": 4096, "time_us": 1_000_000},
        {"action": "alloc", "size": 1024, "time_us": 1_000_100},
        {"action": "alloc", "size": 512, "time_us": 1_000_200},
        {"action": "free_requested", "size": 1024, "time_us": 1_000_300},  # not yet reusable: no change
        {"action": "free_completed", "size": 1024, "time_us": 1_500_000},
        {"action": "segment_free", "size": 4096, "time_us": 2_000_000},
    ]
    points = timeline_from_trace(trace, allocated=100, reserved=8192)
    assert points == [
        (0.0, 100, 12288), (0.0001, 1124, 12288), (0.0002, 1636, 12288), (0.5, 612, 12288), (1.0, 612, 8192)]


def test_plot_with_timeline(tmp_path):
    import matplotlib.image

    report = MemoryReport(
        rows=[ModuleRow("a.mlp", 2, 4096, 1024, {"int4": CodecBytes(2, 4096, 1024)})],
        bytes_before=4096, bytes_after=1024, tensors=2, passes=1,
        timeline=[(0.0, 0, 2**20), (0.5, 3 * 2**19, 2**21), (1.0, 2**19, 2**21)])
    path = report.plot(str(tmp_path / "t.png"))
    assert matplotlib.image.imread(path).shape[0] > 300
    assert MemoryReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_empty_report_says_so():
    ciuic.reset_stats()
    report = memory_report()
    assert report.rows == [] and report.bytes_after == 0
    assert "no saved tensor" in str(report)


def test_from_json_rejects_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a ciuic memory report"):
        MemoryReport.from_json(str(path))


# ------------------------------------------------------------------------------------------------
# python -m ciuic report
# ------------------------------------------------------------------------------------------------
TINY_SCRIPT = textwrap.dedent("""
    import argparse, sys
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fail-at", type=int, default=-1)
    args = parser.parse_args()
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self, h):
            super().__init__()
            self.attention = torch.nn.Linear(h, h)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(h, 4 * h), torch.nn.GELU(), torch.nn.Linear(4 * h, h))

        def forward(self, x):
            return x + self.mlp(x + self.attention(x))

    model = torch.nn.Sequential(Block(64), Block(64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(args.steps):
        if step == args.fail_at:
            raise RuntimeError("the script failed on purpose")
        x = torch.randn(16, 32, 64)
        try:
            loss = model(x).square().mean()
        except Exception:  # a script's own broad handler must not swallow the stop
            print("swallowed", flush=True)
            raise
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # an evaluation forward: not a training pass
            model(x)
        print("step", step, flush=True)
    print("script done", sys.argv[1:], flush=True)
""")


def _run_cli(args: list[str], cwd: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CIUIC_MODE", None)
    env.pop("CIUIC_STATS_DIR", None)
    return subprocess.run([sys.executable, "-m", "ciuic", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture
def tiny_script(tmp_path):
    path = tmp_path / "train_tiny.py"
    path.write_text(TINY_SCRIPT)
    return path


def test_cli_stops_after_steps_and_writes_the_report(tiny_script, tmp_path):
    out = tmp_path / "out"
    result = _run_cli(["report", "--steps", "3", "--out", str(out), str(tiny_script), "--steps", "10"], str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["step 0", "step 1", "step 2"], result.stdout  # stopped at the 4th training forward
    assert "script done" not in result.stdout and "swallowed" not in result.stdout
    assert "0.mlp" in result.stdout and "1.attention" in result.stdout and "total" in result.stdout
    assert "training pass 3/3" in result.stderr  # the progress line
    report = MemoryReport.from_json(str(out / "ciuic_report.json"))
    assert report.passes == 2  # 3 passes, the first (calibration) left out
    assert report.meta["mode"] == "4:1" and report.meta["script_args"] == ["--steps", "10"]
    assert report.ratio > 3.0 and report.plan is not None and report.budget_met
    # the printed table is the saved report's
    assert report.table() in result.stdout
    assert (out / "ciuic_report.png").stat().st_size > 10_000


def test_cli_short_script_failing_script_and_options(tiny_script, tmp_path):
    # a script that ends before --steps is reported as it ended
    out = tmp_path / "short"
    result = _run_cli(["report", "--mode", "8:1", "--steps", "5", "--warmup", "0", "--no-plot", "--depth", "1",
                       "--out", str(out), str(tiny_script), "--steps", "2"], str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "script done ['--steps', '2']" in result.stdout
    assert "fewer than --steps 5" in result.stderr
    report = MemoryReport.from_json(str(out / "ciuic_report.json"))
    assert report.passes == 2 and report.meta["mode"] == "8:1"
    assert not (out / "ciuic_report.png").exists()
    assert report.grouped(1).table() in result.stdout  # printed by block; the JSON keeps every module
    assert any(r.module == "0.mlp.0" for r in report.rows)
    # a failing script: its error is shown, its exit status kept, and what ran is still reported
    out = tmp_path / "failed"
    result = _run_cli(["report", "--budget", "40%", "--steps", "5", "--out", str(out), str(tiny_script),
                       "--fail-at", "2"], str(tmp_path))
    assert result.returncode == 1
    assert "the script failed on purpose" in result.stderr
    report = MemoryReport.from_json(str(out / "ciuic_report.json"))
    assert report.meta["mode"] == "auto" and report.meta["budget"] == pytest.approx(0.4)
    assert "RuntimeError" in report.meta["script_error"] and report.passes == 1
    # bad options name the value and what is allowed
    result = _run_cli(["report", "--mode", "3:1", str(tiny_script)], str(tmp_path))
    assert result.returncode != 0 and "'3:1'" in result.stderr and "4:1" in result.stderr
    result = _run_cli(["report", "--steps", "2", "--warmup", "2", str(tiny_script)], str(tmp_path))
    assert result.returncode != 0 and "--warmup 2" in result.stderr


def test_cli_runs_a_shipped_example(tmp_path):
    out = tmp_path / "out"
    script = os.path.join(ROOT, "examples", "train_accelerate.py")
    result = _run_cli(["report", "--steps", "3", "--out", str(out), script, "--steps", "20", "--seq-len", "64",
                       "--batch-size", "4"], ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "blocks.layers.0.self_attn" in result.stdout and "total" in result.stdout
    report = MemoryReport.from_json(str(out / "ciuic_report.json"))
    assert report.passes == 2 and report.ratio > 3.0


def test_cli_help_and_no_command():
    result = _run_cli(["report", "--help"], ROOT)
    assert result.returncode == 0 and "--steps" in result.stdout and "--budget" in result.stdout
    result = _run_cli([], ROOT)
    assert result.returncode == 2 and "report" in result.stdout


# ------------------------------------------------------------------------------------------------
# The integrations' report options write the same report
# ------------------------------------------------------------------------------------------------
def _byte_batches(count: int, batch: int = 4, seq: int = 32) -> list:
    data = torch.tensor(list(open(os.__file__, "rb").read()[: count * batch * seq]), dtype=torch.long)
    return list(data.view(count, batch, seq))


def _assert_report_of_the_run(directory, modules: tuple[str, ...]) -> MemoryReport:
    report = MemoryReport.from_json(os.path.join(directory, "ciuic_report.json"))
    st = ciuic.stats()
    assert (report.bytes_before, report.bytes_after, report.passes) == (st.bytes_before, st.bytes_after, st.passes)
    assert report.passes >= 2 and report.ratio > 2.0
    names = {r.module for r in report.rows}
    for module in modules:
        assert any(name.startswith(module) for name in names), (module, names)
    assert os.path.getsize(os.path.join(directory, "ciuic_report.png")) > 10_000
    return report


def test_lightning_strategy_report_dir(tmp_path):
    L = pytest.importorskip("lightning")
    from ciuic_integrations.lightning import CiuicStrategy

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(VOCAB, 64)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, VOCAB))

        def forward(self, tokens):
            return self.mlp(self.embed(tokens))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    strategy = CiuicStrategy(report_dir=str(tmp_path / "report"))
    assert strategy.ciuic_report_dir == str(tmp_path / "report")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    ciuic.reset_stats()
    trainer.fit(Lit(), torch.utils.data.DataLoader(_byte_batches(3), batch_size=None))
    report = _assert_report_of_the_run(tmp_path / "report", ("mlp",))
    assert report.passes == 3


def test_hf_trainer_ciuic_report_flag(tmp_path):
    pytest.importorskip("transformers")
    from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from ciuic_integrations.transformers import CiuicCallback, CiuicTrainer, CiuicTrainingArguments

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.rows = [row for b in _byte_batches(2) for row in b]

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    def model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))

    common = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to",
              "none", "--use_cpu", "--dataloader_num_workers", "0", "--logging_steps", "1"]
    out = tmp_path / "report"
    (args,) = HfArgumentParser(CiuicTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "run"), "--ciuic", "4:1", "--ciuic_report", str(out), *common])
    assert args.ciuic_report == str(out)
    ciuic.reset_stats()
    CiuicTrainer(model=model(), args=args, train_dataset=Data()).train()
    _assert_report_of_the_run(out, ("model.layers.0.self_attn", "model.layers.0.mlp"))
    # the callback on a stock Trainer, with its own folder
    out = tmp_path / "callback"
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "run2"), *common])
    ciuic.reset_stats()
    Trainer(model=model(), args=args, train_dataset=Data(),
            callbacks=[CiuicCallback("4:1", report_dir=str(out))]).train()
    _assert_report_of_the_run(out, ("model.layers.1.self_attn",))


def test_accelerate_launch_ciuic_stats_writes_the_report(tmp_path):
    pytest.importorskip("accelerate")
    launcher = os.path.join(os.path.dirname(sys.executable), "ciuic-accelerate")
    command = [launcher] if os.path.exists(launcher) else [sys.executable, "-m", "ciuic_integrations.accelerate"]
    out = tmp_path / "stats"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CIUIC_MODE", None)
    result = subprocess.run(
        [*command, "launch", "--ciuic", "4:1", "--ciuic_stats", str(out), "--cpu", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         os.path.join(ROOT, "examples", "train_accelerate.py"), "--steps", "3", "--seq-len", "64", "--batch-size", "4"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = MemoryReport.from_json(str(out / "ciuic_report.json"))
    with open(out / "ciuic_stats_rank0.json") as f:
        stats = json.load(f)["stats"]
    assert (report.bytes_before, report.bytes_after, report.passes) == (
        stats["bytes_before"], stats["bytes_after"], stats["passes"])
    assert report.passes == 3 and any(r.module.startswith("blocks.layers.0") for r in report.rows)
    assert (out / "ciuic_report.png").stat().st_size > 10_000
