"""ciuic.optim.AdamW against torch.optim.AdamW: exact math without quantization, state bytes,
validation, state_dict (weights_only, bf16, resume), conversions, bf16 stochastic rounding,
GradScaler skip-steps, LR schedulers, and a short char-LM convergence run."""

import io

import pytest
import torch

from ciuic.optim import AdamW, state_nbytes


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 96), torch.nn.GELU(),
                                torch.nn.Linear(96, 8))
    return model.to(dtype)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 48, generator=g), torch.randint(0, 8, (16,), generator=g)) for _ in range(n)]


def _train(model, opt, batches, dtype=torch.float32, scheduler=None):
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("how", ["state_bits=32", "small tensors"])
def test_unquantized_update_equals_torch_adamw(how):
    """With fp32 moments our kernel computes torch's AdamW: equal within fp32 rounding, per step."""
    ref_model, our_model = _mlp(), _mlp()
    groups = lambda m: [{"params": list(m[0].parameters()), "lr": 3e-3},  # noqa: E731
                        {"params": list(m[2].parameters()) + list(m[4].parameters()), "weight_decay": 0.3}]
    ref = torch.optim.AdamW(groups(ref_model), lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
                            foreach=False)
    kwargs = {"state_bits": 32} if how == "state_bits=32" else {"state_bits": 4, "min_quantized_numel": 10**6}
    ours = AdamW(groups(our_model), lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, **kwargs)
    for x, y in _batches(15):
        for model, opt in ((ref_model, ref), (our_model, ours)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for a, b in zip(our_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
    for p, q in zip(our_model.parameters(), ref_model.parameters()):
        st, rt = ours.state[p], ref.state[q]
        assert st["state_bits"] == 32 and int(st["step"]) == int(rt["step"]) == 15
        torch.testing.assert_close(st["exp_avg"], rt["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(st["exp_avg_sq"], rt["exp_avg_sq"], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("bits,bound", [(8, 0.27), (4, 0.15)])
def test_state_bytes_vs_torch_adamw(bits, bound):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 128), torch.nn.Linear(128, 384), torch.nn.Linear(384, 128),
                                torch.nn.LayerNorm(128), torch.nn.Linear(128, 256))
    ref, ours = torch.optim.AdamW(model.parameters()), AdamW(model.parameters(), state_bits=bits)
    out = model[1:](model[0](torch.randint(0, 256, (4, 8))))
    out.float().pow(2).mean().backward()
    ref.step()
    ours.step()
    ratio = state_nbytes(ours) / state_nbytes(ref)
    assert state_nbytes(ref) == sum(2 * p.numel() * 4 + 4 for p in model.parameters())  # independent count
    assert ratio <= bound, f"{bits}-bit state is {ratio:.3f}x of torch's (bound {bound})"
    small = [p for p in model.parameters() if p.numel() < 4096]
    assert small and all(ours.state[p]["exp_avg"].dtype == torch.float32 for p in small)
    big = [p for p in model.parameters() if p.numel() >= 4096]
    assert all(ours.state[p]["exp_avg_codes"].dtype == torch.uint8 for p in big)


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1.0}, r"lr=-1.0 .*allowed"),
    ({"betas": (1.0, 0.9)}, r"betas=\(1.0, 0.9\) .*allowed"),
    ({"eps": float("nan")}, r"eps=nan .*allowed"),
    ({"weight_decay": -0.1}, r"weight_decay=-0.1 .*allowed"),
    ({"state_bits": 2}, r"state_bits=2 .*allowed: 8, 4, or 32"),
    ({"block_size": 100}, r"block_size=100 .*allowed: None .*64, 128, 256, 512"),
    ({"min_quantized_numel": -5}, r"min_quantized_numel=-5 .*allowed"),
    ({"bf16_stochastic_round": "yes"}, r"bf16_stochastic_round='yes' .*allowed: True, False"),
], ids=lambda v: str(v)[:24])
def test_bad_hyperparameters_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_group_and_parameter_errors():
    opt = AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=r"state_bits=3"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "state_bits": 3})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"dtype torch.int64 .*allowed: floating point"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.long)]})
    opt.param_groups[0]["state_bits"] = 5  # changed after construction: caught at step()
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"state_bits=5"):
        opt.step()


def test_add_param_group_and_lr_scheduler():
    model = _mlp()
    opt = AdamW(list(model[0].parameters()), lr=1e-2, state_bits=8, min_quantized_numel=0)
    opt.add_param_group({"params": list(model[2].parameters()) + list(model[4].parameters()), "state_bits": 4})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 3 else 0.0)
    _train(model, opt, _batches(3), scheduler=sched)
    assert opt.state[model[0].weight]["state_bits"] == 8 and opt.state[model[2].weight]["state_bits"] == 4
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, _batches(2, seed=5))  # lr 0: AdamW leaves the weights exactly unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("bits,dtype,sr", [(8, torch.float32, False), (4, torch.bfloat16, True)],
                         ids=["8bit-fp32", "4bit-bf16-sr"])
def test_resume_from_weights_only_checkpoint_gives_the_same_losses(bits, dtype, sr):
    batches = _batches(12)
    make = lambda m: AdamW(m.parameters(), lr=3e-3, state_bits=bits, bf16_stochastic_round=sr,  # noqa: E731
                           min_quantized_numel=1024, block_size=64)
    straight_model = _mlp(dtype=dtype)
    straight = _train(straight_model, make(straight_model), batches, dtype)

    model = _mlp(dtype=dtype)
    opt = make(model)
    first = _train(model, opt, batches[:6], dtype)
    checkpoint = _roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    for st in checkpoint["optim"]["state"].values():  # plain tensors and numbers only
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in st.values())
    model2 = _mlp(seed=7, dtype=dtype)
    model2.load_state_dict(checkpoint["model"])
    opt2 = make(model2)
    opt2.load_state_dict(checkpoint["optim"])
    for p in model2.parameters():  # torch's load_state_dict would cast these to bf16
        st = opt2.state[p]
        if st["state_bits"] == 32:
            assert st["exp_avg"].dtype == torch.float32
        else:
            assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_scale"].dtype == torch.float32
            assert torch.equal(st["exp_avg_scale"], opt.state[dict(zip(model2.parameters(), model.parameters()))[p]]
                               ["exp_avg_scale"])
    second = _train(model2, opt2, batches[6:], dtype)
    assert first + second == straight


def test_from_torch_and_to_torch_round_trip_within_quantization_error():
    model = _mlp()
    ref = torch.optim.AdamW([{"params": list(model[0].parameters()), "lr": 2e-3},
                             {"params": list(model[2].parameters()) + list(model[4].parameters())}],
                            lr=1e-3, betas=(0.85, 0.995), weight_decay=0.02)
    _train(model, ref, _batches(5))
    ours = AdamW.from_torch(ref, state_bits=8, min_quantized_numel=1000)
    assert [g["lr"] for g in ours.param_groups] == [2e-3, 1e-3]
    assert ours.param_groups[1]["betas"] == (0.85, 0.995) and ours.param_groups[1]["weight_decay"] == 0.02
    back = ours.to_torch()
    assert isinstance(back, torch.optim.AdamW) and [g["lr"] for g in back.param_groups] == [2e-3, 1e-3]
    for p in model.parameters():
        r, b = ref.state[p], back.state[p]
        assert int(b["step"]) == int(r["step"]) == 5
        for key in ("exp_avg", "exp_avg_sq"):
            err = (b[key] - r[key]).abs().max()
            scale = r[key].abs().max()
            if p.numel() < 1000:
                assert torch.equal(b[key], r[key])  # fp32 state: exact
            else:  # 8-bit dynamic map: a few percent of the block's absmax at most
                assert err <= 0.08 * scale, f"{key}: {err} vs absmax {scale}"
                assert err > 0  # it is quantized
    # the converted optimizer keeps training like the original (losses within quantization noise)
    l_ref = _train(model, back, _batches(3, seed=9))
    assert all(torch.isfinite(torch.tensor(l_ref)))
    with pytest.raises(ValueError, match=r"amsgrad=True.*allowed: amsgrad=False"):
        AdamW.from_torch(torch.optim.AdamW(model.parameters(), amsgrad=True))
    with pytest.raises(TypeError, match=r"needs a torch.optim.AdamW, got SGD"):
        AdamW.from_torch(torch.optim.SGD(model.parameters(), lr=0.1))


def test_load_torch_adamw_state_dict_into_ours():
    model = _mlp()
    ref = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, ref, _batches(2))
    ours = AdamW(model.parameters(), lr=1e-3, state_bits=8, min_quantized_numel=1000)
    ours.load_state_dict(_roundtrip(ref.state_dict()))
    _train(model, ours, _batches(1))
    big = model[2].weight
    assert ours.state[big]["state_bits"] == 8 and int(ours.state[big]["step"]) == 3


def test_bf16_stochastic_rounding_is_unbiased_and_leaves_torch_rng_alone():
    """A constant small update (below half a bf16 ulp of the weight) is lost with round to nearest
    and kept on average with stochastic rounding; torch's global RNG is never used."""
    n, steps, lr = 20000, 40, 1e-4
    results = {}
    for name, sr, dtype in (("fp32", False, torch.float32), ("sr", True, torch.bfloat16),
                            ("nearest", False, torch.bfloat16)):
        p = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = AdamW([p], lr=lr, weight_decay=0.0, state_bits=8, bf16_stochastic_round=sr)
        rng = torch.get_rng_state()
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=dtype)
            opt.step()
        assert torch.equal(torch.get_rng_state(), rng)
        results[name] = p.detach().float()
    moved = 1 - results["fp32"].mean().item()  # ~ steps * lr: Adam's update of a constant gradient
    assert moved == pytest.approx(steps * lr, rel=0.01)
    assert torch.all(results["nearest"] == 1.0)  # each update is < half an ulp (2**-8) of 1.0
    assert 1 - results["sr"].mean().item() == pytest.approx(moved, rel=0.05)
    assert len(results["sr"].unique()) > 1  # rounded up and down


def test_grad_scaler_skips_steps_with_inf_gradients():
    model = _mlp()
    opt = AdamW(model.parameters(), lr=1e-2, state_bits=8, min_quantized_numel=1000)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _batches(1)[0]
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[2].weight].items() if isinstance(v, torch.Tensor)}
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    model[2].weight.grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)  # skipped: weights and state unchanged
    scaler.update()
    assert scaler.get_scale() < scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(v, opt.state[model[2].weight][k]) for k, v in state.items())


@pytest.mark.slow
@pytest.mark.xdist_group("optim_charlm")
def test_short_charlm_convergence_close_to_torch_adamw():
    """60 steps of a small char-level LLaMA: 8-bit within 1.5% and 4-bit within 3% of torch's AdamW
    final eval loss (the 300-step acceptance run is benchmarks/optimizer_parity.py)."""
    from ciuic._workloads import byte_splits, train_charlm

    data = byte_splits(400_000)
    common = dict(steps=60, batch=8, seq=64, lr=3e-3, eval_batches=8, data=data,
                  model_kwargs=dict(hidden=64, intermediate=128, layers=2, heads=2))
    base = train_charlm(None, **common).eval_loss
    for bits, bound in ((8, 0.015), (4, 0.03)):
        loss = train_charlm(None, optimizer=lambda p, bits=bits: AdamW(p, lr=3e-3, state_bits=bits,
                                                                        min_quantized_numel=1024), **common).eval_loss
        assert loss <= base * (1 + bound), f"{bits}-bit eval loss {loss:.4f} vs torch AdamW {base:.4f}"
