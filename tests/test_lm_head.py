"""linear_cross_entropy and the lean LM head against plain PyTorch / transformers references."""

import contextlib
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from ciuic.lm_head import linear_cross_entropy
from ciuic_integrations.transformers import SUPPORTED_MODEL_TYPES, apply_lean_lm_head, remove_lean_lm_head

# mode -> (parameter dtype, autocast dtype or None, atol relative to the largest |value|, rtol)
MODES = {
    "fp32": (torch.float32, None, 1e-5, 1e-4),
    "bf16": (torch.bfloat16, None, 2e-2, 2e-2),
    "fp16": (torch.float16, None, 4e-3, 4e-3),
    "autocast_bf16": (torch.float32, torch.bfloat16, 2e-2, 2e-2),
}
SHAPES = [(1, 50, 32), (37, 1000, 48), (257, 50, 32), (257, 1000, 32)]  # (rows BT, vocab V, hidden H)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _inputs(rows, vocab, hidden_size, dtype, *, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = torch.nn.Parameter((torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(dtype))
    bias_ = torch.nn.Parameter(torch.randn(vocab, generator=generator).to(dtype)) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[1::4] = -100  # some ignored rows (none when rows == 1, so the mean stays finite)
    return hidden, weight, bias_, labels


def _assert_close(actual, expected, atol, rtol, name):
    scale = expected.detach().float().abs().max().clamp_min(1e-12)
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), atol=atol * scale.item(),
                               rtol=rtol, msg=lambda m: f"{name}: {m}")


def _loss_and_grads(fn, tensors):
    loss = fn()
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, wanted)
    return loss, grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "num_items"], ids=lambda r: f"reduction={r}")
@pytest.mark.parametrize("bias", [False, True], ids=lambda b: f"bias={b}")
@pytest.mark.parametrize("mode", list(MODES), ids=lambda m: f"dtype={m}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "BT={}-V={}-H={}".format(*s))
def test_loss_and_gradients_match_plain_head(shape, mode, bias, reduction):
    dtype, autocast_dtype, atol, rtol = MODES[mode]
    hidden, weight, bias_, labels = _inputs(*shape, dtype, bias=bias)
    num_items = 11 if reduction == "num_items" else None

    def plain():
        logits = F.linear(hidden, weight, bias_).float()
        if num_items is not None:
            return F.cross_entropy(logits, labels, reduction="sum") / num_items
        return F.cross_entropy(logits, labels, reduction=reduction)

    def lean():
        return linear_cross_entropy(hidden, weight, labels, bias_, num_items_in_batch=num_items,
                                    reduction="mean" if num_items else reduction)

    with _autocast(autocast_dtype):
        expected, expected_grads = _loss_and_grads(plain, (hidden, weight, bias_))
        actual, actual_grads = _loss_and_grads(lean, (hidden, weight, bias_))
    assert actual.dtype == torch.float32 and actual.shape == ()
    _assert_close(actual, expected, atol, rtol, "loss")
    for name, got, want in zip(("hidden", "weight", "bias"), actual_grads, expected_grads):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        _assert_close(got, want, atol, rtol, f"grad {name}")


def test_bf16_weight_gradient_accumulates_in_fp32():
    """Chunked fp32 accumulation must be no worse than autograd's bf16 gradient vs an fp64 oracle."""
    hidden, weight, _, labels = _inputs(257, 1000, 32, torch.bfloat16)
    oracle_weight = weight.detach().double().requires_grad_()
    oracle = F.cross_entropy(F.linear(hidden.detach().double(), oracle_weight), labels)
    (oracle_grad,) = torch.autograd.grad(oracle, oracle_weight)
    (plain_grad,) = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight).float(), labels), weight)
    (lean_grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, chunk_size=16), weight)
    plain_error = (plain_grad.double() - oracle_grad).norm() / oracle_grad.norm()
    lean_error = (lean_grad.double() - oracle_grad).norm() / oracle_grad.norm()
    assert lean_error <= 1.5 * plain_error, (lean_error.item(), plain_error.item())


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None, 10_000], ids=lambda c: f"chunk={c}")
def test_chunk_size_does_not_change_the_result(chunk_size):
    hidden, weight, bias, labels = _inputs(37, 300, 48, torch.float32)
    expected, expected_grads = _loss_and_grads(
        lambda: F.cross_entropy(F.linear(hidden, weight, bias), labels), (hidden, weight, bias))
    actual, actual_grads = _loss_and_grads(
        lambda: linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk_size), (hidden, weight, bias))
    _assert_close(actual, expected, 1e-5, 1e-5, "loss")
    for got, want in zip(actual_grads, expected_grads):
        _assert_close(got, want, 1e-5, 1e-4, "grad")


def test_non_contiguous_3d_inputs():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 32, 9, generator=generator).transpose(1, 2).requires_grad_()  # (B, T, H) view
    weight = (torch.randn(64, 64, generator=generator) / 6)[:, ::2].requires_grad_()  # (V, H), strided
    labels = torch.randint(0, 64, (9, 2), generator=generator).t()
    assert not (hidden.is_contiguous() or weight.is_contiguous() or labels.is_contiguous())
    expected, expected_grads = _loss_and_grads(
        lambda: F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), labels.flatten()), (hidden, weight))
    actual, actual_grads = _loss_and_grads(lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=4),
                                           (hidden, weight))
    _assert_close(actual, expected, 1e-5, 1e-5, "loss")
    for got, want in zip(actual_grads, expected_grads):
        assert got.shape == want.shape
        _assert_close(got, want, 1e-5, 1e-4, "grad")


def test_shift_matches_transformers_causal_lm_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    generator = torch.Generator().manual_seed(1)
    batch, time, hidden_size, vocab = 3, 11, 32, 97
    hidden = torch.randn(batch, time, hidden_size, generator=generator, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden_size, generator=generator) / 6)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    labels[0, :4] = -100
    for num_items in (None, torch.tensor(25)):
        expected, expected_grads = _loss_and_grads(lambda: loss_utils.ForCausalLMLoss(
            F.linear(hidden, weight), labels, vocab, num_items_in_batch=num_items), (hidden, weight))
        actual, actual_grads = _loss_and_grads(lambda: linear_cross_entropy(
            hidden, weight, labels, shift=True, num_items_in_batch=num_items), (hidden, weight))
        _assert_close(actual, expected, 1e-5, 1e-5, "loss")
        for got, want in zip(actual_grads, expected_grads):
            assert got.shape == want.shape
            _assert_close(got, want, 1e-5, 1e-4, "grad")


def test_logit_softcap_matches_tanh_capped_logits():
    hidden, weight, bias, labels = _inputs(37, 300, 32, torch.float32)
    weight.data *= 20  # large logits so the cap matters
    expected, expected_grads = _loss_and_grads(
        lambda: F.cross_entropy(30.0 * torch.tanh(F.linear(hidden, weight, bias) / 30.0), labels),
        (hidden, weight, bias))
    actual, actual_grads = _loss_and_grads(
        lambda: linear_cross_entropy(hidden, weight, labels, bias, logit_softcap=30.0), (hidden, weight, bias))
    _assert_close(actual, expected, 1e-5, 1e-5, "loss")
    for got, want in zip(actual_grads, expected_grads):
        _assert_close(got, want, 1e-5, 1e-4, "grad")


@pytest.mark.parametrize("trainable", ["hidden_only", "weight_only", "none"], ids=lambda t: f"grad={t}")
def test_frozen_inputs_get_no_gradient_and_save_nothing_for_them(trainable):
    hidden, weight, bias, labels = _inputs(37, 300, 32, torch.float32)
    hidden.requires_grad_(trainable == "hidden_only")
    weight.requires_grad_(trainable == "weight_only")
    bias.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, labels, bias)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), labels)
    _assert_close(loss, expected, 1e-5, 1e-5, "loss")
    if trainable == "none":
        assert not loss.requires_grad and not saved
        return
    trained = hidden if trainable == "hidden_only" else weight
    assert [tuple(t.shape) for t in saved] == [tuple(trained.shape)]
    (got,) = torch.autograd.grad(loss, trained)
    (want,) = torch.autograd.grad(expected, trained)
    _assert_close(got, want, 1e-5, 1e-4, "grad")


def test_upstream_gradient_scales_the_result_and_backward_can_repeat():
    hidden, weight, bias, labels = _inputs(37, 300, 32, torch.float32)
    expected = torch.autograd.grad(3.0 * F.cross_entropy(F.linear(hidden, weight, bias), labels), (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, bias)
    first = torch.autograd.grad(3.0 * loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, (hidden, weight))
    for got_first, got_second, want in zip(first, second, expected):
        _assert_close(got_first, want, 1e-5, 1e-4, "first backward")
        _assert_close(got_second, want, 1e-5, 1e-4, "second backward")


def test_grads_accumulate_into_parameters_over_two_steps():
    hidden, weight, bias, labels = _inputs(37, 300, 32, torch.float32)
    for _ in range(2):
        linear_cross_entropy(hidden, weight, labels, bias).backward()
    lean = weight.grad.clone()
    weight.grad = None
    for _ in range(2):
        F.cross_entropy(F.linear(hidden, weight, bias), labels).backward()
    _assert_close(lean, weight.grad, 1e-5, 1e-4, "accumulated grad")


@pytest.mark.parametrize("rows", [0, 5], ids=lambda r: f"rows={r}")
def test_no_valid_label_gives_torch_nan_and_zero_gradients(rows):
    hidden, weight, _, _ = _inputs(rows, 50, 32, torch.float32)
    labels = torch.full((rows,), -100)
    expected = F.cross_entropy(F.linear(hidden, weight), labels)
    loss = linear_cross_entropy(hidden, weight, labels)
    assert torch.isnan(loss) and torch.isnan(expected)
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
    assert linear_cross_entropy(hidden, weight, labels, reduction="sum").item() == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"reduction": "none"}, "reduction='none'"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"reduction": "sum", "num_items_in_batch": 4}, "num_items_in_batch"),
    ({"logit_softcap": -1.0}, "logit_softcap"),
], ids=["reduction", "chunk_size", "sum_with_num_items", "softcap"])
def test_bad_options_raise_clear_errors(kwargs, message):
    hidden, weight, _, labels = _inputs(5, 50, 32, torch.float32)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_labels_raise_clear_errors():
    hidden, weight, _, labels = _inputs(5, 50, 32, torch.float32)
    with pytest.raises(ValueError, match=r"label 50 is out of range \[0, 50\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 50, -100, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(hidden, weight[:, :16], labels)


def _saved_bytes(fn):
    """Bytes autograd keeps for backward, split into (activations, parameters), each storage once."""
    seen, totals = set(), {"activations": 0, "parameters": 0}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            is_parameter = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
            kind = "parameters" if is_parameter else "activations"  # a parameter (view) is alive anyway
            totals[kind] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return totals


def test_saved_bytes_are_far_below_the_plain_head():
    batch, time, hidden_size, vocab = 2, 256, 64, 8000
    hidden, weight, _, labels = _inputs(batch * time, vocab, hidden_size, torch.float32, bias=False)
    plain = _saved_bytes(lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels))
    lean = _saved_bytes(lambda: linear_cross_entropy(hidden, weight, labels))
    # Plain keeps hidden + the fp32 log-softmax (BT x V) (+ a view of the weight, not counted);
    # lean keeps grad_hidden + grad_weight.
    assert plain["activations"] >= batch * time * vocab * 4
    assert lean["parameters"] == 0
    assert lean["activations"] == (batch * time + vocab) * hidden_size * 4
    ratio = plain["activations"] / lean["activations"]
    print(f"saved for backward, BT={batch * time} V={vocab} H={hidden_size} fp32: plain "
          f"{plain['activations'] / 2**20:.2f} MiB (+{plain['parameters'] / 2**20:.2f} MiB weight) vs lean "
          f"{lean['activations'] / 2**20:.2f} MiB: {ratio:.1f}x less")
    assert ratio > 6


def test_engine_keeps_the_saved_gradients_exact():
    ciuic = pytest.importorskip("ciuic")
    hidden, weight, bias, labels = _inputs(256, 300, 32, torch.float32)  # above the engine's tiny size
    expected = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, bias), (hidden, weight, bias))
    ciuic.reset_stats()
    with ciuic.compression("8:1"):
        loss = linear_cross_entropy(hidden, weight, labels, bias)
    stats = ciuic.stats()
    actual = torch.autograd.grad(loss, (hidden, weight, bias))
    for got, want in zip(actual, expected):
        assert torch.equal(got, want)
    # Counted honestly: all three gradients are kept, at full size.
    assert stats.tensors_packed == 3
    assert stats.bytes_before == stats.bytes_after == sum(g.numel() * g.element_size() for g in expected)


# --- transformers models --------------------------------------------------------------------------

VOCAB = 300


def _tiny_model(model_type):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if model_type == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = transformers.AutoConfig.for_model(
            model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config).float().train()
    if model_type == "gemma2":
        config.final_logit_softcapping = 2.0  # small enough to matter at these logit scales
    return model


def _batch(batch=2, time=17):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (batch, time), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _loss_and_param_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    output = model(**kwargs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"], ids=lambda t: f"model={t}")
@pytest.mark.parametrize("num_items", [None, 23], ids=lambda n: f"num_items={n}")
def test_patched_model_gives_the_same_loss_and_gradients(model_type, num_items):
    plain = _tiny_model(model_type)
    lean = apply_lean_lm_head(copy.deepcopy(plain))
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected, expected_grads = _loss_and_param_grads(plain, **_batch(), **extra)
    actual, actual_grads = _loss_and_param_grads(lean, **_batch(), **extra)
    assert actual.logits is None and type(actual) is type(expected)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert actual_grads.keys() == expected_grads.keys()
    for name, want in expected_grads.items():
        assert _cosine(actual_grads[name], want) >= 0.9999, name
        _assert_close(actual_grads[name], want, 1e-4, 1e-3, name)


@pytest.mark.parametrize("model_type", sorted(set(SUPPORTED_MODEL_TYPES) - {"llama", "gpt2"}),
                         ids=lambda t: f"model={t}")
def test_every_supported_model_type_matches(model_type):
    plain = _tiny_model(model_type)
    lean = apply_lean_lm_head(copy.deepcopy(plain))
    expected, expected_grads = _loss_and_param_grads(plain, **_batch())
    actual, actual_grads = _loss_and_param_grads(lean, **_batch())
    assert actual.logits is None
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    for name, want in expected_grads.items():
        assert _cosine(actual_grads[name], want) >= 0.9999, name


def test_eval_no_labels_and_remove_leave_the_model_unchanged():
    plain = _tiny_model("llama")
    lean = apply_lean_lm_head(copy.deepcopy(plain))
    assert apply_lean_lm_head(lean) is lean  # idempotent
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(lean(**inputs).logits, plain(**inputs).logits)  # training, no labels
    plain.eval(), lean.eval()
    with torch.no_grad():
        expected, actual = plain(**batch), lean(**batch)  # eval with labels: logits and loss as before
    torch.testing.assert_close(actual.logits, expected.logits)
    torch.testing.assert_close(actual.loss, expected.loss)
    lean.train()
    as_tuple = lean(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], plain.train()(**batch).loss)
    # The HF Trainer reads forward's signature to drop dataset columns and pass num_items_in_batch.
    assert inspect.signature(lean.forward).parameters.keys() == inspect.signature(plain.forward).parameters.keys()
    clone = copy.deepcopy(lean)  # the patched forward must follow the copy, not the original
    assert clone.forward.__self__ is clone
    torch.testing.assert_close(clone(**batch).loss, as_tuple[0])
    assert remove_lean_lm_head(lean) is lean and "forward" not in vars(lean)
    assert lean(**batch).logits is not None


def test_unsupported_model_raises_naming_the_supported_ones():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "granite", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="model_type='granite'.*llama"):
        apply_lean_lm_head(model)
    with pytest.raises(ValueError, match="model_type=None"):
        apply_lean_lm_head(torch.nn.Linear(4, 4))


def test_hf_trainer_with_gradient_accumulation_logs_the_same_losses(tmp_path):
    transformers = pytest.importorskip("transformers")
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, VOCAB, (16,), generator=generator).tolist() for _ in range(16)]
    # "source" is a column the forward does not take: the Trainer drops it by reading forward's signature.
    dataset = [{"input_ids": ids, "labels": ids, "source": 1} for ids in rows]
    losses = {}
    for name in ("plain", "lean"):
        model = _tiny_model("llama")
        if name == "lean":
            apply_lean_lm_head(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=3, logging_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["lean"]) == 3
    assert losses["lean"] == pytest.approx(losses["plain"], rel=1e-5)
