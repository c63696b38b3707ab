"""Lightning Trainer and Fabric with strategy="ciuic", on CPU with the real frameworks.

The two-process DDP test runs this file as a script: Lightning's DDP launcher starts the second
process by re-running the same command, so the script part (``_ddp_main``) is at the bottom.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ciuic

L = pytest.importorskip("lightning")

VOCAB, HIDDEN, SEQ = 256, 32, 64


def text_dataset(sequences: int = 32, seq: int = SEQ) -> torch.utils.data.TensorDataset:
    """Byte-level language modelling on real text: the source of Python's ``os`` module."""
    raw = torch.tensor(list(inspect.getsource(os).encode()[: sequences * (seq + 1)]), dtype=torch.long)
    raw = raw.view(sequences, seq + 1)
    return torch.utils.data.TensorDataset(raw[:, :-1], raw[:, 1:])


class TinyLM(nn.Module):
    """A 2-layer causal transformer, hidden 32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, 4, 2 * HIDDEN, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.blocks(self.embed(tokens), mask=mask, is_causal=True))


class LitLM(L.LightningModule):
    """Records the loss of every training step and whether compression was on in each phase."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyLM()
        self.losses: list[float] = []
        self.compressing: dict[str, set] = {"train": set(), "val": set()}

    def training_step(self, batch, batch_idx):
        self.compressing["train"].add(ciuic.is_enabled())
        tokens, targets = batch
        loss = F.cross_entropy(self.model(tokens).flatten(0, 1), targets.flatten())
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        self.compressing["val"].add(ciuic.is_enabled())
        tokens, targets = batch
        return F.cross_entropy(self.model(tokens).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(strategy, steps: int = 6, **trainer_options) -> tuple[LitLM, ciuic.CompressionStats]:
    options = dict(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1, val_check_interval=3,
    )
    options.update(trainer_options)
    module = LitLM()
    loader = torch.utils.data.DataLoader(text_dataset(), batch_size=4)
    ciuic.reset_stats()
    L.Trainer(strategy=strategy, **options).fit(module, loader, loader)
    return module, ciuic.stats()


@pytest.fixture(scope="module")
def plain_run():
    return fit("auto")


# ------------------------------------------------------------------------------------------------
# Registration: the names exist after `import ciuic` alone, and importing ciuic imports no framework
# ------------------------------------------------------------------------------------------------
def run_python(code: str, timeout: float = 180) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result.stdout


NAMES = ["ciuic", "ciuic_ddp", "ciuic_lossless", "ciuic_2:1", "ciuic_4:1", "ciuic_8:1", "ciuic_ddp_8:1"]
FRAMEWORKS = ["lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers"]


@pytest.mark.parametrize("order", ["ciuic_first", "lightning_first"])
def test_strategy_names_registered_after_import_ciuic(order):
    # One interpreter per order (a subprocess: this one has imported everything already).
    if order == "ciuic_first":
        imports = f"import sys, ciuic\nloaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\nimport lightning, pytorch_lightning"
    else:
        imports = "import lightning, pytorch_lightning, ciuic\nloaded = []"
    out = run_python(
        f"{imports}\n"
        "import json\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "from lightning.fabric.strategies import STRATEGY_REGISTRY\n"
        "standalone = pytorch_lightning.strategies.StrategyRegistry\n"
        "print(json.dumps([loaded, sorted(k for k in StrategyRegistry if 'ciuic' in k),\n"
        "                  sorted(k for k in STRATEGY_REGISTRY if 'ciuic' in k),\n"
        "                  sorted(k for k in standalone if 'ciuic' in k),\n"
        "                  type(StrategyRegistry.get('ciuic_8:1')).__name__,\n"
        "                  StrategyRegistry.get('ciuic_8:1').ciuic_config.mode,\n"
        "                  isinstance(standalone.get('ciuic'), pytorch_lightning.strategies.SingleDeviceStrategy)]))\n"
    )
    loaded, trainer_names, fabric_names, standalone_names, cls, mode, standalone_ok = json.loads(
        out.strip().splitlines()[-1]
    )
    assert loaded == [], f"import ciuic imported {loaded}"
    for names in (trainer_names, fabric_names, standalone_names):
        assert set(NAMES) <= set(names)
    assert (cls, mode, standalone_ok) == ("CiuicStrategy", "8:1", True)


def test_registration_is_idempotent_and_keeps_foreign_entries():
    from lightning.pytorch.strategies import StrategyRegistry, SingleDeviceStrategy

    from ciuic_integrations import _register_lazy
    from ciuic_integrations.lightning import CiuicStrategy, register_strategies

    _register_lazy()
    before = {k: dict(v) for k, v in StrategyRegistry.items()}
    register_strategies()
    register_strategies("lightning.pytorch")
    _register_lazy()
    assert {k: dict(v) for k, v in StrategyRegistry.items()} == before
    assert StrategyRegistry["ciuic"]["strategy"] is CiuicStrategy
    # A name someone else registered first is left alone.
    StrategyRegistry.remove("ciuic_2:1")
    StrategyRegistry.register("ciuic_2:1", SingleDeviceStrategy, description="user's own")
    try:
        register_strategies("lightning.pytorch")
        assert StrategyRegistry["ciuic_2:1"]["strategy"] is SingleDeviceStrategy
    finally:
        StrategyRegistry.remove("ciuic_2:1")
        register_strategies("lightning.pytorch")


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
def test_trainer_strategy_ciuic_compresses_training_steps_only(plain_run):
    module, stats = fit("ciuic")
    assert module.compressing == {"train": {True}, "val": {False}}
    assert not ciuic.is_enabled()  # nothing left active after fit
    assert stats.tensors_packed > 0
    # 4:1 is the default mode; the engine's own accounting (bytes autograd would keep / bytes kept).
    assert stats.ratio >= 3.5, stats.to_dict()
    assert stats.peak_live_after < stats.peak_live_before / 3
    plain_losses = plain_run[0].losses
    assert module.losses[0] == plain_losses[0]  # compression changes backward, not forward
    relative = [abs(a - b) / b for a, b in zip(module.losses, plain_losses)]
    assert max(relative) < 0.02, (module.losses, plain_losses)


def test_trainer_lossless_is_bit_identical_to_plain(plain_run):
    module, stats = fit("ciuic_lossless")
    assert stats.tensors_packed > 0
    assert module.losses == plain_run[0].losses


def test_strategy_instance_takes_compression_and_strategy_options():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from ciuic_integrations.lightning import CiuicDDPStrategy, CiuicStrategy

    strategy = CiuicStrategy(mode="8:1", group_size=128, device="cpu")
    assert isinstance(strategy, SingleDeviceStrategy)
    assert (strategy.ciuic_config.mode, strategy.ciuic_config.group_size) == ("8:1", 128)
    assert strategy.root_device == torch.device("cpu")
    ddp = CiuicDDPStrategy(mode={"mode": "auto", "budget": "1GB"}, find_unused_parameters=True)
    assert ddp.ciuic_config.budget == 10**9 and ddp._ddp_kwargs == {"find_unused_parameters": True}
    module, stats = fit(CiuicStrategy(mode="8:1"), steps=2)
    assert module.compressing["train"] == {True} and stats.ratio > 4


def test_strategies_pickle_for_spawn_launchers():
    import pickle

    from ciuic_integrations.lightning import CiuicDDPStrategy, CiuicFabricStrategy

    for strategy in (CiuicDDPStrategy(mode="8:1"), CiuicFabricStrategy(mode="2:1", rounding="stochastic")):
        copy = pickle.loads(pickle.dumps(strategy))
        assert type(copy) is type(strategy) and copy.ciuic_config == strategy.ciuic_config


@pytest.mark.parametrize("mode", ["9:1", "off"])
def test_bad_mode_names_the_valid_ones(mode):
    from ciuic_integrations.lightning import CiuicStrategy

    with pytest.raises(ValueError, match="4:1"):
        CiuicStrategy(mode=mode)


def test_single_device_strategy_with_two_devices_points_to_ddp():
    with pytest.raises(ValueError, match="ciuic_ddp"):
        L.Trainer(strategy="ciuic", accelerator="cpu", devices=2, logger=False)


# ------------------------------------------------------------------------------------------------
# Fabric
# ------------------------------------------------------------------------------------------------
def test_fabric_strategy_ciuic_compresses_forwards():
    from lightning.fabric.plugins import Precision

    fabric = L.Fabric(strategy="ciuic", accelerator="cpu", devices=1)
    assert isinstance(fabric.strategy.precision, Precision)  # still the plugin Fabric chose
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    seen = []
    model.module.blocks.register_forward_hook(lambda *_: seen.append(ciuic.is_enabled()))
    tokens, targets = text_dataset(4).tensors
    ciuic.reset_stats()
    for _ in range(2):
        with fabric.autocast():  # nested inside the forward context: must not re-enter
            loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        model(tokens)
    stats = ciuic.stats()
    assert seen == [True, True, False]  # a forward without grad saves nothing: not entered
    assert stats.tensors_packed > 0 and stats.ratio >= 3.5
    assert not ciuic.is_enabled()


def test_fabric_strategy_ddp_name_builds_the_ddp_class():
    from ciuic_integrations.lightning import CiuicFabricDDPStrategy

    fabric = L.Fabric(strategy="ciuic_ddp_2:1", accelerator="cpu", devices=2)
    assert isinstance(fabric.strategy, CiuicFabricDDPStrategy)
    assert fabric.strategy.ciuic_config.mode == "2:1" and fabric.strategy.num_processes == 2


# ------------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo)
# ------------------------------------------------------------------------------------------------
def test_ddp_two_processes_matches_plain_ddp(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["world_size"] == 2 and record["backend"] == "gloo"
        assert record["compressing"] == {"train": [True], "val": [False]}
        assert record["stats"]["tensors_packed"] > 0 and record["stats"]["ratio"] >= 3.5
        plain, compressed = record["plain_losses"], record["ciuic_losses"]
        assert compressed[0] == plain[0]
        assert max(abs(a - b) / b for a, b in zip(compressed, plain)) < 0.02, (plain, compressed)
    # Each rank trained on its own shard of the data.
    assert records[0]["plain_losses"][0] != records[1]["plain_losses"][0]


def _ddp_main(out_dir: str) -> None:
    options = dict(accelerator="cpu", devices=2, num_nodes=1)
    plain, _ = fit("ddp", steps=4, **options)
    compressed, stats = fit("ciuic_ddp", steps=4, **options)
    rank = torch.distributed.get_rank()
    record = {
        "world_size": torch.distributed.get_world_size(),
        "backend": torch.distributed.get_backend(),
        "plain_losses": plain.losses,
        "ciuic_losses": compressed.losses,
        "compressing": {k: sorted(v) for k, v in compressed.compressing.items()},
        "stats": stats.to_dict(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
