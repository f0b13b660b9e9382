"""Peers and data for the STF target benchmarks (benchmarks/test_stf_bench.py).

Each peer is `fn(x, sigma, ref) -> t` with x (B, D), sigma (B,), ref (N, D):

- published: the formula of the STF authors' code, as the paper describes it:
  a B x N x D broadcast of differences, squared and summed, max-subtracted,
  exponentiated and normalized, then a second B x N x D broadcast product of
  the weights with ref, summed over N. Rewritten here, not copied.
- compile:   torch.compile of a well-written plain formula (expansion logits,
  softmax, matmul): fast, but not exact at small sigma.
- floor:     the two matrix products the op cannot avoid, x @ ref.T and
  w @ ref, and nothing else.
- torch / cpu / triton / cuda: fastdiff.stf_target with that backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastdiff


def published(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    diff = x[:, None, :] - ref[None, :, :]                       # B x N x D
    logits = -(diff ** 2).sum(-1) / (2 * sigma[:, None] ** 2)    # B x N
    logits = logits - logits.max(dim=1, keepdim=True).values
    w = torch.exp(logits)
    w = w / w.sum(dim=1, keepdim=True)
    return (w[:, :, None] * ref[None, :, :]).sum(1)              # B x N x D again


def plain(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ ref.T) + (ref * ref).sum(1)[None, :]
    w = torch.softmax(-d2 / (2 * sigma[:, None] ** 2), dim=1)
    return w @ ref


_compiled = None


def compiled(x, sigma, ref):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    return _compiled(x, sigma, ref)


def make_floor(B: int, N: int, dtype=torch.float32, device="cpu"):
    """The two GEMMs alone, on preallocated weights (their values do not matter)."""
    w = torch.full((B, N), 1.0 / N, dtype=dtype, device=device)

    def floor(x, sigma, ref):
        logits = x @ ref.T
        return w @ ref, logits
    return floor


def backend_peer(backend: str):
    def fn(x, sigma, ref):
        return fastdiff.stf_target(x, sigma, ref, backend=backend)
    return fn


def image_like(n: int, D: int = 3072, *, generator: torch.Generator | None = None,
               device="cpu") -> torch.Tensor:
    """(n, D) smooth random images in [-1, 1], shaped like 3 x 32 x 32 data.

    Each image is low-resolution noise (4 x 4 to 16 x 16) upsampled bilinearly
    to 32 x 32, plus a class prototype shared by a tenth of the images, so the
    set has the near-neighbour structure of real data rather than that of
    white noise (where every pair is far apart and STF's weights are trivial).
    """
    side = int(round(math.sqrt(D / 3)))
    if 3 * side * side != D:
        raise ValueError(f"D must be 3 * s^2, got {D}")
    g = generator
    protos = F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=(side, side), mode="bilinear",
                           align_corners=False)
    out = torch.empty(n, 3, side, side)
    for res in (4, 8, 16):
        idx = torch.arange(n)[torch.arange(n) % 3 == (4, 8, 16).index(res)]
        if idx.numel():
            z = torch.randn(idx.numel(), 3, res, res, generator=g) * (4.0 / res)
            out[idx] = F.interpolate(z, size=(side, side), mode="bilinear", align_corners=False)
    out += protos[torch.randint(0, 10, (n,), generator=g)]
    out = torch.tanh(out)
    return out.reshape(n, D).to(device)


def edm_sigma(B: int, *, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """EDM's training noise levels: ln sigma ~ N(-1.2, 1.2^2)."""
    return torch.exp(-1.2 + 1.2 * torch.randn(B, generator=generator)).to(device)


def problem(B: int, N: int, D: int = 3072, *, seed: int = 0, device="cpu"):
    """(x, sigma, ref) with x = ref[:B] + sigma * noise, as in STF training."""
    g = torch.Generator().manual_seed(seed)
    ref = image_like(N, D, generator=g)
    sigma = edm_sigma(B, generator=g)
    x = ref[:B] + sigma[:, None] * torch.randn(B, D, generator=g)
    return x.to(device).contiguous(), sigma.to(device), ref.to(device).contiguous()
