"""benchmarks/gpu_suite.py --dry-run: the whole GPU suite at tiny sizes on the CPU, so it never rots."""

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_suite  # noqa: E402

pytestmark = [pytest.mark.xdist_group("gpu_suite")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "suite.json"
    gpu_suite.main(["--dry-run", "--out", str(out)])
    with open(out) as f:
        data = json.load(f)
    data["_png"] = str(out.with_suffix(".png"))
    return data


def test_dry_run_covers_every_section_and_variant(report):
    assert report["dry_run"] and report["skipped_for_time"] == []
    assert {r["codec"] for r in report["codecs"]} == set(gpu_suite.CODECS)
    for r in report["codecs"]:
        assert r["encode_GBps"] > 0 and r["decode_GBps"] > 0 and r["copy_GBps"] > 0, r
        assert r["packed_bytes"] < r["input_bytes"] and math.isfinite(r["rel_rmse"])
    assert {r["codec"] for r in report["codec_overhead"]} == set(gpu_suite.CODECS)
    assert all(r["encode_us"] > 0 and r["decode_us"] > 0 for r in report["codec_overhead"])
    steps = report["step"]
    assert [r["variant"] for r in steps] == list(gpu_suite.VARIANTS)
    for r in steps:
        assert "error" not in r and r["median_step_s"] > 0, r
    assert all(r["saved_ratio"] > 1 for r in steps if r["variant"] in ("2:1", "4:1", "8:1"))
    assert [r["variant"] for r in report["max_batch"]] == list(gpu_suite.VARIANTS)
    assert all(r["max_batch"] >= 1 and r["complete"] for r in report["max_batch"])
    os.path.getsize(report["_png"])  # the plot was written


def test_loss_curves_of_8_to_1_and_uncompressed_are_close_and_finite(report):
    loss = report["loss"]
    base, ours = loss["uncompressed"], loss["8:1"]
    assert len(base) == len(ours) == loss["config"]["steps"]
    assert all(math.isfinite(v) for v in base + ours)
    assert base[0] == pytest.approx(ours[0], rel=1e-3)  # same seed, same data, same first forward
    assert abs(loss["final_relative_difference"]) < 0.05


def test_without_cuda_a_real_run_says_how_to_dry_run(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: a real run would start")
    with pytest.raises(SystemExit):
        gpu_suite.main([])
    assert "--dry-run" in capsys.readouterr().err
