"""GaussianMixture: closed-form denoiser and score against autograd and Monte Carlo (float64)."""

import pytest
import torch

from fastdiff.diffusion.gmm import GaussianMixture


@pytest.mark.parametrize("sigma", [0.01, 0.3, 5.0])
def test_score_is_gradient_of_log_prob(sigma):
    g = torch.Generator().manual_seed(0)
    gmm = GaussianMixture.random(5, (3,), generator=g)
    x = gmm.sample(7, generator=g, sigma=sigma).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(gmm.score(x.detach(), sigma), grad, rtol=1e-9, atol=1e-9)


def test_log_prob_normalized_1d():
    gmm = GaussianMixture([1.0, 2.0], [[-1.0], [2.0]], [0.3, 0.7])
    x = torch.linspace(-8, 10, 20001, dtype=torch.float64)[:, None]
    p = gmm.log_prob(x, 0.4).exp()
    assert abs(torch.trapezoid(p, x[:, 0]).item() - 1.0) < 1e-6


def test_denoiser_matches_monte_carlo_posterior_mean():
    # E[y | x] by self-normalized importance sampling from the prior.
    g = torch.Generator().manual_seed(1)
    gmm = GaussianMixture.random(3, (2,), generator=g)
    sigma = 0.5
    x = gmm.sample(4, generator=g, sigma=sigma)
    y = gmm.sample(400000, generator=g)
    logw = -((x[:, None] - y[None]) ** 2).sum(-1) / (2 * sigma ** 2)
    mc = torch.softmax(logw, 1) @ y
    torch.testing.assert_close(gmm.denoiser(x, sigma), mc, atol=2e-2, rtol=0)


def test_image_shape_and_diag_stds():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    stds = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) + 0.1
    gmm = GaussianMixture([1, 1, 1], means, stds)
    x = gmm.sample(5, generator=g)
    assert x.shape == (5, 2, 4, 4)
    sig = torch.tensor([0.1, 1.0, 2.0, 0.5, 0.01], dtype=torch.float64)
    assert gmm.denoiser(x, sig).shape == x.shape
    with pytest.raises(ValueError, match="x must have shape"):
        gmm.denoiser(x[:, :1], 0.1)
    with pytest.raises(ValueError, match="sigma"):
        gmm.denoiser(x, torch.ones(3, dtype=torch.float64))
