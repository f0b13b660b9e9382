"""Sampler benchmarks: fused step kernels versus unfused PyTorch, and sampler overhead.

    pytest benchmarks/test_sampling_bench.py --benchmark-only

1. One sampler step at 512x3x32x32 and 64x3x64x64 (CUDA) or 16x3x32x32 (CPU): Heun's
   correction (4 inputs) and DPM-Solver++(2M)'s update (3 inputs), each as the fused op
   on every available backend against the same formula in eager PyTorch ("eager") and
   under torch.compile ("compile"). Group "<step> <size> <device>".
2. The sampler's overhead outside the denoiser: a Heun run with a small conv net on CPU
   ("sample") against the denoiser calls alone ("floor"); extra_info["overhead_fraction"]
   is the share of the run spent outside the net.
CPU peers run single-threaded (see _cpu_threads).
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from fastdiff.ops import _dispatch
from fastdiff.ops.sampler_steps import affine_step, heun_correct
from fastdiff.sampling import sample

CUDA_SHAPES = [(512, 3, 32, 32), (64, 3, 64, 64)]
CPU_SHAPES = [(16, 3, 32, 32)]
SIGMA, SIGMA_NEXT = 1.3, 0.9


pytestmark = pytest.mark.usefixtures("one_thread")


def _cases():
    out = [("cpu", s) for s in CPU_SHAPES]
    if torch.cuda.is_available():
        out += [("cuda", s) for s in CUDA_SHAPES]
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def heun_unfused(x, denoised, x_next, denoised_next, sigma: float, sigma_next: float):
    d = (x - denoised) / sigma
    d_next = (x_next - denoised_next) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)


def dpmpp_2m_unfused(x, denoised, denoised_prev, sigma: float, sigma_next: float, h_prev: float):
    h = math.log(sigma / sigma_next)
    r = h_prev / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised_d


def dpmpp_2m_fused(x, denoised, denoised_prev, sigma, sigma_next, h_prev, backend):
    h = math.log(sigma / sigma_next)
    c, half_inv_r = -math.expm1(-h), h / (2 * h_prev)
    return affine_step(x, denoised, sigma_next / sigma, c * (1 + half_inv_r), denoised_prev, -c * half_inv_r,
                       backend=backend)


def _peers(device):
    """(peer name, backend or None for the unfused eager/compiled formula)."""
    peers = [("eager", None), ("compile", "compile")]
    for b in _dispatch.BACKENDS:
        if _dispatch.backend_status(b, device, "sampler_affine").available:
            peers.append((f"fused-{b}", b))
    return peers


def _params():
    return [pytest.param(device, shape, peer, backend, id=f"{device}-{'x'.join(map(str, shape))}-{peer}")
            for device, shape in _cases() for peer, backend in _peers(device)]


def _run(benchmark, fn, device, rounds):
    def call():
        fn()
        _sync(device)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("device,shape,peer,backend", _params())
def test_heun_step(benchmark, device, shape, peer, backend):
    g = torch.Generator(device=device).manual_seed(0)
    x, den, x1, den1 = (torch.randn(shape, generator=g, device=device) for _ in range(4))
    if backend is None:
        fn = lambda: heun_unfused(x, den, x1, den1, SIGMA, SIGMA_NEXT)  # noqa: E731
    elif backend == "compile":
        compiled = torch.compile(heun_unfused)
        fn = lambda: compiled(x, den, x1, den1, SIGMA, SIGMA_NEXT)  # noqa: E731
    else:
        fn = lambda: heun_correct(x, den, x1, den1, SIGMA, SIGMA_NEXT, backend=backend)  # noqa: E731
    benchmark.group = f"heun step {'x'.join(map(str, shape))} {device}"
    benchmark.extra_info["peer"] = peer
    _run(benchmark, fn, device, rounds=50 if device == "cuda" else 10)


@pytest.mark.parametrize("device,shape,peer,backend", _params())
def test_dpmpp_2m_step(benchmark, device, shape, peer, backend):
    g = torch.Generator(device=device).manual_seed(0)
    x, den, den_prev = (torch.randn(shape, generator=g, device=device) for _ in range(3))
    h_prev = 0.3
    if backend is None:
        fn = lambda: dpmpp_2m_unfused(x, den, den_prev, SIGMA, SIGMA_NEXT, h_prev)  # noqa: E731
    elif backend == "compile":
        compiled = torch.compile(dpmpp_2m_unfused)
        fn = lambda: compiled(x, den, den_prev, SIGMA, SIGMA_NEXT, h_prev)  # noqa: E731
    else:
        fn = lambda: dpmpp_2m_fused(x, den, den_prev, SIGMA, SIGMA_NEXT, h_prev, backend)  # noqa: E731
    benchmark.group = f"dpmpp_2m step {'x'.join(map(str, shape))} {device}"
    benchmark.extra_info["peer"] = peer
    _run(benchmark, fn, device, rounds=50 if device == "cuda" else 10)


class SmallConvDenoiser(torch.nn.Module):
    """A small conv net with EDM's preconditioning: a real network for the overhead measurement."""

    def __init__(self, channels=3, width=32, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels + 1, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        sd2 = self.sigma_data ** 2
        c_skip, c_out = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in, c_noise = 1 / (sd2 + s ** 2).sqrt(), s.log() / 4
        h = torch.cat([c_in * x, c_noise.expand(x.shape[0], 1, *x.shape[2:])], dim=1)
        return c_skip * x + c_out * self.net(h)


@pytest.mark.parametrize("peer", ["sample", "floor"])
def test_sampler_overhead(benchmark, peer):
    torch.manual_seed(0)
    net = SmallConvDenoiser().eval()
    shape, steps = (8, 3, 16, 16), 10
    spent = [0.0]

    def timed(x, sigma):
        t0 = time.perf_counter()
        out = net(x, sigma)
        spent[0] += time.perf_counter() - t0
        return out

    if peer == "sample":
        fn = lambda: sample(timed, shape, steps=steps, generator=torch.Generator().manual_seed(0))  # noqa: E731
    else:
        x = torch.randn(shape)
        sig = torch.full((shape[0],), 1.0)

        def fn():
            with torch.no_grad():
                for _ in range(2 * steps - 1):   # Heun's denoiser calls
                    timed(x, sig)
    benchmark.group = f"heun sampler overhead {'x'.join(map(str, shape))} cpu"
    benchmark.extra_info["peer"] = peer
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    spent[0] = 0.0
    t0 = time.perf_counter()
    fn()
    total = time.perf_counter() - t0
    benchmark.extra_info["overhead_fraction"] = round(1.0 - spent[0] / total, 4)
