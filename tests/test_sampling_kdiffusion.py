"""fastdiff's samplers against k-diffusion's (Crowson's k_diffusion/sampling.py) draw for draw.

Given the same sigmas (float64), initial x and noise, every sampler k-diffusion also has must
agree with it to float64 round-off, and call noise_sampler with the same arguments in the same
order. Skipped when k-diffusion is not installed; CI installs it with

    pip install --no-deps k-diffusion torchsde torchdiffeq trampoline

k-diffusion's package __init__ imports heavy optional modules (scikit-image, wandb, ...), so only
k_diffusion/sampling.py is loaded, under a bare package module.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from fastdiff.sampling import sample, sigma_steps
from test_sampling import _mixture, _one_thread  # noqa: F401  (the module's single-thread fixture)


def _load_k_diffusion_sampling():
    """k_diffusion.sampling, or the reason it cannot be loaded."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"], None
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None, "k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq trampoline)"
    saved = sys.modules.get("k_diffusion")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = pkg
    try:
        try:
            importlib.import_module("k_diffusion.utils")
        except ImportError:
            # sampling.py needs only utils.append_dims from its utils (which imports PIL, safetensors, torchvision).
            utils = types.ModuleType("k_diffusion.utils")
            utils.append_dims = lambda t, n: t[(...,) + (None,) * (n - t.ndim)]
            sys.modules["k_diffusion.utils"] = pkg.utils = utils
        return importlib.import_module("k_diffusion.sampling"), None
    except ImportError as e:
        return None, f"k_diffusion.sampling does not import: {e}"
    finally:
        if saved is not None:
            sys.modules["k_diffusion"] = saved


K, _REASON = _load_k_diffusion_sampling()
pytestmark = pytest.mark.skipif(K is None, reason=_REASON or "")

SHAPE = (16, 2)
STEPS = 12


class Replay:
    """A noise sampler whose k-th call returns the k-th of a fixed list of draws, recording its arguments."""

    def __init__(self, seed: int, count: int = 4 * STEPS):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(count)]
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.draws[len(self.calls) - 1].clone()


def _grid(schedule: str):
    return sigma_steps(STEPS, 0.002, 80.0, 7.0, schedule)


def _x0(sigmas, seed=5):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigmas[0]


def _assert_round_off(ours, theirs, what):
    # Both run in float64 with the same formulas up to their order of operations; over a dozen
    # steps of the mixture's denoiser their difference stays within ~100 ulp of the samples' scale.
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-13 * max(scale, 1.0), f"{what}: max |ours - k-diffusion| = {err:.3e} (scale {scale:.3g})"


# (fastdiff name, k-diffusion function, options (fastdiff spelling), k-diffusion's spelling)
STOCHASTIC = [
    ("euler_ancestral", "sample_euler_ancestral", {}, {}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.6, "s_noise": 1.1}, {"eta": 0.6, "s_noise": 1.1}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}, {}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9}, {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {}, {}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 1.5}, {"eta": 1.5}),
    ("dpmpp_sde", "sample_dpmpp_sde", {}, {}),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 0.7, "r": 0.3}, {"eta": 0.7, "r": 0.3}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, {"solver_type": "heun", "eta": 0.5}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}, {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.05}, {"eta": 0.4, "s_noise": 1.05}),
    ("ddpm", "sample_euler_ancestral", {}, {"eta": 1.0}),
    ("ddim", "sample_euler_ancestral", {"eta": 0.3}, {"eta": 0.3}),
]
DETERMINISTIC = [
    ("euler", "sample_euler", {}, {}),
    ("heun", "sample_heun", {}, {}),
    ("dpm_2", "sample_dpm_2", {}, {}),
    ("lms", "sample_lms", {}, {}),
    ("lms", "sample_lms", {"order": 2}, {"order": 2}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, {}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.0}, {"eta": 0.0}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.0}, {"eta": 0.0}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.0}, {"eta": 0.0}),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 0.0}, {"eta": 0.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}, {"eta": 0.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, {"eta": 0.0, "solver_type": "heun"}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}, {"eta": 0.0}),
]


def _ids(cases):
    return [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, _, opts, _ in cases]


@pytest.mark.parametrize("schedule", ["edm", "vp"])
@pytest.mark.parametrize("name,k_name,opts,k_opts", STOCHASTIC, ids=_ids(STOCHASTIC))
def test_stochastic_samplers_match_k_diffusion(name, k_name, opts, k_opts, schedule):
    gmm = _mixture()
    sigmas = _grid(schedule)
    x0 = _x0(sigmas)
    ours_noise, k_noise = Replay(1), Replay(1)
    ours = sample(gmm.denoiser, sigmas=sigmas, x=x0, sampler=name, noise_sampler=ours_noise, **opts)
    theirs = getattr(K, k_name)(gmm.denoiser, x0.clone(), torch.tensor(sigmas, dtype=torch.float64), disable=True,
                                noise_sampler=k_noise, **k_opts)
    _assert_round_off(ours, theirs, f"{name} {opts}")
    assert len(ours_noise.calls) > 0
    assert len(ours_noise.calls) == len(k_noise.calls), "a different number of draws"
    for (a, b), (c, d) in zip(ours_noise.calls, k_noise.calls):
        assert abs(a - c) <= 1e-12 * c and abs(b - d) <= 1e-12 * max(d, 1e-300), (ours_noise.calls, k_noise.calls)


@pytest.mark.parametrize("name,k_name,opts,k_opts", DETERMINISTIC, ids=_ids(DETERMINISTIC))
def test_deterministic_samplers_match_k_diffusion(name, k_name, opts, k_opts):
    gmm = _mixture()
    sigmas = _grid("edm")
    x0 = _x0(sigmas)
    calls = []
    ours = sample(gmm.denoiser, sigmas=sigmas, x=x0, sampler=name, noise_sampler=lambda s, t: calls.append(s), **opts)
    theirs = getattr(K, k_name)(gmm.denoiser, x0.clone(), torch.tensor(sigmas, dtype=torch.float64), disable=True,
                                **k_opts)
    _assert_round_off(ours, theirs, f"{name} {opts}")
    assert calls == [], f"{name} drew noise although it is deterministic here"


@pytest.mark.parametrize("name,k_name", [("euler", "sample_euler"), ("heun", "sample_heun"), ("dpm_2", "sample_dpm_2")])
@pytest.mark.parametrize("window", [(0.0, float("inf")), (0.05, 10.0)], ids=["every-step", "window"])
def test_churn_matches_k_diffusion(name, k_name, window):
    """k-diffusion (like EDM) draws torch.randn_like(x) on every step and uses it only where churn applies;
    fastdiff draws only there. A noise_sampler that returns k-diffusion's draw of step i reproduces it."""
    gmm = _mixture()
    sigmas = _grid("edm")
    x0 = _x0(sigmas)
    S_tmin, S_tmax = window
    torch.manual_seed(123)
    draws = [torch.randn_like(x0) for _ in range(STEPS)]
    step_of = {s: i for i, s in enumerate(sigmas)}
    used = []

    def noise_sampler(sigma, sigma_next):
        i = step_of[float(sigma)]
        used.append(i)
        assert sigmas[i + 1] == float(sigma_next)
        return draws[i]

    ours = sample(gmm.denoiser, sigmas=sigmas, x=x0, sampler=name, noise_sampler=noise_sampler, S_churn=30.0,
                  S_tmin=S_tmin, S_tmax=S_tmax, S_noise=1.007)
    torch.manual_seed(123)
    theirs = getattr(K, k_name)(gmm.denoiser, x0.clone(), torch.tensor(sigmas, dtype=torch.float64), disable=True,
                                s_churn=30.0, s_tmin=S_tmin, s_tmax=S_tmax, s_noise=1.007)
    _assert_round_off(ours, theirs, f"{name} churn {window}")
    assert used == [i for i, s in enumerate(sigmas[:-1]) if S_tmin <= s <= S_tmax]


def test_brownian_tree_noise_sampler_is_accepted():
    """k-diffusion's default noise for the SDE samplers, a Brownian tree, plugs in as noise_sampler as is."""
    pytest.importorskip("torchsde")
    gmm = _mixture()
    sigmas = _grid("edm")
    x0 = _x0(sigmas)
    runs = []
    for _ in range(2):
        tree = K.BrownianTreeNoiseSampler(x0, sigmas[-2], sigmas[0], seed=42)
        runs.append(sample(gmm.denoiser, sigmas=sigmas, x=x0, sampler="dpmpp_2m_sde", noise_sampler=tree))
    tree = K.BrownianTreeNoiseSampler(x0, sigmas[-2], sigmas[0], seed=42)
    theirs = K.sample_dpmpp_2m_sde(gmm.denoiser, x0.clone(), torch.tensor(sigmas, dtype=torch.float64),
                                   disable=True, noise_sampler=tree)
    assert torch.equal(runs[0], runs[1])
    _assert_round_off(runs[0], theirs, "dpmpp_2m_sde with a Brownian tree")
