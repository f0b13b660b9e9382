"""The example of fastdiff's STF target inside EDM-, k-diffusion- and diffusers-style loops."""
import importlib.util
import os

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "stf_in_existing_loop", os.path.join(os.path.dirname(__file__), "..", "examples", "stf_in_existing_loop.py"))
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)


def test_edm_loop_runs():
    losses = ex.demo(steps=4)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_kdiffusion_target_is_dsm_when_the_reference_is_the_sample():
    gen = torch.Generator().manual_seed(0)
    y, noise = torch.randn(1, 3, 4, 4, generator=gen), torch.randn(1, 3, 4, 4, generator=gen)
    sigma = torch.tensor([0.7])
    model = lambda x, s: torch.zeros_like(x)
    got = ex.kdiffusion_stf_loss(model, y, noise, sigma, ref=y[:0])
    c_skip, c_out = 0.25 / (0.49 + 0.25), 0.7 * 0.5 / (0.49 + 0.25) ** 0.5
    want = ((y - c_skip * (y + noise * 0.7)) / c_out).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, want)


def test_diffusers_eps_target_is_the_noise_for_a_single_reference_row():
    gen = torch.Generator().manual_seed(1)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    y, eps = torch.randn(1, 3, 8, 8, generator=gen), torch.randn(1, 3, 8, 8, generator=gen)
    t = torch.tensor([500])
    a = alphas_cumprod[t]
    noisy = a.sqrt() * y + (1 - a).sqrt() * eps
    got = ex.diffusers_stf_eps_target(noisy, t, y, y[:0], alphas_cumprod)
    torch.testing.assert_close(got, eps, atol=1e-4, rtol=1e-4)


def test_stf_target_averages_over_the_reference_at_large_noise():
    gen = torch.Generator().manual_seed(2)
    y, ref = torch.randn(4, 1, 4, 4, generator=gen), torch.randn(60, 1, 4, 4, generator=gen)
    noisy = y + 1e4 * torch.randn(y.shape, generator=gen)
    alphas_cumprod = torch.tensor([1 / (1 + 1e8)])
    eps = ex.diffusers_stf_eps_target(noisy / (1 + 1e8) ** 0.5, torch.zeros(4, dtype=torch.long), y, ref,
                                      alphas_cumprod)
    assert eps.shape == y.shape and torch.isfinite(eps).all()
