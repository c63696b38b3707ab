"""The examples run end to end (short settings) and print the memory ciuic saved."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SAVED = re.compile(r"([0-9.]+) MiB without ciuic -> ([0-9.]+) MiB with ciuic")
SHORT = ["--steps", "3", "--seq-len", "64", "--batch-size", "4"]


def ciuic_accelerate() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "ciuic-accelerate")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "ciuic_integrations.accelerate"]


def run(command: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CIUIC_MODE", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def assert_saved(output: str) -> None:
    match = SAVED.search(output)
    assert match, output[-3000:]
    before, after = map(float, match.groups())
    assert after < before / 3, match.group(0)  # the default mode is 4:1


@pytest.mark.parametrize("script, extra", [
    pytest.param("train_lightning.py", SHORT, id="lightning"),
    pytest.param("train_fabric.py", SHORT, id="fabric"),
    pytest.param("train_accelerate.py", SHORT + ["--plugin", "4:1"], id="accelerate-plugin"),
    pytest.param("train_hf_trainer.py", ["--ciuic", "4:1", "--max_steps", "3", "--per_device_train_batch_size", "4"],
                 id="hf-trainer"),
])
def test_example_runs_and_reports_memory_saved(script, extra):
    assert_saved(run([sys.executable, os.path.join(EXAMPLES, script), *extra]))


def test_accelerate_example_under_the_launch_flag():
    output = run([
        *ciuic_accelerate(), "launch", "--ciuic", "4:1", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(EXAMPLES, "train_accelerate.py"), *SHORT,
    ])
    match = re.search(r"peak ([0-9.]+) MiB -> ([0-9.]+) MiB", output)
    assert match, output[-3000:]
    assert float(match.group(2)) < float(match.group(1)) / 3
