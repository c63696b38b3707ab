"""ciuic.optim.fuse_into_backward: peak gradient bytes during backward, same losses as the unfused
optimizer (ours and torch's), LR schedulers, step()/zero_grad() after fusing, accumulation errors."""

import warnings

import pytest
import torch

from ciuic.optim import AdamW, fuse_into_backward


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))


def _batches(n, seed=1):
    """A learnable task: labels from a fixed random linear teacher."""
    teacher = torch.randn(32, 8, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 32, generator=g) for _ in range(n)]
    return [(x, (x @ teacher).argmax(1)) for x in xs]


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _train(model, opt, batches, scheduler=None):
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one-time "step() does nothing" warning
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, x, y)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
    return losses


def _peak_live_gradient_bytes(model, opt, fuse):
    """Max over backward of the bytes of all ``.grad`` tensors alive, sampled each time a gradient
    is accumulated (hooks registered before the fusing ones, so they see the new gradient)."""
    params = list(model.parameters())
    peak = [0]

    def sample(_):
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    hooks = [p.register_post_accumulate_grad_hook(sample) for p in params]
    handle = fuse_into_backward(opt) if fuse else None
    try:
        x, y = _batches(1)[0]
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
    finally:
        for h in hooks:
            h.remove()
        if handle is not None:
            handle.remove()
    return peak[0]


@pytest.mark.parametrize("kind", ["ciuic", "torch"])
def test_peak_gradient_bytes_at_most_twice_the_largest(kind):
    model = _model()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    make = (lambda: AdamW(model.parameters(), state_bits=8, min_quantized_numel=1024)) if kind == "ciuic" else (
        lambda: torch.optim.AdamW(model.parameters(), foreach=False))
    unfused = _peak_live_gradient_bytes(model, make(), fuse=False)
    fused = _peak_live_gradient_bytes(model, make(), fuse=True)
    assert unfused > 2 * largest  # the measurement can fail: without fusing every gradient is alive
    assert fused <= 2 * largest, f"fused: {fused} bytes of gradients alive, largest gradient {largest}"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["ciuic8", "ciuic4_bf16_sr", "torch"])
def test_fused_losses_equal_unfused_over_50_steps_with_scheduler(kind):
    dtype = torch.bfloat16 if kind == "ciuic4_bf16_sr" else torch.float32

    def make(model):
        if kind == "torch":
            return torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        return AdamW(model.parameters(), lr=1e-2, state_bits=8 if kind == "ciuic8" else 4, min_quantized_numel=1024,
                     bf16_stochastic_round=dtype == torch.bfloat16)

    runs = []
    for fuse in (False, True):
        model = _model().to(dtype)
        opt = make(model)
        handle = fuse_into_backward(opt) if fuse else None
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        batches = [(x.to(dtype), y) for x, y in _batches(50)]
        runs.append((_train(model, opt, batches, sched), [p.detach().clone() for p in model.parameters()]))
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**2)
        if handle is not None:
            assert handle.updates == 50 * len(list(model.parameters()))
            handle.remove()
    (unfused_losses, unfused_params), (fused_losses, fused_params) = runs
    assert fused_losses == unfused_losses
    assert all(torch.equal(a, b) for a, b in zip(fused_params, unfused_params))
    assert sum(unfused_losses[-5:]) < 0.9 * sum(unfused_losses[:5])  # it trained


def test_step_after_fusing_warns_once_runs_the_closure_and_remove_restores():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    handle = fuse_into_backward(opt)
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="does nothing after ciuic.optim.fuse_into_backward"):
        loss = opt.step(closure)  # Lightning's pattern: the closure runs forward + backward
    assert isinstance(loss, torch.Tensor)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # updated in backward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # no second warning
    with pytest.raises(RuntimeError, match="already fused"):
        fuse_into_backward(opt)
    handle.remove()
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())  # no longer freed in backward
    after_backward = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the normal step again
    assert all(not torch.equal(a, b) for a, b in zip(after_backward, model.parameters()))


def test_gradient_accumulation_is_detected_with_a_clear_error():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    fuse_into_backward(opt)
    for x, y in _batches(2):  # two micro-batches, then one step: accumulation
        _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="updated 2 times.*gradient accumulation cannot work"):
        opt.step()
    with pytest.raises(ValueError, match=r"accumulation_steps=4 .*allowed: 1"):
        fuse_into_backward(AdamW(_model().parameters()), accumulation_steps=4)
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer"):
        fuse_into_backward(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tracked_grad_norm_equals_the_unfused_total_norm_each_step(dtype):
    # Two copies trained in lockstep (the fused and unfused torch AdamW give the same weights):
    # before each step the unfused copy's gradients give the reference norm, computed by torch.
    fused_model, plain_model = _model().to(dtype), _model().to(dtype)
    fused_opt = torch.optim.AdamW(fused_model.parameters(), lr=1e-2, foreach=False)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, foreach=False)
    handle = fuse_into_backward(fused_opt, track_grad_norm=True)
    assert float(handle.grad_norm()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for x, y in _batches(5):
            x = x.to(dtype)
            plain_opt.zero_grad(set_to_none=True)
            _loss(plain_model, x, y).backward()
            expected = torch.nn.utils.get_total_norm([p.grad.float() for p in plain_model.parameters()])
            plain_opt.step()
            _loss(fused_model, x, y).backward()
            assert all(p.grad is None for p in fused_model.parameters())
            torch.testing.assert_close(handle.grad_norm(), expected, rtol=1e-5, atol=0)
            fused_opt.step()  # the next backward starts a new sum
            assert float(handle.grad_norm()) == 0.0
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    handle.remove()


def test_grad_norm_without_tracking_says_how_to_turn_it_on():
    model = _model()
    handle = fuse_into_backward(torch.optim.AdamW(model.parameters()))
    with pytest.raises(RuntimeError, match="track_grad_norm=True"):
        handle.grad_norm()
    handle.remove()
    with pytest.raises(TypeError, match="track_grad_norm='yes' is not valid; allowed: True, False"):
        fuse_into_backward(torch.optim.AdamW(model.parameters()), track_grad_norm="yes")
