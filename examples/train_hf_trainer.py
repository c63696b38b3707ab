"""Hugging Face Trainer: a small LlamaForCausalLM (built from a config, no download) trained on
Python's own sources, bytes as tokens. The one ciuic line is the import below; the flag does the rest:

    python examples/train_hf_trainer.py --ciuic 4:1
    python examples/train_hf_trainer.py --ciuic 8:1 --gradient_accumulation_steps 2
    python examples/train_hf_trainer.py                  # plain Trainer behaviour, nothing hooked

Any TrainingArguments flag works (--max_steps, --per_device_train_batch_size, ...).
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

import ciuic
from ciuic_integrations.transformers import CiuicTrainer as Trainer, CiuicTrainingArguments as TrainingArguments
from common import ByteDataset, memory_saved

SEQ_LEN = 128
DEFAULTS = [
    "--output_dir", tempfile.mkdtemp(prefix="ciuic-hf-"), "--max_steps", "40", "--per_device_train_batch_size", "8",
    "--learning_rate", "3e-3", "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none",
    "--use_cpu", "--disable_tqdm", "true",
]


class CausalLMDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = ByteDataset(SEQ_LEN)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        tokens = self.data.inputs[index]
        return {"input_ids": tokens, "labels": tokens}  # the model shifts the labels itself


def main() -> None:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(DEFAULTS + sys.argv[1:])
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=CausalLMDataset())
    ciuic.reset_stats()
    result = trainer.train()
    print(f"final training loss {result.training_loss:.3f}")
    print(memory_saved())


if __name__ == "__main__":
    main()
