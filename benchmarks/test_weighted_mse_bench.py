"""fastdiff.weighted_mse, forward + backward, against eager PyTorch and torch.compile.

Peers in one group per (device, size, dtype):
  eager          (w * (p - t) ** 2).mean() and its backward, eager PyTorch
  compile        the same function under torch.compile
  fused-<name>   fastdiff.weighted_mse(p, t, w, backend=<name>) and its backward
Each call runs `reps` forward+backward steps (the gradient w.r.t. pred only,
through torch.autograd.grad, so no peer pays for accumulation) and, on CUDA,
synchronizes once. Ratios only; nothing is asserted about time. On CUDA,
extra_info["peak_mib"] is the peak memory above the inputs during one step
(the fused op's target: no float32 temporary of the input's size besides the
gradient).

    pytest benchmarks/test_weighted_mse_bench.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.ops import _dispatch

CASES = [
    ("cpu", (128, 3, 32, 32), torch.float32),
    ("cuda", (512, 3, 32, 32), torch.bfloat16),
    ("cuda", (512, 3, 32, 32), torch.float32),
    ("cuda", (128, 3, 64, 64), torch.bfloat16),
    ("cuda", (128, 3, 64, 64), torch.float32),
]
PEERS = ["eager", "compile", "fused-torch", "fused-cpu", "fused-triton", "fused-cuda"]
ROUNDS = {"cpu": 5, "cuda": 30}
REPS = {"cpu": 1, "cuda": 20}


def eager_loss(pred, target, weight):
    w = weight.reshape((-1,) + (1,) * (pred.dim() - 1))
    return (w * (pred - target) ** 2).mean()


_compiled = torch.compile(eager_loss, fullgraph=True, dynamic=False)


def _loss_fn(peer: str):
    if peer == "eager":
        return eager_loss
    if peer == "compile":
        return _compiled
    backend = peer.removeprefix("fused-")
    return lambda p, t, w: fastdiff.weighted_mse(p, t, w, backend=backend)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("device,shape,dtype", CASES,
                         ids=[f"{d}-{'x'.join(map(str, s))}-{str(t).removeprefix('torch.')}" for d, s, t in CASES])
def test_weighted_mse_fwd_bwd(benchmark, device, shape, dtype, peer):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if peer.startswith("fused-"):
        backend = peer.removeprefix("fused-")
        if not _dispatch.backend_status(backend, device, "weighted_mse").available:
            pytest.skip(f"{backend} on {device}: unavailable here")
    gen = torch.Generator(device=device).manual_seed(0)
    pred = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(True)
    target = torch.randn(shape, generator=gen, device=device).to(dtype)
    weight = torch.rand(shape[0], generator=gen, device=device)
    loss_fn = _loss_fn(peer)
    reps = REPS[device]

    def step():
        for _ in range(reps):
            (g,) = torch.autograd.grad(loss_fn(pred, target, weight), pred)
        if device == "cuda":
            torch.cuda.synchronize()
        return g

    step()  # compiles, loads kernels
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (g,) = torch.autograd.grad(loss_fn(pred, target, weight), pred)
        torch.cuda.synchronize()
        benchmark.extra_info["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
        del g
    benchmark.group = f"weighted_mse {device} {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["peer"] = peer
    benchmark.extra_info["reps"] = reps
    benchmark.pedantic(step, rounds=ROUNDS[device], iterations=1, warmup_rounds=1)
