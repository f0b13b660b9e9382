"""fastdiff.sample and the fused sampler steps.

- Fused steps (sampler_affine, heun_correct) on every backend against the unfused
  float64 update, outputs poisoned with NaN; Triton in its interpreter in a subprocess.
- Deterministic samplers driven by a Gaussian mixture's exact denoiser converge to a
  DOP853 probability-flow ODE solution (rtol 1e-11) with their order.
- Stochastic samplers match the mixture's mean, variance and weights within
  tolerances set by the sample size.
- Bad arguments raise clear errors.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import _ext
from fastdiff.diffusion.gmm import GaussianMixture
from fastdiff.ops import _dispatch
from fastdiff.ops import sampler_steps as steps_ops
from fastdiff.sampling import SAMPLERS, sample, sigma_steps

# ----------------------------------------------------------------------------
# plain-PyTorch float64 references: the unfused updates
# ----------------------------------------------------------------------------


def affine_ref(x, u, v, a, b, c):
    out = a * x.double() + b * u.double()
    return out if v is None else out + c * v.double()


def heun_ref(x, denoised, x_next, denoised_next, sigma, sigma_next):
    x, denoised, x_next, denoised_next = (t.double() for t in (x, denoised, x_next, denoised_next))
    d = (x - denoised) / sigma
    d_next = (x_next - denoised_next) / sigma_next
    return x + (sigma_next - sigma) / 2 * (d + d_next)


# An update computed in dtype with fp64 scalars errs by at most a few ulps of the
# largest term it adds up; the bound is per element.
ULPS = 4
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def _assert_within(out, ref, scale, dtype, what):
    assert out.dtype == dtype, what
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output (an element left unwritten?)"
    err = (out.double() - ref).abs()
    bound = ULPS * EPS[dtype] * scale + 1e-300
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the bound {ULPS} ulp x |terms|"


def _step_cases():
    """(a, b, c) triples the samplers produce, plus random ones."""
    sig = sigma_steps(18, 0.002, 80.0)
    s, s1 = sig[3], sig[4]
    r = s1 / s
    h = math.log(s / s1)
    return [
        (r, 1 - r, 0.0),                                      # Euler / DDIM
        (0.9, 0.1, 0.3),                                      # ancestral, EM
        (r, -math.expm1(-h) * 1.4, math.expm1(-h) * 0.4),     # DPM-Solver++(2M)
        (1.0, 37.5, 0.0),                                     # churn noise
        (-1.7, 2.3e-3, 1.3e4),
    ]


SIZES = [(1,), (7,), (47, 3), (123,), (5, 3, 17, 11)]    # ragged; the last spans several Triton blocks


def _inputs(shape, dtype, device, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 80.0
    u = torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-3
    x.view(-1)[0] = 1e30 if dtype == torch.float64 else 3e30  # extreme but finite in both dtypes
    return [t.to(dtype=dtype, device=device) for t in (x, u, v)]


def _backend_device(backend):
    if backend == "cuda":
        return "cuda"
    if backend == "triton" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _run_in_triton_interpreter(test: str, keyword: str) -> None:
    """Runs tests of this file in a subprocess with TRITON_INTERPRET=1 set before triton loads."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test}",
                        "-k", keyword], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"interpreter run failed:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout, r.stdout[-2000:]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: intra-op threads only add synchronization cost (10x on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _require(backend, op):
    device = _backend_device(backend)
    status = _dispatch.backend_status(backend, device, op)
    if not status.available:
        pytest.skip(status.reason)
    return device


@pytest.mark.parametrize("backend", _dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fused_steps_match_float64(backend, dtype):
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU: test_fused_steps_triton_interpreter runs this in the Triton interpreter")
    device = _require(backend, "sampler_affine")
    _, affine = _dispatch.resolve("sampler_affine", backend, device)
    _, heun = _dispatch.resolve("heun_correct", backend, device)
    gen = torch.Generator().manual_seed(0)
    for shape in SIZES:
        x, u, v = _inputs(shape, dtype, device, gen)
        for a, b, c in _step_cases():
            for vv in (v, None):
                out = torch.full_like(x, float("nan"))
                affine(x, u, vv, a, b, c, out)
                scale = (a * x.double()).abs() + (b * u.double()).abs()
                if vv is not None:
                    scale = scale + (c * vv.double()).abs()
                _assert_within(out, affine_ref(x, u, vv, a, b, c), scale, dtype, f"affine {shape} {a, b, c}")
                if vv is v and (a, b, c) == _step_cases()[0]:
                    assert torch.equal(steps_ops.affine_step(x, u, a, b, vv, c, backend=backend), out)
        x1, d1, _ = _inputs(shape, dtype, device, gen)
        for sigma, sigma_next in ((80.0, 57.3), (0.0031, 0.002), (1.0, 0.5)):
            out = torch.full_like(x, float("nan"))
            heun(x, u, x1, d1, sigma, sigma_next, out)
            p, q = (sigma_next - sigma) / (2 * sigma), (sigma_next - sigma) / (2 * sigma_next)
            xd, ud, x1d, d1d = (t.double() for t in (x, u, x1, d1))
            scale = xd.abs() + abs(p) * (xd.abs() + ud.abs()) + abs(q) * (x1d.abs() + d1d.abs())
            _assert_within(out, heun_ref(x, u, x1, d1, sigma, sigma_next), scale, dtype, f"heun {shape}")
            assert torch.equal(steps_ops.heun_correct(x, u, x1, d1, sigma, sigma_next, backend=backend), out)


def test_fused_steps_triton_interpreter():
    if torch.cuda.is_available():
        pytest.skip("Triton runs on the GPU here (test_fused_steps_match_float64[*-triton])")
    _run_in_triton_interpreter("test_fused_steps_match_float64", "triton")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fused_steps_opcheck(backend):
    device = _require(backend, "sampler_affine")
    x, u, v = (torch.randn(3, 5, device=device) for _ in range(3))
    torch.library.opcheck(steps_ops._sampler_affine_op, (x, u, v, 0.5, 0.25, 2.0, backend))
    torch.library.opcheck(steps_ops._sampler_affine_op, (x, u, None, 0.5, 0.25, 0.0, backend))
    torch.library.opcheck(steps_ops._heun_correct_op, (x, u, v, x, 1.0, 0.5, backend))


def test_fused_steps_compile():
    """The custom ops trace under torch.compile (fake impls) and give the eager result."""
    x, u, v = (torch.randn(4, 6) for _ in range(3))

    def step(x, u, v):
        return steps_ops.affine_step(x, u, 0.5, 0.25, v, 2.0, backend="torch")

    torch.testing.assert_close(torch.compile(step, backend="eager", fullgraph=True)(x, u, v), step(x, u, v))


def test_cuda_kernels_registered_when_built_with_cuda():
    built_with_cuda = _ext._C is not None and any(
        _ext.has_kernel(op, "CUDA") for op in ("stf_target", "weighted_mse", "sampler_affine", "heun_correct"))
    if not built_with_cuda:
        pytest.skip("the extension was built without CUDA kernels (FASTDIFF_NO_CUDA=1, no nvcc or CPU torch)")
    assert _ext.has_kernel("sampler_affine", "CUDA")
    assert _ext.has_kernel("heun_correct", "CUDA")


def test_fused_step_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="u must have shape"):
        steps_ops.affine_step(x, torch.randn(4, 2), 1.0, 1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        steps_ops.affine_step(x.half(), x.half(), 1.0, 1.0)
    with pytest.raises(TypeError, match="x's dtype"):
        steps_ops.affine_step(x, x.double(), 1.0, 1.0)
    with pytest.raises(ValueError, match="a must be finite"):
        steps_ops.affine_step(x, x, float("nan"), 1.0)
    with pytest.raises(ValueError, match="sigma_next must be positive"):
        steps_ops.heun_correct(x, x, x, x, 1.0, 0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        steps_ops.affine_step(x, x, 1.0, 1.0, backend="fast")


# ----------------------------------------------------------------------------
# samplers on a Gaussian mixture with its exact denoiser
# ----------------------------------------------------------------------------

def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                           torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64),
                           torch.tensor([0.5, 0.4, 0.6], dtype=torch.float64))


SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
ODE_SHAPE, ODE_SEED = (16, 2), 1


@pytest.fixture(scope="module")
def ode_reference():
    """The probability-flow ODE from sample()'s initial noise, solved by DOP853 (rtol 1e-11), then denoised."""
    from scipy.integrate import solve_ivp

    gmm = _mixture()
    x0 = torch.randn(ODE_SHAPE, generator=torch.Generator().manual_seed(ODE_SEED), dtype=torch.float64) * SIGMA_MAX

    def rhs(log_sigma, y):
        x = torch.from_numpy(y).reshape(ODE_SHAPE)
        return (x - gmm.denoiser(x, math.exp(log_sigma))).numpy().reshape(-1)

    sol = solve_ivp(rhs, (math.log(SIGMA_MAX), math.log(SIGMA_MIN)), x0.numpy().reshape(-1), method="DOP853",
                    rtol=1e-11, atol=1e-11)
    assert sol.success
    return gmm.denoiser(torch.from_numpy(sol.y[:, -1].copy()).reshape(ODE_SHAPE), SIGMA_MIN)


def _ode_error(sampler, intervals, backend="auto", **options):
    out = sample(_mixture().denoiser, ODE_SHAPE, sampler=sampler, steps=intervals + 1, sigma_min=SIGMA_MIN,
                 sigma_max=SIGMA_MAX, generator=torch.Generator().manual_seed(ODE_SEED), dtype=torch.float64,
                 backend=backend, **options)
    return out


@pytest.mark.parametrize("sampler,options,order,intervals,lo,hi", [
    ("euler", {}, 1, (16, 32, 64), 1.8, 2.2),
    ("heun", {}, 2, (16, 32, 64), 3.6, 4.8),
    ("dpmpp_2m", {}, 2, (16, 32, 64), 3.6, 5.2),
    ("ddim", {}, 1, (16, 32, 64), 1.8, 2.2),      # eta = 0: Euler in VE form
    ("dpm_2", {}, 2, (16, 32, 64), 3.6, 4.8),
    ("lms", {}, 4, (32, 64, 128), 10.0, 17.0),     # order 4 once past the lower-order start
    ("lms", {"order": 2}, 2, (32, 64, 128), 3.4, 4.6),
    # The ancestral and SDE samplers with eta = 0 are ODE solvers of their stated order.
    ("euler_ancestral", {"eta": 0.0}, 1, (16, 32, 64), 1.8, 2.2),
    ("dpm_2_ancestral", {"eta": 0.0}, 2, (16, 32, 64), 3.6, 4.8),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2, (16, 32, 64), 3.5, 4.6),
    ("dpmpp_sde", {"eta": 0.0}, 2, (16, 32, 64), 3.5, 4.6),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2, (16, 32, 64), 3.6, 5.2),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2, (16, 32, 64), 3.6, 5.6),
    # k-diffusion's 3M update weights its second difference by half the Taylor coefficient, so
    # it converges at order 2 (errors 2-30x below 2M's here); fastdiff keeps k-diffusion's formula.
    ("dpmpp_3m_sde", {"eta": 0.0}, 2, (64, 128, 256), 2.8, 4.6),
])
def test_deterministic_sampler_order(ode_reference, sampler, options, order, intervals, lo, hi):
    errs = [(_ode_error(sampler, m, **options) - ode_reference).abs().max().item() for m in intervals]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(lo <= r <= hi for r in ratios), f"{sampler}: errors {errs}, ratios {ratios} (order {order})"
    assert errs[-1] < (0.12 if order == 1 else 0.02)


def test_dpmpp_3m_sde_beats_2m(ode_reference):
    for m in (16, 32, 64):
        e3 = (_ode_error("dpmpp_3m_sde", m, eta=0.0) - ode_reference).abs().max().item()
        e2 = (_ode_error("dpmpp_2m", m) - ode_reference).abs().max().item()
        assert e3 < 0.5 * e2, (m, e3, e2)


def test_ddim_eta0_is_euler():
    a = _ode_error("ddim", 12)
    b = _ode_error("euler", 12)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-12)


def test_samplers_agree_across_backends():
    """float32 sampling on the auto backend (C++ on CPU when built) matches the torch backend's run."""
    kw = dict(sampler="heun", steps=33, generator=None, dtype=torch.float32)
    a = sample(_mixture().denoiser, ODE_SHAPE, backend="torch", **{**kw, "generator": torch.Generator().manual_seed(1)})
    b = sample(_mixture().denoiser, ODE_SHAPE, backend="auto", **{**kw, "generator": torch.Generator().manual_seed(1)})
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_rk45_matches_reference(ode_reference):
    out = _ode_error("rk45", 1, rtol=1e-8, atol=1e-8)
    assert (out - ode_reference).abs().max().item() < 1e-5
    loose = _ode_error("rk45", 1)
    assert (loose - ode_reference).abs().max().item() < 1e-2


N_SAMPLES = 4000
Z = 4.5  # tolerance in standard errors of the estimate


@pytest.fixture(scope="module")
def mixture_stats():
    """Exact mean/variance per dimension and the standard deviation of (y - mean)^2 (for the
    variance estimate's standard error), from the closed form and one large exact sample."""
    gmm = _mixture()
    y = gmm.sample(400_000, generator=torch.Generator().manual_seed(7))
    mean = gmm.mean
    var = (gmm.weights[:, None] * (gmm.vars + gmm.means ** 2)).sum(0) - mean ** 2
    sq_std = ((y - mean) ** 2).std(0)
    return gmm, mean, var, sq_std


@pytest.mark.parametrize("sampler,options", [
    ("euler_maruyama", {}),
    ("pc", {"snr": 0.16}),
    ("ddpm", {}),
    ("ddim", {"eta": 0.5}),
    ("heun", {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}),   # EDM's spelling
    ("dpmpp_2m", {}),
    ("euler", {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0}),   # first order: 384 steps
    ("dpm_2", {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0}),
    ("euler_ancestral", {}),
    ("dpm_2_ancestral", {}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_sde", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}),
    ("dpmpp_3m_sde", {}),
    ("lms", {}),
])
def test_sampler_matches_mixture(mixture_stats, sampler, options):
    gmm, mean, var, sq_std = mixture_stats
    n = N_SAMPLES
    two_calls = sampler in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde")
    steps = 384 if sampler == "euler" else 48 if two_calls else 96
    x = sample(gmm.denoiser, (n, 2), sampler=sampler, steps=steps,
               generator=torch.Generator().manual_seed(11), dtype=torch.float32, **options).double()
    std = var.sqrt()
    assert ((x.mean(0) - mean).abs() <= Z * std / math.sqrt(n)).all(), (x.mean(0), mean)
    assert ((x.var(0) - var).abs() <= Z * sq_std / math.sqrt(n)).all(), (x.var(0), var)
    counts = torch.bincount(gmm.posterior(x, 1e-3).argmax(1), minlength=3).double() / n
    w = gmm.weights
    assert ((counts - w).abs() <= Z * (w * (1 - w) / n).sqrt()).all(), (counts, w)


def test_sampler_collapse_would_fail(mixture_stats):
    """The moment test has teeth: denoising the initial noise once (a collapsed 'sampler') fails it."""
    gmm, mean, var, sq_std = mixture_stats
    x = gmm.denoiser(torch.randn(N_SAMPLES, 2, dtype=torch.float64) * 2.0, 2.0)
    assert not ((x.var(0) - var).abs() <= Z * sq_std / math.sqrt(N_SAMPLES)).all()


# ----------------------------------------------------------------------------
# behaviour
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_deterministic_given_generator(sampler):
    gmm = _mixture()
    run = lambda seed: sample(gmm.denoiser, (8, 2), sampler=sampler, steps=6,  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    a, b, c = run(3), run(3), run(4)
    assert a.shape == (8, 2) and a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_denoiser_gets_sigma_rows_and_progress(capsys):
    seen = []

    def denoiser(x, sigma):
        seen.append((sigma.shape, sigma.dtype, sigma.device))
        return x * 0.5

    out = fastdiff.sample(denoiser, (3, 4), steps=4, progress=True, dtype=torch.float64)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    assert len(seen) == 2 * 4 - 1  # Heun: two calls per step, one for the last
    assert all(s == ((3,), torch.float64, torch.device("cpu")) for s in seen)


def test_schedules():
    for schedule in ("edm", "ve", "logsnr", "vp"):
        s = sigma_steps(10, 0.002, 80.0, 7.0, schedule)
        assert len(s) == 11 and s[-1] == 0.0
        assert s[0] == 80.0 and s[-2] == 0.002
        assert all(a > b for a, b in zip(s, s[1:])), schedule
    ve = sigma_steps(10, 0.002, 80.0, schedule="ve")
    logs = [math.log(v) for v in ve[:-1]]
    assert max(abs((logs[i + 1] - logs[i]) - (logs[1] - logs[0])) for i in range(8)) < 1e-12
    edm = sigma_steps(10, 0.002, 80.0, 7.0)
    r = [v ** (1 / 7) for v in edm[:-1]]
    assert max(abs((r[i + 1] - r[i]) - (r[1] - r[0])) for i in range(8)) < 1e-12
    assert sigma_steps(1, 0.002, 80.0) == [80.0, 0.0]
    x = sample(_mixture().denoiser, (4, 2), schedule="vp", steps=5, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(x).all())


def test_bad_arguments():
    gmm = _mixture()
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(gmm.denoiser, (2, 2), steps=0)
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        sample(gmm.denoiser, (2, 2), sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_min must be a positive"):
        sample(gmm.denoiser, (2, 2), sigma_min=0.0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(gmm.denoiser, (2, 2), sampler="k_lms")
    with pytest.raises(ValueError, match="schedule must be one of"):
        sample(gmm.denoiser, (2, 2), schedule="cosine")
    with pytest.raises(ValueError, match="denoiser returned shape"):
        sample(lambda x, s: x[:, :1], (2, 2))
    with pytest.raises(TypeError, match="denoiser must return a tensor"):
        sample(lambda x, s: 0.0, (2, 2))
    with pytest.raises(TypeError, match="denoiser must be callable"):
        sample(None, (2, 2))
    with pytest.raises(TypeError, match="unknown option"):
        sample(gmm.denoiser, (2, 2), sampler="euler", eta=1.0)
    with pytest.raises(TypeError, match="dtype must be"):
        sample(gmm.denoiser, (2, 2), dtype=torch.float16)
    with pytest.raises(ValueError, match="shape must be"):
        sample(gmm.denoiser, (2, 0))
    with pytest.raises(ValueError, match="S_noise must be a finite number >= 0"):
        sample(gmm.denoiser, (2, 2), sampler="euler", S_churn=1.0, S_noise=float("inf"))
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun'"):
        sample(gmm.denoiser, (2, 2), sampler="dpmpp_2m_sde", solver_type="euler")
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        sample(gmm.denoiser, (2, 2), sampler="lms", order=0)
    with pytest.raises(ValueError, match="r must be a number in"):
        sample(gmm.denoiser, (2, 2), sampler="dpmpp_sde", r=0.0)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sample(gmm.denoiser, (2, 2), sampler="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="snr must be a positive"):
        sample(gmm.denoiser, (2, 2), sampler="pc", snr=0.0)
    with pytest.raises(ValueError, match="generator is on"):
        sample(gmm.denoiser, (2, 2), generator=torch.Generator(), device="meta")


def test_wrong_types_name_the_argument():
    gmm = _mixture()
    cases = [
        (dict(generator=5), "generator must be a torch.Generator"),
        (dict(sampler=3), "sampler must be a string"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(sigma_max="80"), "sigma_max must be a number"),
        (dict(noise_sampler=3), "noise_sampler must be callable"),
        (dict(progress="yes"), "progress must be True or False"),
        (dict(device=1.5), "device must be a torch.device"),
        (dict(x=[[0.0, 1.0]]), "x must be a torch.Tensor"),
        (dict(sigmas="80 0"), "sigmas must be a 1-D tensor"),
        (dict(sigmas=[80.0, 0.0], steps=4), "pass sigmas or steps"),
        (dict(S_churn=1.0, S_tmin=0.1, S_min=0.1), "not both"),
    ]
    for kw, match in cases:
        with pytest.raises(TypeError, match=match):
            sample(gmm.denoiser, (2, 2), **kw)
    with pytest.raises(TypeError, match="shape must be a tuple"):
        sample(gmm.denoiser, "2, 2")
    with pytest.raises(TypeError, match="needs shape"):
        sample(gmm.denoiser)
    with pytest.raises(ValueError, match="device: "):
        sample(gmm.denoiser, (2, 2), device="bogus")


def test_sigmas_are_validated():
    gmm = _mixture()
    for sigmas, match in [
        ([[80.0, 0.0]], "1-D"), (torch.zeros(2, 2), "1-D"), ([80.0], "at least one noise level"),
        ([80.0, float("nan"), 0.0], r"finite, got sigmas\[1\]"), ([80.0, 1.0], "end with 0"),
        ([80.0, 1.0, 1.0, 0.0], r"strictly decreasing.*sigmas\[1\] = 1.0"), ([1.0, 2.0, 0.0], "strictly decreasing"),
        ([80.0, -1.0, 0.0], "strictly decreasing"), (np.array([True, False]), "real numbers"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            sample(gmm.denoiser, (2, 2), sigmas=sigmas)


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"rk45"}))
def test_sigmas_and_x_reproduce_the_default_run(sampler):
    """sigmas= (tensor, array or list) and x= (already scaled by sigmas[0]) give the run that steps= and the
    generator give; x is left unmodified."""
    gmm = _mixture()
    grid = sigma_steps(7, 0.01, 40.0, 7.0, "edm")
    a = sample(gmm.denoiser, (8, 2), sampler=sampler, steps=7, sigma_min=0.01, sigma_max=40.0,
               generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, generator=gen, dtype=torch.float64) * grid[0]
    x_copy = x.clone()
    for sigmas in (grid, torch.tensor(grid, dtype=torch.float64), np.array(grid)):
        gen_b = torch.Generator().manual_seed(3)
        torch.randn(8, 2, generator=gen_b, dtype=torch.float64)            # the draw x took
        b = sample(gmm.denoiser, sigmas=sigmas, x=x, sampler=sampler, generator=gen_b)
        assert b.dtype == torch.float64 and torch.equal(a, b), sampler
    assert torch.equal(x, x_copy)


# The draws each sampler makes on a grid of 6 steps (the docstring of fastdiff.sampling.samplers).
DRAWS = {
    "euler": 0, "heun": 0, "dpm_2": 0, "dpmpp_2m": 0, "lms": 0, "ddim": 0,
    "euler_ancestral": 5, "ddpm": 5, "dpm_2_ancestral": 5, "dpmpp_2s_ancestral": 5, "dpmpp_2m_sde": 5,
    "dpmpp_3m_sde": 5, "euler_maruyama": 5, "dpmpp_sde": 10, "pc": 6 * 2 + 5,
}


@pytest.mark.parametrize("sampler", sorted(DRAWS))
def test_noise_sampler_gets_every_draw(sampler):
    """Every draw goes through noise_sampler with the step's (sigma, sigma_next) (0-d float64 tensors), in
    the documented number; the generator is not touched after the initial noise."""
    gmm = _mixture()
    grid = sigma_steps(6, 0.01, 40.0)
    calls = []

    def noise_sampler(sigma, sigma_next):
        assert isinstance(sigma, torch.Tensor) and sigma.dtype == torch.float64 and sigma.dim() == 0
        calls.append((float(sigma), float(sigma_next)))
        return torch.randn(4, 2)

    gen = torch.Generator().manual_seed(0)
    options = {"n_corrector": 2} if sampler == "pc" else {}
    sample(gmm.denoiser, (4, 2), sampler=sampler, sigmas=grid, generator=gen, noise_sampler=noise_sampler, **options)
    assert len(calls) == DRAWS[sampler]
    steps = list(zip(grid, grid[1:]))
    if sampler == "dpmpp_sde":
        assert [c[0] for c in calls] == [s for s, t in steps[:-1] for _ in (0, 1)]
        assert [c[1] for c in calls[1::2]] == [t for s, t in steps[:-1]]
    elif sampler != "pc":
        assert calls == steps[:len(calls)]
    after = gen.get_state()
    fresh = torch.Generator().manual_seed(0)
    torch.randn(4, 2, generator=fresh)
    assert torch.equal(after, fresh.get_state()), "the generator drew more than the initial noise"


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2"])
def test_churn_draws_only_where_it_applies(sampler):
    gmm = _mixture()
    grid = sigma_steps(8, 0.002, 80.0)
    seen = []
    sample(gmm.denoiser, (4, 2), sampler=sampler, sigmas=grid, S_churn=5.0, S_tmin=0.05, S_tmax=10.0,
           noise_sampler=lambda s, t: seen.append(float(s)) or torch.randn(4, 2))
    assert seen == [s for s in grid[:-1] if 0.05 <= s <= 10.0] and 0 < len(seen) < 8


def test_dpm_2_ancestral_keeps_noise_when_sigma_down_is_0():
    """eta > 1 can make sigma_down 0 before sigma_next is: the step denoises, then adds its sigma_up = sigma_next
    noise (k-diffusion drops it), so the state keeps the noise level the next step expects."""
    gmm = _mixture()
    grid = [80.0, 1.0, 0.5, 0.0]
    calls = []
    x = sample(gmm.denoiser, (8, 2), sampler="dpm_2_ancestral", sigmas=grid, eta=50.0,
               noise_sampler=lambda s, t: calls.append(float(t)) or torch.randn(8, 2, dtype=torch.float64),
               generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert calls == [1.0, 0.5]
    assert bool(torch.isfinite(x).all())


def test_noise_sampler_errors():
    gmm = _mixture()
    with pytest.raises(ValueError, match="noise_sampler returned shape"):
        sample(gmm.denoiser, (4, 2), sampler="ddpm", steps=3, noise_sampler=lambda s, t: torch.randn(2, 2))
    with pytest.raises(TypeError, match="noise_sampler must return a floating-point tensor"):
        sample(gmm.denoiser, (4, 2), sampler="ddpm", steps=3, noise_sampler=lambda s, t: 0.0)


def test_x_errors():
    gmm = _mixture()
    with pytest.raises(ValueError, match="does not match x's shape"):
        sample(gmm.denoiser, (3, 2), x=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="dtype is torch.float32 but x is torch.float64"):
        sample(gmm.denoiser, x=torch.zeros(4, 2, dtype=torch.float64), dtype=torch.float32)
    with pytest.raises(ValueError, match="x must be finite"):
        sample(gmm.denoiser, x=torch.full((4, 2), float("nan")))
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        sample(gmm.denoiser, x=torch.zeros(4, 2, dtype=torch.float16))


def test_brownian_increments_extend_nested_intervals():
    """dpmpp_sde's second draw extends its first as a Brownian increment: corr = sqrt(dt1 / dt2)."""
    from fastdiff.sampling.samplers import BrownianIncrements
    gen = torch.Generator().manual_seed(0)
    inc = BrownianIncrements(lambda s, t: torch.randn(200_000, generator=gen, dtype=torch.float64))
    z1, z2 = inc(4.0, 3.0), inc(4.0, 1.0)
    assert abs(torch.corrcoef(torch.stack([z1, z2]))[0, 1].item() - math.sqrt(1 / 3)) < 0.01
    assert abs(z2.var().item() - 1) < 0.01
    z3, z4 = inc(1.0, 0.5), inc(1.0, 0.5)     # an equal interval again is a fresh draw (pc's corrector)
    assert abs(torch.corrcoef(torch.stack([z3, z4]))[0, 1].item()) < 0.01


def test_iddpm_schedule():
    from fastdiff.sampling import iddpm_sigmas
    u = iddpm_sigmas()
    assert len(u) == 1001 and u[-1] == 0.0 and all(a > b for a, b in zip(u, u[1:]))
    # Where C_1 does not clip, the recurrence telescopes: u_j^2 + 1 = alpha_bar(M) / alpha_bar(j).
    ab = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2  # noqa: E731
    for j in (10, 100, 500, 999):
        assert abs(u[j] - math.sqrt(ab(1000) / ab(j) - 1)) <= 1e-3 * u[j]   # float32 ratios near 1
    # EDM's loop as written in its generate.py (float32 alpha_bar, float64 u), bit for bit.
    ref = torch.zeros(1001, dtype=torch.float64)
    alpha_bar = lambda j: (0.5 * np.pi * j / 1000 / (0.008 + 1)).sin() ** 2  # noqa: E731
    for j in torch.arange(1000, 0, -1):
        ref[j - 1] = ((ref[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=0.001) - 1).sqrt()
    assert ref.tolist() == u
    s = sigma_steps(18, 0.002, 81.0, schedule="iddpm")
    inside = [v for v in u if 0.002 <= v <= 81.0]
    assert s[0] == inside[0] and s[-2] == inside[-1] and s[-1] == 0.0 and len(s) == 19
    assert all(v in inside for v in s[:-1]) and all(a > b for a, b in zip(s, s[1:]))
    with pytest.raises(ValueError, match="steps must be <="):
        sigma_steps(len(inside) + 1, 0.002, 81.0, schedule="iddpm")
    x = sample(_mixture().denoiser, (4, 2), schedule="iddpm", steps=10, sigma_max=81.0,
               generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(x).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "ddpm", "pc", "lms", "dpm_2", "dpmpp_sde", "dpmpp_2m_sde",
                                     "dpmpp_3m_sde"])
def test_cuda_sampling_matches_torch_backend(sampler):
    """On the GPU the auto backend (CUDA kernels, else Triton) reproduces the torch backend's run."""
    gmm = _mixture().to(device="cuda")
    run = lambda backend: sample(gmm.denoiser, (64, 2), sampler=sampler, steps=12, dtype=torch.float64,  # noqa: E731
                                 backend=backend, generator=torch.Generator(device="cuda").manual_seed(0))
    a, b = run("torch"), run("auto")
    assert a.device.type == "cuda" and bool(torch.isfinite(a).all())
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------
# python -m fastdiff.sample
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step training run on the shipped digits (in process: no subprocess start-up)."""
    from fastdiff.train import main as train_main
    from test_train import TINY
    out = tmp_path_factory.mktemp("runs")
    assert train_main([*TINY, "--steps", "2", "--out", str(out), "--name", "tiny"]) == 0
    return out / "tiny"


def _sample_cli(*args):
    from fastdiff.sample import main
    return main([str(a) for a in args])


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--steps", "-3"], "--steps must be a positive integer"),
    (["--n", "0"], "--n must be a positive integer"),
    (["--batch", "-1"], "--batch must be a positive integer"),
    (["--threads", "-2"], "--threads must be >= 0"),
    (["--device", "bogus"], "--device must be cpu or cuda"),
    (["--device", "mps"], "--device must be cpu or cuda"),
    (["--out", "{file}"], "is a file"),
    (["--out", "{file}/png"], "is a file, not a directory"),
    (["--out", "{tmp}/x.npz", "--format", "npz", "--grid", "{tmp}/missing/grid.png"], "does not exist"),
    (["--out", "{tmp}/missing/x.npz"], "does not exist"),
    (["--out", "{tmp}/dir", "--format", "npz"], "must name a .npz file"),
    (["--grid", "{tmp}"], "is a directory"),
])
def test_sample_cli_errors_are_one_line(tmp_path, capsys, args, message):
    """Bad values end with one line and exit 2 before any sampling (the checkpoint does not even exist)."""
    (tmp_path / "a-file").write_text("x")
    args = [a.format(tmp=tmp_path, file=tmp_path / "a-file") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert _sample_cli("--ckpt", tmp_path / "no-such-run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastdiff.sample: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_sample_cli_cuda_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    assert _sample_cli("--ckpt", tmp_path, "--out", tmp_path / "o", "--device", "cuda") == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_sample_cli_npz_and_progress(tiny_run, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    assert _sample_cli("--ckpt", tiny_run, "--n", 5, "--batch", 2, "--steps", 2, "--out", out, "--threads", 1,
                       "--sampler", "dpmpp_2m_sde", "--grid", tmp_path / "grid.png") == 0
    err = capsys.readouterr().err
    assert "sampling" in err and "5/5" in err                  # the tqdm bar over samples, with its ETA
    with np.load(out) as f:
        assert list(f.keys()) == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)
    assert (tmp_path / "grid.png").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # The same samples as PNGs (same seed, same batches).
    from PIL import Image
    assert _sample_cli("--ckpt", tiny_run, "--n", 5, "--batch", 2, "--steps", 2, "--out", tmp_path / "png",
                       "--sampler", "dpmpp_2m_sde") == 0
    with Image.open(tmp_path / "png" / "000004.png") as im:
        assert np.array_equal(np.asarray(im), arr[4, :, :, 0])


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_sample_cli_full_disk_is_one_line(tiny_run, tmp_path, capsys, monkeypatch, fmt):
    """A full disk while writing samples ends with one line naming the file (exit 2), no traceback,
    and leaves no partial .npz behind."""
    import errno

    import fastdiff.eval
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "000000.png"))
    monkeypatch.setattr(fastdiff.eval, "write_pngs", full)
    monkeypatch.setattr(np, "savez", full)
    out = tmp_path / ("out" if fmt == "png" else "s.npz")
    assert _sample_cli("--ckpt", tiny_run, "--n", 2, "--steps", 2, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastdiff.sample: error: cannot write") and "No space left" in err, err
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
