"""A Gaussian mixture with a closed-form denoiser, in VE form.

Data y ~ sum_k pi_k N(mu_k, diag(s_k^2)); noisy x = y + sigma n, n ~ N(0, I). Then

    x | k   ~ N(mu_k, diag(s_k^2 + sigma^2))
    r_k(x)  = P(k | x) = softmax_k(log pi_k + log N(x; mu_k, s_k^2 + sigma^2))
    E[y | x] = sum_k r_k (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))      (the exact denoiser)
    score(x) = (E[y | x] - x) / sigma^2                                         (Tweedie)

Used as ground truth by the tests (DSM minimizer, STF bias), by the samplers
(exact denoiser) and by the trainer's "gmm" data set. Everything runs in the
dtype of the input (use float64 for references).
"""
from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixture"]


def _sigma_col(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (float, 0-d, (B,) or (B, 1, ...)) as a (B, 1) tensor in x's dtype."""
    B = x.shape[0]
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() == 0 or sigma.numel() == 1:
            s = sigma.reshape(1, 1).to(x).expand(B, 1)
        elif sigma.shape[0] == B and sigma[0].numel() == 1:
            s = sigma.reshape(B, 1).to(x)
        else:
            raise ValueError(f"sigma must be a float, a 0-d tensor or have shape ({B},); got {tuple(sigma.shape)}")
    else:
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
        s = torch.full((B, 1), float(sigma), dtype=x.dtype, device=x.device)
    return s


class GaussianMixture:
    """Mixture of diagonal Gaussians over samples of shape `shape`.

    Args:
        weights: (K,) mixture weights (normalized here).
        means: (K, *shape) component means.
        stds: per-component standard deviations, (K,) (isotropic) or (K, *shape).
    """

    def __init__(self, weights, means, stds):
        means = torch.as_tensor(means)
        if not means.is_floating_point():
            means = means.double()
        if means.dim() < 2:
            raise ValueError(f"means must have shape (K, *shape), got {tuple(means.shape)}")
        K = means.shape[0]
        self.shape = tuple(means.shape[1:])
        self.dim = math.prod(self.shape)
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        if weights.shape != (K,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be positive with shape ({K},), got {tuple(weights.shape)}")
        stds = torch.as_tensor(stds, dtype=means.dtype, device=means.device)
        if stds.shape == (K,):
            stds = stds[:, None].expand(K, self.dim)
        elif stds.shape == means.shape:
            stds = stds.reshape(K, self.dim)
        else:
            raise ValueError(f"stds must have shape ({K},) or {tuple(means.shape)}, got {tuple(stds.shape)}")
        if not bool((stds >= 0).all()):
            raise ValueError("stds must be >= 0")
        self.weights = weights / weights.sum()
        self.means = means.reshape(K, self.dim)
        self.vars = stds.pow(2).contiguous()

    # ------------------------------------------------------------------ construction
    @classmethod
    def ring(cls, n_components: int = 8, radius: float = 1.0, std: float = 0.05, dim: int = 2,
             dtype=torch.float64):
        """Equal-weight isotropic components on a circle in the first two coordinates."""
        if dim < 2:
            raise ValueError(f"dim must be >= 2 for a ring, got {dim}")
        a = torch.arange(n_components, dtype=dtype) * (2 * math.pi / n_components)
        means = torch.zeros(n_components, dim, dtype=dtype)
        means[:, 0], means[:, 1] = radius * a.cos(), radius * a.sin()
        return cls(torch.ones(n_components, dtype=dtype), means, torch.full((n_components,), std, dtype=dtype))

    @classmethod
    def random(cls, n_components: int, shape, *, scale: float = 1.0, std_range=(0.05, 0.3),
               generator: torch.Generator | None = None, dtype=torch.float64):
        """Random weights, means ~ N(0, scale^2) and isotropic stds uniform in std_range."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        g = generator
        w = torch.rand(n_components, generator=g, dtype=dtype) + 0.5
        means = scale * torch.randn(n_components, *shape, generator=g, dtype=dtype)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(n_components, generator=g, dtype=dtype)
        return cls(w, means, stds)

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        out = object.__new__(GaussianMixture)
        out.shape, out.dim = self.shape, self.dim
        out.weights = self.weights.to(device=device, dtype=dtype)
        out.means = self.means.to(device=device, dtype=dtype)
        out.vars = self.vars.to(device=device, dtype=dtype)
        return out

    # ------------------------------------------------------------------ distribution
    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0).reshape(self.shape)

    def std(self) -> torch.Tensor:
        """Overall standard deviation (scalar): sqrt of the average per-dimension variance."""
        m = self.mean.reshape(-1)
        second = (self.weights[:, None] * (self.vars + self.means.pow(2))).sum(0)
        return (second - m.pow(2)).mean().sqrt()

    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0,
               return_components: bool = False):
        """n samples of shape (n, *shape); with sigma > 0, samples of the noisy marginal."""
        if n == 0:
            k = torch.zeros(0, dtype=torch.long, device=self.means.device)
        else:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        x = self.means[k] + (self.vars[k] + sigma ** 2).sqrt() * z
        x = x.reshape(n, *self.shape)
        return (x, k) if return_components else x

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def _component_logp(self, x2: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(B, K): log pi_k + log N(x; mu_k, vars_k + sigma^2)."""
        v = self.vars.to(x2)[None] + s.pow(2)[:, :, None]                    # (B, K, D) or (B, 1..)
        d = x2[:, None, :] - self.means.to(x2)[None]
        logn = -0.5 * (d.pow(2) / v + v.log() + math.log(2 * math.pi)).sum(-1)
        return self.weights.to(x2).log()[None] + logn

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log density of the data (sigma = 0) or of the noisy marginal at sigma, shape (B,)."""
        x2 = self._flat(x)
        s = _sigma_col(sigma, x2)
        return torch.logsumexp(self._component_logp(x2, s), dim=1)

    def posterior(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """(B, K) responsibilities P(k | x) at noise level sigma."""
        x2 = self._flat(x)
        return torch.softmax(self._component_logp(x2, _sigma_col(sigma, x2)), dim=1)

    def denoiser(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The exact denoiser E[y | x] for x = y + sigma n (VE form), x's shape."""
        x2 = self._flat(x)
        s = _sigma_col(sigma, x2)
        r = torch.softmax(self._component_logp(x2, s), dim=1)                # (B, K)
        v = self.vars.to(x2)[None]                                           # (1, K, D)
        gain = v / (v + s.pow(2)[:, :, None])                                # (B, K, D)
        mu = self.means.to(x2)[None]
        cond = mu + gain * (x2[:, None, :] - mu)
        return (r[:, :, None] * cond).sum(1).reshape(x.shape)

    __call__ = denoiser

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x) = (E[y | x] - x) / sigma^2, x's shape."""
        s = _sigma_col(sigma, self._flat(x)).reshape(-1, *([1] * (x.dim() - 1)))
        return (self.denoiser(x, sigma) - x) / s.pow(2)
