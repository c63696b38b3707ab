"""Hugging Face Trainer: `--ciuic 4:1` through HfArgumentParser, CiuicTrainer and CiuicCallback, with a
tiny LlamaForCausalLM built from a config, on CPU, for real."""

from __future__ import annotations

import os

import pytest
import torch

import ciuic

transformers = pytest.importorskip("transformers")

from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from ciuic_integrations.transformers import CiuicCallback, CiuicTrainer, CiuicTrainingArguments  # noqa: E402

SEQ = 64


class TextDataset(torch.utils.data.Dataset):
    """Byte-level causal language modelling on the source of Python's ``os`` module."""

    def __init__(self, sequences: int, offset: int = 0) -> None:
        path = os.__file__
        with open(path, "rb") as f:
            data = f.read()[offset : offset + sequences * SEQ]
        self.tokens = torch.tensor(list(data), dtype=torch.long).view(sequences, SEQ)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def parse(tmp_path, *extra: str, dataclass=CiuicTrainingArguments):
    argv = [
        "--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0",
        "--seed", "0", *extra,
    ]
    (args,) = HfArgumentParser(dataclass).parse_args_into_dataclasses(argv)
    return args


def watch(model) -> list:
    """(training, grad enabled, ciuic on) for every forward of the decoder."""
    seen = []
    model.model.register_forward_hook(
        lambda module, *_: seen.append((module.training, torch.is_grad_enabled(), ciuic.is_enabled()))
    )
    return seen


def run(trainer_class, args, **kwargs):
    model = tiny_llama()
    seen = watch(model)
    trainer = trainer_class(
        model=model, args=args, train_dataset=TextDataset(12), eval_dataset=TextDataset(2, offset=4096), **kwargs
    )
    ciuic.reset_stats()
    trainer.train()
    training_stats = ciuic.stats()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, model, seen, training_stats, losses


def untouched_after_training(trainer, model, seen) -> None:
    """Evaluation and generation after train(): no engine active, nothing packed, model unpatched."""
    assert not ciuic.is_enabled()
    assert "forward" not in model.__dict__  # ciuic's model preparation was undone
    before = ciuic.stats().tensors_packed
    seen.clear()
    trainer.evaluate()
    model.generate(torch.tensor([[1, 72, 101]]), max_new_tokens=3, do_sample=False)
    assert seen and all(on is False for _, _, on in seen)
    assert ciuic.stats().tensors_packed == before


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory):
    args = parse(tmp_path_factory.mktemp("plain"), dataclass=TrainingArguments)
    return run(Trainer, args)[4]


def test_ciuic_flag_parses_and_validates(tmp_path):
    args = parse(tmp_path, "--ciuic", "4:1", "--ciuic_config", '{"group_size": 128}')
    config = args.ciuic_compression_config
    assert (args.ciuic, config.mode, config.group_size) == ("4:1", "4:1", 128)
    assert parse(tmp_path).ciuic_compression_config is None
    assert parse(tmp_path, "--ciuic_config", '{"mode": "auto", "budget": "1GB"}').ciuic_compression_config.budget == 10**9
    with pytest.raises(ValueError, match="8:1"):
        parse(tmp_path, "--ciuic", "3:1")
    with pytest.raises(ValueError, match="group_size"):
        parse(tmp_path, "--ciuic", "4:1", "--ciuic_config", '{"group_size": 3}')


def test_ciuic_trainer_compresses_every_micro_batch_and_nothing_else(tmp_path, plain_losses):
    args = parse(tmp_path, "--ciuic", "4:1")
    trainer, model, seen, stats, losses = run(CiuicTrainer, args)
    training = [on for is_training, grad, on in seen if is_training and grad]
    assert training == [True] * 6  # 3 optimizer steps x 2 accumulated micro-batches
    assert all(on is False for is_training, grad, on in seen if not (is_training and grad))
    assert stats.tensors_packed > 0 and stats.ratio >= 3.5, stats.to_dict()
    assert losses[0] == pytest.approx(plain_losses[0], rel=1e-4)  # compression changes backward only
    assert losses == pytest.approx(plain_losses, rel=0.02)
    untouched_after_training(trainer, model, seen)


def test_without_the_flag_nothing_is_hooked(tmp_path, plain_losses):
    trainer, model, seen, stats, losses = run(CiuicTrainer, parse(tmp_path))
    assert trainer.ciuic_config is None
    assert seen and all(on is False for *_, on in seen)
    assert stats.tensors_packed == 0
    assert losses == plain_losses
    untouched_after_training(trainer, model, seen)


def test_callback_on_a_stock_trainer_follows_the_flag(tmp_path, plain_losses):
    args = parse(tmp_path, "--ciuic", "8:1")
    callback = CiuicCallback()
    trainer, model, seen, stats, losses = run(Trainer, args, callbacks=[callback])
    assert [on for is_training, grad, on in seen if is_training and grad] == [True] * 6
    assert stats.tensors_packed > 0 and stats.ratio >= 3.5
    assert losses == pytest.approx(plain_losses, rel=0.02)
    assert callback._session is None and not ciuic.is_enabled()
    untouched_after_training(trainer, model, seen)


def test_callback_with_its_own_mode_and_no_flag_on_the_arguments(tmp_path):
    args = parse(tmp_path, dataclass=TrainingArguments)
    _, _, seen, stats, _ = run(Trainer, args, callbacks=[CiuicCallback("2:1", group_size=32)])
    assert [on for is_training, grad, on in seen if is_training and grad] == [True] * 6
    assert stats.ratio >= 1.8
    with pytest.raises(ValueError, match="4:1"):
        CiuicCallback("5:1")
