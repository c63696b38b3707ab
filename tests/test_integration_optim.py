"""The optimizer setting from each framework's own config: Lightning ``CiuicStrategy(optimizer=...,
fuse_update=...)``, HF ``--ciuic_optim`` / ``--ciuic_fuse_update``, Accelerate ``CiuicPlugin`` and
``ciuic-accelerate launch --ciuic_optim``. Each framework's real trainer runs a few CPU steps.

References are independent of the wiring: the same run with the framework's own
``torch.optim.AdamW`` (losses close), torch's own LR schedulers (the learning rate our optimizer
ends with), and the bytes a ``torch.optim.AdamW`` state would hold (8 per parameter element).
"""

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
from ciuic.optim import AdamW, state_nbytes

SEQ = 64
LR, BETAS, EPS, WD = 3e-3, (0.85, 0.99), 1e-7, 0.05


def text_tokens(sequences: int = 24) -> torch.Tensor:
    raw = list(inspect.getsource(os).encode()[: sequences * (SEQ + 1)])
    return torch.tensor(raw, dtype=torch.long).view(sequences, SEQ + 1)


class ByteLM(nn.Module):
    """Embedding + MLP next-byte model: three tensors >= 4096 elements (quantized state), two biases."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(256, 64)
        self.hidden = nn.Linear(64, 128)
        self.out = nn.Linear(128, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(self.embed(tokens))))


def torch_state_bytes(optimizer) -> int:
    """What torch.optim.AdamW keeps for the same parameters: two fp32 moments + a step per tensor."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return sum(8 * p.numel() + 4 for p in params)


def assert_quantized(optimizer, bits: int) -> None:
    assert type(optimizer) is AdamW
    assert {g["state_bits"] for g in optimizer.param_groups} == {bits}
    codes = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dtype == torch.uint8]
    assert codes, "no quantized moments in the state"
    ratio = state_nbytes(optimizer) / torch_state_bytes(optimizer)
    assert ratio < (0.3 if bits == 8 else 0.17), ratio


def decreased(losses: list, by: float = 0.3) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - by


# ------------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------------
L = pytest.importorskip("lightning")


class LitByteLM(L.LightningModule):
    def __init__(self, optimizer: str = "adamw", scheduler: bool = True) -> None:
        super().__init__()
        self.model = ByteLM()
        self.losses: list[float] = []
        self._optimizer, self._scheduler = optimizer, scheduler

    def training_step(self, batch, batch_idx):
        (window,) = batch
        logits = self.model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self._optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        if not self._scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lightning_fit(strategy, steps: int = 12, module=None, **options):
    module = module or LitByteLM()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(text_tokens()), batch_size=4)
    settings = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    settings.update(options)
    trainer = L.Trainer(strategy=strategy, **settings)
    trainer.fit(module, loader)
    return trainer, module


@pytest.fixture(scope="module")
def lightning_plain():
    return lightning_fit("auto")


class LitCausalLM(L.LightningModule):
    """A LightningModule around a transformers causal LM (the loss from labels, logits recorded)."""

    def __init__(self) -> None:
        super().__init__()
        from ciuic._workloads import tiny_llama

        self.model = tiny_llama(hidden=64, intermediate=128, layers=1, heads=2, max_positions=128, seed=0)
        self.losses: list[float] = []
        self.saw_logits: list[bool] = []

    def training_step(self, batch, batch_idx):
        (window,) = batch
        out = self.model(input_ids=window, labels=window)
        self.losses.append(out.loss.item())
        self.saw_logits.append(out.logits is not None)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.xdist_group("optim_lightning")
def test_lightning_lean_lm_head_only_when_asked():
    from ciuic_integrations.lightning import CiuicStrategy

    torch.manual_seed(0)
    _, plain = lightning_fit("auto", steps=4, module=LitCausalLM())
    _, default = lightning_fit(CiuicStrategy(mode="4:1"), steps=4, module=LitCausalLM())
    lean_module = LitCausalLM()
    _, lean = lightning_fit(CiuicStrategy(mode="4:1", lean_lm_head=True), steps=4, module=lean_module)
    assert all(plain.saw_logits) and all(default.saw_logits)  # never patched unless asked
    assert not any(lean.saw_logits)  # the full logits were never built
    assert "forward" not in lean_module.model.__dict__  # teardown undid the patch
    for a, b in zip(lean.losses, default.losses):  # the same training up to the codecs' error
        assert abs(a - b) / b < 0.02, (lean.losses, default.losses)


# 8 bits here; the 4-bit setting runs in the fused tests (bf16 weights)
@pytest.mark.xdist_group("optim_lightning")
def test_lightning_strategy_turns_adamw_into_ciuic(lightning_plain):
    from ciuic_integrations.lightning import CiuicStrategy

    bits = 8
    trainer, module = lightning_fit(CiuicStrategy(mode="4:1", optimizer="adamw8bit"))
    optimizer = trainer.optimizers[0]
    assert_quantized(optimizer, bits)
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == (BETAS, EPS, WD)
    # torch's StepLR, built on the torch optimizer in configure_optimizers, drives ours
    assert group["lr"] == pytest.approx(LR * 0.9**12)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert decreased(module.losses)
    plain = lightning_plain[1].losses
    assert abs(module.losses[-1] - plain[-1]) / plain[-1] < 0.05, (module.losses, plain)


@pytest.mark.xdist_group("optim_lightning")
def test_lightning_fused_update_with_bf16_weights():
    from ciuic_integrations.lightning import CiuicStrategy

    strategy = CiuicStrategy(optimizer="adamw4bit", fuse_update=True)
    module = LitByteLM(scheduler=False)
    updates = []
    module.on_train_batch_end = lambda *a: updates.append(strategy._ciuic_fused[0].updates)
    trainer, module = lightning_fit(strategy, module=module, precision="bf16-true")
    optimizer = trainer.optimizers[0]
    assert_quantized(optimizer, 4)
    assert all(g["bf16_stochastic_round"] for g in optimizer.param_groups)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    # every parameter tensor was updated inside each backward
    tensors = len(list(module.parameters()))
    assert updates == [tensors * (i + 1) for i in range(12)]
    assert decreased(module.losses)
    assert "step" not in optimizer.__dict__  # the fused step was removed at teardown


@pytest.mark.xdist_group("optim_lightning")
@pytest.mark.parametrize("options, error, message", [
    ({"accumulate_grad_batches": 2}, ValueError, "accumulate gradients over 2"),
    ({"gradient_clip_val": 1.0}, ValueError, "cannot clip gradients"),
])
def test_lightning_fused_update_refuses_what_needs_all_gradients(options, error, message):
    from ciuic_integrations.lightning import CiuicStrategy

    with pytest.raises(error, match=message):
        lightning_fit(CiuicStrategy(optimizer="adamw8bit", fuse_update=True), steps=2, **options)


@pytest.mark.xdist_group("optim_lightning")
def test_lightning_other_optimizer_is_refused():
    from ciuic_integrations.lightning import CiuicStrategy

    with pytest.raises(TypeError, match="replaces a torch.optim.AdamW.*torch.optim.sgd.SGD"):
        lightning_fit(CiuicStrategy(optimizer="adamw8bit"), steps=2, module=LitByteLM(optimizer="sgd"))


def test_lightning_bad_values():
    from ciuic_integrations.lightning import CiuicDDPStrategy, CiuicStrategy

    with pytest.raises(ValueError, match="optimizer='adam8' is not valid; allowed: 'adamw8bit', 'adamw4bit'"):
        CiuicStrategy(optimizer="adam8")
    with pytest.raises(ValueError, match="fuse_update='x' is not valid"):
        CiuicStrategy(fuse_update="x")
    with pytest.raises(ValueError, match="fuse_update=True cannot be used with DDP"):
        CiuicDDPStrategy(fuse_update=True)
    with pytest.raises(ValueError, match="bits=3 is not valid; allowed: 8, 4"):
        CiuicDDPStrategy(gradient_bits=3)
    with pytest.raises(ValueError, match="ddp_comm_hook"):
        CiuicDDPStrategy(ddp_comm_hook=lambda state, bucket: None)
    assert CiuicDDPStrategy().ciuic_gradient_bits == 8
    assert CiuicDDPStrategy(gradient_bits=None).ciuic_gradient_bits is None


# ------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


class HFTextDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.tokens = text_tokens()[:, :SEQ]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def hf_model():
    from ciuic._workloads import tiny_llama

    return tiny_llama(hidden=64, intermediate=128, layers=1, heads=2, max_positions=128)


def hf_args(tmp_path, *extra: str):
    from transformers import HfArgumentParser

    from ciuic_integrations.transformers import CiuicTrainingArguments

    argv = ["--output_dir", str(tmp_path), "--max_steps", "12", "--per_device_train_batch_size", "4",
            "--learning_rate", str(LR), "--adam_beta1", str(BETAS[0]), "--adam_beta2", str(BETAS[1]),
            "--adam_epsilon", str(EPS), "--weight_decay", str(WD), "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--seed", "0", *extra]
    (args,) = HfArgumentParser(CiuicTrainingArguments).parse_args_into_dataclasses(argv)
    return args


def hf_train(args, model=None):
    from ciuic_integrations.transformers import CiuicTrainer

    trainer = CiuicTrainer(model=model or hf_model(), args=args, train_dataset=HFTextDataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


@pytest.fixture(scope="module")
def hf_plain(tmp_path_factory):
    return hf_train(hf_args(tmp_path_factory.mktemp("plain")))


@pytest.mark.xdist_group("optim_hf")
def test_hf_flag_builds_ciuic_adamw_with_the_arguments(tmp_path, hf_plain):
    bits = 8
    trainer, losses = hf_train(hf_args(tmp_path, "--ciuic_optim", "adamw8bit", "--ciuic", "4:1"))
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper
    assert_quantized(optimizer, bits)
    plain_optimizer = hf_plain[0].optimizer.optimizer
    assert type(plain_optimizer) is not AdamW
    # the Trainer's own groups (decay / no decay) and hyperparameters, and its LR schedule
    for ours, theirs in zip(optimizer.param_groups, plain_optimizer.param_groups):
        assert [p.shape for p in ours["params"]] == [p.shape for p in theirs["params"]]
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert ours[key] == pytest.approx(theirs[key]), key
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, WD]
    assert decreased(losses)
    assert abs(losses[-1] - hf_plain[1][-1]) / hf_plain[1][-1] < 0.05, (losses, hf_plain[1])


@pytest.mark.xdist_group("optim_hf")
def test_hf_fused_update_with_bf16_weights(tmp_path):
    model = hf_model().to(torch.bfloat16)
    args = hf_args(tmp_path, "--ciuic_optim", "adamw4bit", "--ciuic_fuse_update", "--max_grad_norm", "0")
    counts = []
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        def on_step_end(self, *a, **k):
            counts.append(trainer._ciuic_fused.updates)

    from ciuic_integrations.transformers import CiuicTrainer

    trainer = CiuicTrainer(model=model, args=args, train_dataset=HFTextDataset(), callbacks=[Count()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    optimizer = trainer.optimizer.optimizer
    assert_quantized(optimizer, 4)
    assert all(g["bf16_stochastic_round"] for g in optimizer.param_groups)
    tensors = len([p for p in model.parameters() if p.requires_grad])
    assert counts == [tensors * (i + 1) for i in range(12)]
    assert decreased(losses)
    # the logged grad_norm is the fused gradients' norm (the Trainer alone would find none: 0)
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == 12 and all(0 < n < float("inf") for n in norms), norms
    assert "step" not in optimizer.__dict__ and not hasattr(trainer, "_ciuic_fused")


def test_hf_bad_values(tmp_path):
    with pytest.raises(ValueError, match="--ciuic_optim='adamw16bit' is not valid; allowed: 'adamw8bit', 'adamw4bit'"):
        hf_args(tmp_path, "--ciuic_optim", "adamw16bit")
    with pytest.raises(ValueError, match="cannot clip gradients.*--max_grad_norm 0"):
        hf_args(tmp_path, "--ciuic_fuse_update")
    with pytest.raises(ValueError, match="accumulate gradients over 2"):
        hf_args(tmp_path, "--ciuic_fuse_update", "--max_grad_norm", "0", "--gradient_accumulation_steps", "2")


@pytest.mark.xdist_group("optim_hf")
def test_hf_other_optim_is_refused(tmp_path):
    args = hf_args(tmp_path, "--ciuic_optim", "adamw8bit", "--optim", "sgd", "--max_steps", "1")
    with pytest.raises(TypeError, match="replaces a torch.optim.AdamW.*SGD"):
        hf_train(args)


# ------------------------------------------------------------------------------------------------
# Accelerate
# ------------------------------------------------------------------------------------------------
pytest.importorskip("accelerate")


def accelerate_steps(accelerator, steps: int = 12, clip: bool = False):
    model = ByteLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    tokens = text_tokens()[:4]
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        accelerator.backward(loss)
        if clip:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return optimizer, losses


@pytest.mark.xdist_group("optim_accelerate")
@pytest.mark.parametrize("fuse_update", [False, True], ids=["step", "fused"])
def test_ciuic_plugin_optimizer(fuse_update):
    from ciuic_integrations.accelerate import CiuicAccelerator, CiuicPlugin

    plain_optimizer, plain = accelerate_steps(CiuicAccelerator(cpu=True))
    accelerator = CiuicAccelerator(cpu=True, ciuic_plugin=CiuicPlugin(mode="4:1", optimizer="adamw8bit",
                                                                       fuse_update=fuse_update))
    optimizer, losses = accelerate_steps(accelerator)
    assert type(plain_optimizer.optimizer) is torch.optim.AdamW
    assert_quantized(optimizer.optimizer, 8)
    # the scheduler given to prepare() sets our learning rate
    assert optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.9**12)
    assert decreased(losses)
    assert abs(losses[-1] - plain[-1]) / plain[-1] < 0.05, (losses, plain)
    if fuse_update:
        assert accelerator._ciuic_fused[0].updates == 12 * len(list(ByteLM().parameters()))
        with pytest.raises(ValueError, match="cannot clip gradients"):
            accelerate_steps(CiuicAccelerator(cpu=True, ciuic_plugin=CiuicPlugin(optimizer="adamw4bit",
                                                                                  fuse_update=True)), 1, clip=True)
    accelerator.free_memory()


def test_ciuic_plugin_bad_values():
    from ciuic_integrations.accelerate import CiuicPlugin

    with pytest.raises(ValueError, match="optimizer='lion' is not valid; allowed: 'adamw8bit', 'adamw4bit'"):
        CiuicPlugin(optimizer="lion")


LAUNCHED_SCRIPT = textwrap.dedent(
    """
    import inspect, json, os, sys
    import torch, torch.nn as nn, torch.nn.functional as F
    from accelerate import Accelerator

    accelerator = Accelerator()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(256, 64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    raw = torch.tensor(list(inspect.getsource(os).encode()[: 4 * 65]), dtype=torch.long).view(4, 65)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(raw[:, :-1]).flatten(0, 1), raw[:, 1:].flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    inner = optimizer.optimizer
    record = {"type": type(inner).__module__ + "." + type(inner).__name__, "losses": losses,
              "bits": sorted({g.get("state_bits") for g in inner.param_groups}),
              "compressing": __import__("ciuic").is_enabled(),
              "fused": getattr(inner, "_ciuic_fused_handle", None) is not None}
    json.dump(record, open(sys.argv[1], "w"))
    """
)


def test_launch_flag_converts_the_optimizer_of_an_unmodified_script(tmp_path):
    # both variables travel (CIUIC_OPTIM, CIUIC_FUSE_UPDATE); the 4-bit setting is covered in-process
    flags, bits, fused = ["--ciuic_optim", "adamw8bit", "--ciuic_fuse_update"], 8, True
    (tmp_path / "train.py").write_text(LAUNCHED_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CIUIC_MODE", None)
    command = [sys.executable, "-m", "ciuic_integrations.accelerate", "launch", *flags, "--cpu", "--num_processes",
               "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "out.json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["type"] == "ciuic.optim.adamw.AdamW" and record["bits"] == [bits]
    assert record["fused"] is fused and record["compressing"] is False  # no --ciuic: compression stays off
    assert decreased(record["losses"], by=0.2)


def test_launch_bad_optimizer_fails_before_starting(monkeypatch):
    from ciuic_integrations.accelerate import main

    with pytest.raises(SystemExit, match="--ciuic_optim='adamw2bit' is not valid; allowed: 'adamw8bit', 'adamw4bit'"):
        main(["launch", "--ciuic_optim", "adamw2bit", "--cpu", "train.py"])
