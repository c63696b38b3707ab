"""The frameworks' compile paths with ciuic on, for real, on CPU: a Lightning module whose model is
``torch.compile``d under ``Trainer(strategy="ciuic")``, the Hugging Face Trainer with
``torch_compile=True`` and ``--ciuic 4:1``, and accelerate with ``dynamo_backend="inductor"`` and
``CiuicPlugin``. Each trains a few steps with the compiled region's saved tensors quantized inside
its graph (the engine enters ``ciuic.compiled.inline``), against the same framework compiled and
uncompressed.

Oracles: the uncompressed compiled run of the same framework (losses, first-step loss identical:
the forward is untouched) and the bytes autograd holds for backward, read from the autograd graph
(the tensors each compiled region saved, parameters excluded), not from ciuic's plan or stats.
Inductor only where a framework is asked for it by name (accelerate); the others compile with
``aot_eager``, which inlines ciuic's hooks the same way (the inlining is AOTAutograd's) without
generating C++.
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ciuic

VOCAB, HIDDEN, SEQ, STEPS = 128, 64, 64, 3


def _reset_dynamo() -> None:
    torch._dynamo.reset()


def saved_bytes(loss: torch.Tensor, params: list) -> int:
    """Bytes of the distinct storages that compiled regions hold for backward (their autograd
    nodes' saved tensors), parameters excluded (alive anyway)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen_nodes, storages, stack = set(), {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        if type(node).__name__ == "CompiledFunctionBackward":
            for t in node.saved_tensors:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in skip:
                    storages[ptr] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(),
                         nn.Linear(4 * HIDDEN, HIDDEN), nn.Linear(HIDDEN, VOCAB))


def token_batches(count: int = STEPS, batch: int = 4) -> list:
    raw = torch.tensor(list(inspect.getsource(os).encode()[: count * batch * (SEQ + 1)]), dtype=torch.long)
    raw = (raw % VOCAB).view(count, batch, SEQ + 1)
    return [(b[:, :-1], b[:, 1:]) for b in raw]


def check_against_baseline(name: str, base: dict, ours: dict, min_ratio: float) -> None:
    assert len(ours["losses"]) == len(base["losses"]) >= 2, (base, ours)
    assert all(math.isfinite(v) for v in ours["losses"]), ours["losses"]
    assert ours["losses"][0] == pytest.approx(base["losses"][0], rel=1e-5), "the forward changed"
    for a, b in zip(ours["losses"], base["losses"]):
        assert abs(a / b - 1) < 0.02, (name, ours["losses"], base["losses"])
    ratio = base["saved"][0] / ours["saved"][0]
    assert ratio >= min_ratio, (
        f"{name}: compiled regions hold {ours['saved'][0]} B for backward with ciuic vs "
        f"{base['saved'][0]} B without: ratio {ratio:.2f} < {min_ratio}")
    print(f"{name}: saved bytes {base['saved'][0]} -> {ours['saved'][0]} ({ratio:.2f}x); "
          f"losses {base['losses']} vs {ours['losses']}")


# ------------------------------------------------------------------------------------------------
# Lightning: Trainer(strategy="ciuic") with a compiled model inside the LightningModule
# ------------------------------------------------------------------------------------------------
def _lightning_fit(strategy: str) -> dict:
    L = pytest.importorskip("lightning")

    class LitCompiled(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.compile(tiny_model(), backend="aot_eager")
            self.record: dict = {"losses": [], "saved": [], "compressing": []}

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            tokens, targets = batch
            loss = F.cross_entropy(self.net(tokens).flatten(0, 1), targets.flatten())
            self.record["losses"].append(loss.item())
            self.record["saved"].append(saved_bytes(loss, list(self.parameters())))
            self.record["compressing"].append(ciuic.is_enabled())
            return loss

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.5)

    _reset_dynamo()
    module = LitCompiled()
    batches = token_batches()
    loader = torch.utils.data.DataLoader([(t[i], y[i]) for t, y in batches for i in range(len(t))], batch_size=4)
    L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(module, loader)
    return module.record


@pytest.fixture(autouse=True)
def _restore_environ():
    """HF ``TrainingArguments(torch_compile=True)`` and accelerate's dynamo plugin export
    ``ACCELERATE_DYNAMO_*`` and leave a process-wide ``AcceleratorState`` holding the dynamo
    plugin: every later ``Accelerator`` in the process would compile its model."""
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)


def test_lightning_compiled_module_under_ciuic_strategy() -> None:
    base = _lightning_fit("auto")
    ours = _lightning_fit("ciuic")  # the default mode, 4:1
    assert ours["compressing"] == [True] * STEPS and base["compressing"] == [False] * STEPS
    check_against_baseline("lightning", base, ours, min_ratio=3.0)
    assert not ciuic.is_enabled()


# ------------------------------------------------------------------------------------------------
# Hugging Face Trainer: torch_compile=True plus --ciuic 4:1
# ------------------------------------------------------------------------------------------------
def _hf_train(tmp_path, ciuic_mode: str | None) -> dict:
    transformers = pytest.importorskip("transformers")
    from ciuic_integrations.transformers import CiuicTrainer, CiuicTrainingArguments

    class RecordingTrainer(CiuicTrainer):
        record: dict = {}

        def compute_loss(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN201
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.record["losses"].append(float(loss.detach()))
            self.record["saved"].append(saved_bytes(loss, list(model.parameters())))
            self.record["compressing"].append(ciuic.is_enabled())
            return loss

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=SEQ, use_cache=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    data = [{"input_ids": t[i], "labels": t[i]} for t, _ in token_batches() for i in range(len(t))]
    args = CiuicTrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
        seed=0, torch_compile=True, torch_compile_backend="aot_eager", ciuic=ciuic_mode)
    _reset_dynamo()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data)
    trainer.record = {"losses": [], "saved": [], "compressing": []}
    trainer.train()
    return trainer.record


def test_hf_trainer_torch_compile_with_ciuic(tmp_path) -> None:
    base = _hf_train(tmp_path / "base", None)
    ours = _hf_train(tmp_path / "ciuic", "4:1")
    assert ours["compressing"] == [True] * STEPS and base["compressing"] == [False] * STEPS
    check_against_baseline("hf-trainer", base, ours, min_ratio=2.5)
    assert not ciuic.is_enabled()


# ------------------------------------------------------------------------------------------------
# accelerate: Accelerator(dynamo_backend="inductor") with CiuicPlugin
# ------------------------------------------------------------------------------------------------
def _accelerate_train(plugin_mode: str | None) -> dict:
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    from ciuic_integrations.accelerate import CiuicAccelerator, CiuicPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    _reset_dynamo()
    plugin = CiuicPlugin(mode=plugin_mode) if plugin_mode else None
    accelerator = CiuicAccelerator(cpu=True, dynamo_backend="inductor", ciuic_plugin=plugin)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    record: dict = {"losses": [], "saved": [], "compiled": type(model).__name__}
    try:
        for tokens, targets in token_batches():
            loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
            record["losses"].append(float(loss.detach()))
            record["saved"].append(saved_bytes(loss, list(model.parameters())))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    finally:
        accelerator.free_memory()
        AcceleratorState._reset_state(reset_partial_state=True)
    return record


def test_accelerate_dynamo_inductor_with_ciuic_plugin() -> None:
    base = _accelerate_train(None)
    ours = _accelerate_train("4:1")
    assert base["compiled"] == ours["compiled"] == "OptimizedModule"
    check_against_baseline("accelerate-inductor", base, ours, min_ratio=3.0)
    assert not ciuic.is_enabled()
