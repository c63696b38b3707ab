"""Accelerate: `ciuic-accelerate launch --ciuic` (1 and 2 CPU processes) and CiuicAccelerator, for real."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ciuic

pytest.importorskip("accelerate")

from accelerate.commands.launch import launch_command_parser  # noqa: E402

from ciuic_integrations.accelerate import CiuicAccelerator, CiuicPlugin, launch_parser, main  # noqa: E402

# A stock accelerate training script: it never mentions ciuic. It records what it saw; the
# compression accounting comes from the bootstrap (--ciuic_stats).
TRAIN_SCRIPT = textwrap.dedent(
    """
    import inspect, json, os, sys

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from accelerate import Accelerator


    def main(out_dir, steps):
        accelerator = Accelerator()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(256, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 256))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        raw = torch.tensor(list(inspect.getsource(os).encode()[: 16 * 65]), dtype=torch.long).view(16, 65)
        dataset = torch.utils.data.TensorDataset(raw[:, :-1], raw[:, 1:])
        loader = torch.utils.data.DataLoader(dataset, batch_size=4)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        losses = []
        for (tokens, targets), _ in zip(loader, range(steps)):
            loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        record = {
            "rank": accelerator.process_index, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "argv": sys.argv, "name": __name__,
            "file": __file__, "losses": losses, "ciuic_loaded": "ciuic" in sys.modules,
        }
        with open(os.path.join(out_dir, f"script_rank{accelerator.process_index}.json"), "w") as f:
            json.dump(record, f)


    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]))
    """
)

ACCELERATE_DEFAULTS = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def cli() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "ciuic-accelerate")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "ciuic_integrations.accelerate"]


def launch(tmp_path, launch_args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    (tmp_path / "out").mkdir()
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env.pop("CIUIC_MODE", None)
    result = subprocess.run(
        [*cli(), "launch", *launch_args, *ACCELERATE_DEFAULTS, "train.py", "out", "2"],
        capture_output=True, text=True, timeout=300, env=full_env, cwd=tmp_path,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def read(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "out" / name).read_text())


# ------------------------------------------------------------------------------------------------
# The launcher
# ------------------------------------------------------------------------------------------------
def test_launch_one_process_compresses_an_unmodified_script(tmp_path):
    result = launch(tmp_path, ["--ciuic", "4:1", "--ciuic_stats", "out", "--cpu", "--num_processes", "1"])
    script = read(tmp_path, "script_rank0.json")
    # The script ran as under `python train.py out 2`: same argv tail, __main__, its own __file__.
    assert script["name"] == "__main__" and script["argv"][1:] == ["out", "2"]
    assert script["file"] == str(tmp_path / "train.py") and len(script["losses"]) == 2
    accounting = read(tmp_path, "ciuic_stats_rank0.json")
    assert accounting["config"]["mode"] == "4:1"
    assert accounting["stats"]["tensors_packed"] > 0 and accounting["stats"]["ratio"] >= 3.5
    assert "ciuic: saved activations" in result.stderr


def test_launch_two_processes_compresses_in_every_process(tmp_path):
    # accelerate starts several CPU processes through its multi-process launcher (torchrun):
    # `--cpu` alone runs one process unless MPI is installed; ACCELERATE_USE_CPU keeps them on CPU.
    launch(
        tmp_path,
        ["--ciuic", '{"mode": "8:1", "group_size": 128}', "--ciuic-stats", "out", "--multi_gpu",
         "--num_processes", "2", "--main_process_port", "0"],
        env={"ACCELERATE_USE_CPU": "1"},
    )
    for rank in (0, 1):
        script = read(tmp_path, f"script_rank{rank}.json")
        assert script["num_processes"] == 2 and script["distributed_type"] == "DistributedType.MULTI_CPU"
        accounting = read(tmp_path, f"ciuic_stats_rank{rank}.json")
        assert accounting["rank"] == rank and accounting["world_size"] == 2
        assert (accounting["config"]["mode"], accounting["config"]["group_size"]) == ("8:1", 128)
        assert accounting["stats"]["tensors_packed"] > 0 and accounting["stats"]["ratio"] >= 3.5


def test_launch_without_the_flag_is_plain_accelerate(tmp_path):
    launch(tmp_path, ["--cpu", "--num_processes", "1"])
    assert read(tmp_path, "script_rank0.json")["ciuic_loaded"] is False
    assert sorted(os.listdir(tmp_path / "out")) == ["script_rank0.json"]


def test_every_accelerate_launch_option_still_parses():
    theirs = launch_command_parser()
    ours = launch_parser()
    their_options = {s for action in theirs._actions for s in action.option_strings}
    our_options = {s for action in ours._actions for s in action.option_strings}
    assert their_options <= our_options
    assert {"--ciuic", "--ciuic_stats"} <= our_options
    stock = [
        "--cpu", "--num_processes", "2", "--num-machines", "1", "--mixed_precision", "bf16",
        "--main_process_port", "0", "--gradient_accumulation_steps", "2", "--debug",
    ]
    script = ["train.py", "--lr", "3", "--ciuic", "the script's own flag"]
    their_args = vars(theirs.parse_args(stock + script))
    our_args = vars(ours.parse_args(stock + ["--ciuic", "2:1"] + script))
    assert our_args.pop("ciuic") == "2:1" and our_args.pop("ciuic_stats") is None
    # the optimizer settings (issue 9) are ours too, at their defaults when not given
    assert our_args.pop("ciuic_optim") is None and our_args.pop("ciuic_fuse_update") is False
    our_args["nondefault"] = our_args["nondefault"] - {"ciuic"}  # accelerate tracks flags given
    assert our_args == their_args
    assert our_args["training_script_args"] == script[1:]
    help_text = ours.format_help()
    assert "--ciuic_stats" in help_text and "Activation compression in every launched process" in help_text
    assert "--num_processes" in help_text


@pytest.mark.parametrize("argv, message", [
    (["launch", "--ciuic", "3:1", "train.py"], "4:1"),
    (["launch", "--ciuic", "4:1", "--no_python", "train.sh"], "--no_python"),
    (["launch", "--ciuic_stats", "out", "train.py"], "--ciuic MODE"),
])
def test_launch_errors_before_starting_anything(argv, message, monkeypatch):
    monkeypatch.delenv("CIUIC_MODE", raising=False)
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert "CIUIC_MODE" not in os.environ


# ------------------------------------------------------------------------------------------------
# CiuicAccelerator(ciuic_plugin=CiuicPlugin(...))
# ------------------------------------------------------------------------------------------------
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(256, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 256))


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.tensor(list(inspect.getsource(os).encode()[: 4 * 65]), dtype=torch.long).view(4, 65)
    return raw[:, :-1], raw[:, 1:]


def train_steps(accelerator, steps: int = 3) -> tuple[nn.Module, list]:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    seen = []
    model[1].register_forward_hook(lambda *_: seen.append(ciuic.is_enabled()))
    tokens, targets = text_batch()
    for _ in range(steps):
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model(tokens)  # an evaluation forward with grad on: still not compressed
    return model, seen


def test_ciuic_accelerator_compresses_training_forwards_only():
    ciuic.reset_stats()
    accelerator = CiuicAccelerator(cpu=True, ciuic_plugin=CiuicPlugin(mode="4:1"))
    model, seen = train_steps(accelerator)
    assert seen == [True, True, True, False]
    stats = ciuic.stats()
    assert stats.tensors_packed > 0 and stats.ratio >= 3.5
    assert not ciuic.is_enabled()
    # accelerate's own unwrapping still reaches the original module.
    assert type(accelerator.unwrap_model(model)) is nn.Sequential


def test_ciuic_accelerator_without_plugin_is_plain():
    ciuic.reset_stats()
    _, seen = train_steps(CiuicAccelerator(cpu=True))
    assert seen == [False] * 4 and ciuic.stats().tensors_packed == 0


def test_plugin_reads_the_launcher_environment_and_validates(monkeypatch):
    monkeypatch.setenv("CIUIC_MODE", '{"mode": "2:1", "rounding": "stochastic"}')
    plugin = CiuicPlugin()
    assert (plugin.compression_config.mode, plugin.compression_config.rounding) == ("2:1", "stochastic")
    monkeypatch.delenv("CIUIC_MODE")
    assert CiuicPlugin().compression_config.mode == "4:1"
    assert CiuicPlugin(mode="auto", options={"budget": "2MB"}).compression_config.budget == 2 * 10**6
    with pytest.raises(ValueError, match="8:1"):
        CiuicPlugin(mode="16:1")
    with pytest.raises(ValueError, match="off"):
        CiuicPlugin(mode="off")
