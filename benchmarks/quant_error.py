"""Round-trip error and size of the quant codec on four value distributions (bf16, 1M elements).

Used to check that a format change keeps the error per element no worse:
    python benchmarks/quant_error.py /tmp/before.json   (at the old revision)
    python benchmarks/quant_error.py /tmp/after.json    (at the new one), then compare the files.
ratio = Packed.nbytes / bf16 bytes; rel_rmse = RMS error / RMS value; group_rel_rmse = mean over
groups of (RMS error / group range); bias = mean error / mean |x|.
"""
import json, sys, torch
from ciuic_kernels import quant, QuantSpec
g = torch.Generator().manual_seed(0)
torch.manual_seed(0)  # StudentT samples from the global generator
n = 1 << 20
data = {
 "normal": torch.randn(n, generator=g),
 "student_t3": torch.distributions.StudentT(3.0).sample((n,)),
 "relu_scaled": torch.relu(torch.randn(n, generator=g)) * torch.exp(torch.randn(n // 256, generator=g)).repeat_interleave(256),
 "wide_range": torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n // 64,), generator=g).float()).repeat_interleave(64),
}
out = {}
for name, x in data.items():
    x = x.to(torch.bfloat16)
    xf = x.float()
    for bits in (8, 4, 2):
        for gs in (64, 128):
            for r in ("nearest", "stochastic"):
                p = quant.encode_reference(x, QuantSpec(bits, gs, r), seed=3)
                y = quant.decode_reference(p).float()
                err = (y - xf)
                # error relative to each group's range, so wide_range is meaningful
                rng = xf.view(-1, gs).amax(1) - xf.view(-1, gs).amin(1)
                relg = (err.view(-1, gs).pow(2).mean(1).sqrt() / rng.clamp_min(1e-30)).mean().item()
                out[f"{name} b{bits} g{gs} {r}"] = dict(ratio=p.nbytes / (2 * n), rel_rmse=(err.pow(2).mean().sqrt() / xf.pow(2).mean().sqrt()).item(), group_rel_rmse=relg, bias=(err.mean() / xf.abs().mean()).item())
json.dump(out, open(sys.argv[1], "w"), indent=1)
for k, v in out.items(): print(k, {a: round(b, 6) for a, b in v.items()})
