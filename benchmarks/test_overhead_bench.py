"""Per-call host overhead of the public ops, on tiny CPU inputs.

On a GPU a small STF call or a weighted_mse step runs in tens of microseconds
and the samplers call a step op per step, so the Python around the kernels
(argument checks, backend dispatch, the torch.library registration) matters.
It is pure host work, measured here on CPU with inputs so small that the
kernels themselves cost a few microseconds.

Peers in one group per op:
  public     the public function (fastdiff.stf_target, fastdiff.weighted_mse and
             its backward, fastdiff.ops.sampler_steps.affine_step / heun_correct)
  custom op  the registered op torch.ops.fastdiff.<op>.default on already
             checked arguments, without the public wrapper
  floor      the backend implementation resolved once and called directly on
             preallocated outputs: the floor of our own code (for weighted_mse
             without autograd, which no registration avoids)
  eager      the same formula as plain PyTorch ops (for scale)
public - floor is the per-call overhead. Each round calls the peer ITERS times
(medians of many rounds: the machine is shared and noisy), with torch on
one thread: the C++ kernels' thread pool would otherwise add its own wake-up
jitter, which on a busy machine dwarfs what is measured. Ratios only.

    pytest benchmarks/test_overhead_bench.py --benchmark-only
"""
from __future__ import annotations

import sys

import pytest
import torch

import fastdiff
from fastdiff.ops import _dispatch
from fastdiff.ops import sampler_steps as steps

stf_mod = sys.modules["fastdiff.ops.stf"]
wmse_mod = sys.modules["fastdiff.ops.weighted_mse"]

ROUNDS, ITERS = 60, 100
PEERS = ["public", "custom op", "floor", "eager"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(benchmark, group: str, peer: str, fn) -> None:
    benchmark.group = f"overhead {group}"
    benchmark.extra_info["peer"] = peer
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERS, warmup_rounds=3)


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("peer", PEERS)
def test_overhead_stf_target(benchmark, peer):
    g = _gen()
    x, ref = torch.randn(2, 8, generator=g), torch.randn(4, 8, generator=g)
    sigma = torch.full((2,), 0.5)
    if peer == "public":
        fn = lambda: fastdiff.stf_target(x, sigma, ref)  # noqa: E731
    elif peer == "custom op":
        op = torch.ops.fastdiff.stf_target.default
        fn = lambda: op(x, sigma, ref, "highest", "auto")  # noqa: E731
    elif peer == "floor":
        _, impl = _dispatch.resolve("stf_target", "auto", "cpu")
        t, lse = torch.empty_like(x), torch.empty(2, dtype=torch.float64)
        fn = lambda: impl(x, sigma, ref, "highest", t, lse)  # noqa: E731
    else:
        def fn():
            logits = -torch.cdist(x, ref) ** 2 / (2 * sigma[:, None] ** 2)
            return torch.softmax(logits, dim=1) @ ref
    _run(benchmark, "stf_target 2x4x8", peer, fn)


@pytest.mark.parametrize("peer", PEERS)
def test_overhead_weighted_mse_fwd_bwd(benchmark, peer):
    g = _gen()
    pred = torch.randn(2, 8, generator=g).requires_grad_(True)
    target, weight = torch.randn(2, 8, generator=g), torch.rand(2, generator=g)
    if peer == "public":
        fn = lambda: torch.autograd.grad(fastdiff.weighted_mse(pred, target, weight), pred)  # noqa: E731
    elif peer == "custom op":
        op = torch.ops.fastdiff.weighted_mse.default
        fn = lambda: torch.autograd.grad(op(pred, target, weight, True, "auto")[0], pred)  # noqa: E731
    elif peer == "floor":
        _, impl = _dispatch.resolve("weighted_mse", "auto", "cpu")
        p, loss, grad = pred.detach(), torch.empty(()), torch.empty(2, 8)
        fn = lambda: impl(p, target, weight, loss, grad, True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad((weight[:, None] * (pred - target) ** 2).mean(), pred)  # noqa: E731
    _run(benchmark, "weighted_mse fwd+bwd 2x8", peer, fn)


@pytest.mark.parametrize("peer", PEERS)
def test_overhead_sampler_affine(benchmark, peer):
    g = _gen()
    x, u, v = (torch.randn(2, 8, generator=g) for _ in range(3))
    if peer == "public":
        fn = lambda: steps.affine_step(x, u, 0.5, 0.25, v, 2.0)  # noqa: E731
    elif peer == "custom op":
        op = torch.ops.fastdiff.sampler_affine.default
        fn = lambda: op(x, u, v, 0.5, 0.25, 2.0, "auto")  # noqa: E731
    elif peer == "floor":
        _, impl = _dispatch.resolve("sampler_affine", "auto", "cpu")
        out = torch.empty_like(x)
        fn = lambda: impl(x, u, v, 0.5, 0.25, 2.0, out)  # noqa: E731
    else:
        fn = lambda: 0.5 * x + 0.25 * u + 2.0 * v  # noqa: E731
    _run(benchmark, "sampler_affine 2x8", peer, fn)


@pytest.mark.parametrize("peer", PEERS)
def test_overhead_heun_correct(benchmark, peer):
    g = _gen()
    x, d, x2, d2 = (torch.randn(2, 8, generator=g) for _ in range(4))
    if peer == "public":
        fn = lambda: steps.heun_correct(x, d, x2, d2, 1.0, 0.5)  # noqa: E731
    elif peer == "custom op":
        op = torch.ops.fastdiff.heun_correct.default
        fn = lambda: op(x, d, x2, d2, 1.0, 0.5, "auto")  # noqa: E731
    elif peer == "floor":
        _, impl = _dispatch.resolve("heun_correct", "auto", "cpu")
        out = torch.empty_like(x)
        fn = lambda: impl(x, d, x2, d2, 1.0, 0.5, out)  # noqa: E731
    else:
        fn = lambda: x + (0.5 - 1.0) / 2 * ((x - d) / 1.0 + (x2 - d2) / 0.5)  # noqa: E731
    _run(benchmark, "heun_correct 2x8", peer, fn)
