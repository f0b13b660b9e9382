"""Diffusion core: processes, parameterizations, weightings, densities (float64 references)."""
import math

import pytest
import torch

from fastdiff.diffusion import (DENSITIES, PREDICTIONS, WEIGHTINGS, Process, convert, convert_weighting,
                                error_scale, get_density, get_parameterization, get_process, get_weighting)
from fastdiff.diffusion.parameterization import from_x0

F64 = torch.float64
PROCESS_NAMES = ["ve", "vp", "vp_cosine", "edm"]


def custom_vp():
    # A VP process given only by sigma(t), alpha(t): inverse by bisection, dlam_dt by autograd.
    return Process(lambda t: torch.sqrt(-torch.expm1(-(10 * t * t + 0.1 * t))),
                   lambda t: torch.exp(-0.5 * (10 * t * t + 0.1 * t)), t_min=1e-4, t_max=1.0)


def all_processes():
    return [get_process(n) for n in PROCESS_NAMES] + [custom_vp()]


# ----------------------------------------------------------------------------- processes

@pytest.mark.parametrize("proc", all_processes(), ids=lambda p: p.name)
def test_process_identities(proc):
    t = torch.linspace(proc.t_min, proc.t_max, 101, dtype=F64)
    lam = proc.lam(t)
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(lam, 2 * torch.log(proc.alpha(t) / proc.sigma(t)), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(proc.sigma_ve(t), proc.sigma(t) / proc.alpha(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(proc.t_of_lambda(lam), t, rtol=1e-9, atol=1e-12)
    l = torch.linspace(proc.lam_min, proc.lam_max, 57, dtype=F64)
    torch.testing.assert_close(proc.lam(proc.t_of_lambda(l)), l, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(proc.t_of_sigma_ve(proc.sigma_ve(t)), t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(proc.alpha_of_sigma_ve(proc.sigma_ve(t)), proc.alpha(t), rtol=1e-9, atol=1e-12)
    # dlam/dt against autograd of lam
    tt = t[1:-1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(proc.lam(tt).sum(), tt)
    torch.testing.assert_close(proc.dlam_dt(t[1:-1]), g, rtol=1e-8, atol=1e-8)
    # VE maps: x_t = alpha y + sigma n  <->  x_ve = y + sigma_ve n
    gen = torch.Generator().manual_seed(0)
    y, n = torch.randn(101, 3, generator=gen, dtype=F64), torch.randn(101, 3, generator=gen, dtype=F64)
    xt = proc.alpha(t)[:, None] * y + proc.sigma(t)[:, None] * n
    torch.testing.assert_close(proc.to_ve(xt, t), y + proc.sigma_ve(t)[:, None] * n)
    torch.testing.assert_close(proc.from_ve(proc.to_ve(xt, t), t), xt)


def test_process_parameters():
    ve = get_process("ve")
    assert ve.sigma_min == pytest.approx(0.02) and ve.sigma_max == pytest.approx(100)
    edm = get_process("edm")
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.002, 80.0, 0.5)
    vp = get_process("vp")
    t = torch.linspace(1e-5, 1, 11, dtype=F64)
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    # EDM Table 1, VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
    torch.testing.assert_close(vp.sigma_ve(t), torch.sqrt(torch.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1))
    cos = get_process("vp_cosine")
    torch.testing.assert_close(cos.alpha(t[1:-1]), torch.cos(0.5 * math.pi * t[1:-1]))
    # custom process reproduces the built-in VP with beta_d = 20, beta_min = 0.1
    c, v = custom_vp(), get_process("vp", beta_d=20.0, beta_min=0.1, t_min=1e-4)
    l = torch.linspace(c.lam_min, c.lam_max, 31, dtype=F64)
    torch.testing.assert_close(c.t_of_lambda(l), v.t_of_lambda(l), rtol=1e-10, atol=1e-12)


def test_process_errors():
    with pytest.raises(ValueError, match="process must be one of"):
        get_process("nope")
    with pytest.raises(ValueError, match="bad parameters for process 've'"):
        get_process("ve", beta=1)
    with pytest.raises(ValueError, match="sigma_min"):
        get_process("ve", sigma_min=10, sigma_max=1)
    with pytest.raises(ValueError, match="sigma out of range"):
        get_process("edm").t_of_sigma_ve(torch.tensor([0.001, 1.0]))
    with pytest.raises(ValueError, match="lam out of range"):
        get_process("ve").t_of_lambda(torch.tensor([30.0]))
    with pytest.raises(ValueError, match="decreases"):
        Process(lambda t: 1 - 0.5 * t, lambda t: torch.ones_like(t))
    with pytest.raises(TypeError, match="callables"):
        Process(None, None)


# ----------------------------------------------------------------------------- parameterizations

def _batch(seed=0, B=64, D=5, sigma_lo=0.002, sigma_hi=80.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, D, generator=g, dtype=F64)
    n = torch.randn(B, D, generator=g, dtype=F64)
    sigma = torch.exp(torch.empty(B, dtype=F64).uniform_(math.log(sigma_lo), math.log(sigma_hi), generator=g))
    return y, n, sigma, y + sigma[:, None] * n, g


def test_prediction_conversions_round_trip():
    y, n, sigma, x, g = _batch()
    truth = {k: from_x0(y, k, x, sigma) for k in PREDICTIONS}
    torch.testing.assert_close(truth["eps"], n)
    torch.testing.assert_close(truth["score"], -n / sigma[:, None])
    a = 1 / torch.sqrt(1 + sigma ** 2)
    torch.testing.assert_close(truth["v"], a[:, None] * n - (sigma * a)[:, None] * y)     # alpha eps - sigma x0 (VP)
    pred = torch.randn_like(y)
    for f in PREDICTIONS:
        for t in PREDICTIONS:
            torch.testing.assert_close(convert(truth[f], f, t, x, sigma), truth[t], rtol=1e-9, atol=1e-9)
            back = convert(convert(pred, f, t, x, sigma), t, f, x, sigma)
            torch.testing.assert_close(back, pred, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="to must be one of"):
        convert(pred, "eps", "noise", x, sigma)


@pytest.mark.parametrize("name", ["eps", "x0", "v", "score", "edm", "vp", "ve", "iddpm"])
def test_precond_target_and_scales(name):
    y, n, sigma, x, _ = _batch(1, sigma_lo=0.01, sigma_hi=50)
    param = get_parameterization(name, process="vp")
    F_star = param.target(y, x, sigma)
    # the net that outputs F* denoises exactly
    seen = {}

    def net(inp, c_noise):
        seen["inp"], seen["c_noise"] = inp, c_noise
        return F_star
    torch.testing.assert_close(param.denoise(net, x, sigma), y, rtol=1e-9, atol=1e-9)
    c_skip, c_out, c_in, c_noise = param.precond(sigma)
    torch.testing.assert_close(seen["inp"], c_in[:, None] * x)
    # ||eps_hat - eps||^2 = (c_out / sigma)^2 ||F - F*||^2
    F = F_star + 0.1 * torch.randn_like(F_star)
    D = c_skip[:, None] * x + c_out[:, None] * F
    eps_err = ((x - D) / sigma[:, None] - n).pow(2).sum(1)
    torch.testing.assert_close(eps_err, param.eps_scale(sigma) * (F - F_star).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    if name in PREDICTIONS:
        torch.testing.assert_close(F_star, from_x0(y, name, x, sigma), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(c_in, get_process("vp").alpha_of_sigma_ve(sigma))
    if name == "vp":
        torch.testing.assert_close(c_noise, 999 * get_process("vp").t_of_sigma_ve(sigma))
    if name == "iddpm":
        assert bool(((c_noise >= 0) & (c_noise <= 999) & (c_noise == c_noise.round())).all())
        order = sigma.argsort()
        assert bool((c_noise[order].diff() >= 0).all())


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 3.0, 80.0])
def test_edm_precond_unit_variance(sigma):
    sd = 0.5
    g = torch.Generator().manual_seed(2)
    y = sd * torch.randn(400000, generator=g, dtype=F64)[:, None]
    x = y + sigma * torch.randn(y.shape, generator=g, dtype=F64)
    p = get_parameterization("edm", sigma_data=sd)
    s = torch.full((y.shape[0],), sigma, dtype=F64)
    _, _, c_in, _ = p.precond(s)
    tol = 5 * math.sqrt(2 / y.shape[0])       # relative std error of a sample variance
    assert (c_in[:, None] * x).var().item() == pytest.approx(1.0, rel=tol)
    assert p.target(y, x, s).var().item() == pytest.approx(1.0, rel=tol)


# ----------------------------------------------------------------------------- weightings

LAM = torch.linspace(-12, 14, 2001, dtype=F64)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_weighting_monotone_flag(name):
    w = get_weighting(name)(LAM)
    assert bool((w > 0).all()) and bool(torch.isfinite(w).all())
    nonincreasing = bool((w.diff() <= 1e-12 * w[:-1].abs()).all())
    assert get_weighting(name).is_monotone == nonincreasing


def test_weighting_formulas():
    sd = 0.5
    w = get_weighting("edm")(LAM)
    sigma = torch.exp(-LAM / 2)
    pdf = torch.exp(-0.5 * ((LAM - 2.4) / 2.4) ** 2) / (2.4 * math.sqrt(2 * math.pi))
    # EDM: lambda(sigma) ||D - y||^2 with log sigma ~ N(-1.2, 1.2^2) == (w / p_lam) ||eps_hat - eps||^2
    lam_edm = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    torch.testing.assert_close(w / pdf, lam_edm * sigma ** 2)
    mono = get_weighting("edm_monotone")
    wm = mono(LAM)
    above = LAM >= mono.lam_star
    torch.testing.assert_close(wm[above], w[above])
    assert float(wm.max()) == pytest.approx(float(w.max()), rel=1e-4)
    torch.testing.assert_close(get_weighting("min_snr", gamma=5.0)(LAM), torch.clamp(5 * torch.exp(-LAM), max=1))
    torch.testing.assert_close(get_weighting("sigmoid", b=-1.0)(LAM), torch.sigmoid(-1.0 - LAM))
    # soft-min-snr on EDM's preconditioned F-loss (k-diffusion): (sigma sd)^2 / (sigma^2 + sd^2)^2
    c_out2 = (sigma * sd) ** 2 / (sigma ** 2 + sd ** 2)
    w_F = (sigma * sd) ** 2 / (sigma ** 2 + sd ** 2) ** 2
    torch.testing.assert_close(get_weighting("soft_min_snr")(LAM), w_F / c_out2 * sigma ** 2)
    # x0_mse is the unweighted x0-loss; the unweighted eps-loss is the SNR-weighted x0-loss
    torch.testing.assert_close(convert_weighting(get_weighting("x0_mse")(LAM), LAM, "eps", "x0"), torch.ones_like(LAM))
    torch.testing.assert_close(convert_weighting(get_weighting("elbo")(LAM), LAM, "eps", "x0"), torch.exp(LAM))


def test_weighting_conversions_exact():
    y, n, sigma, x, g = _batch(3)
    lam = -2 * torch.log(sigma)
    D = y + 0.3 * torch.randn(y.shape, generator=g, dtype=F64) * sigma[:, None].clamp(max=1)
    err = {k: (from_x0(D, k, x, sigma) - from_x0(y, k, x, sigma)).pow(2).sum(1) for k in PREDICTIONS}
    for k in PREDICTIONS:
        torch.testing.assert_close(err[k], error_scale(k, lam) * err["eps"], rtol=1e-9, atol=0)
    w_eps = get_weighting("sigmoid")(lam)
    torch.testing.assert_close(convert_weighting(w_eps, lam, "eps", "x0"), w_eps * torch.exp(lam))
    for f in PREDICTIONS:
        for t in PREDICTIONS:
            w_f = convert_weighting(w_eps, lam, "eps", f)
            w_t = convert_weighting(w_f, lam, f, t)
            torch.testing.assert_close(w_f * err[f], w_t * err[t], rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="from_ must be one of"):
        convert_weighting(w_eps, lam, "F", "x0")


def test_weighting_errors():
    with pytest.raises(ValueError, match="weighting must be one of"):
        get_weighting("elbo2")
    with pytest.raises(ValueError, match="gamma"):
        get_weighting("min_snr", gamma=-1)


# ----------------------------------------------------------------------------- densities

@pytest.mark.parametrize("proc_name", PROCESS_NAMES)
@pytest.mark.parametrize("name", sorted(DENSITIES))
def test_density_normalized_and_matches_samples(name, proc_name):
    dens = get_density(name, proc_name)
    lam = torch.linspace(dens.lam_min, dens.lam_max, 4001, dtype=F64)
    p = dens.log_prob(lam).exp()
    assert torch.trapezoid(p, lam).item() == pytest.approx(1.0, abs=2e-3)
    g = torch.Generator().manual_seed(4)
    s, logp = dens.sample(8000, generator=g, return_log_prob=True)
    assert s.dtype == F64 and bool(((s >= dens.lam_min) & (s <= dens.lam_max)).all())
    torch.testing.assert_close(logp, dens.log_prob(s), rtol=1e-6, atol=1e-6)
    # sample moments against the density's: E[lam] and E[cos(lam)]
    for f in (lambda v: v / 10, lambda v: torch.cos(v)):
        ref = torch.trapezoid(p * f(lam), lam).item()
        est, se = f(s).mean().item(), f(s).std().item() / math.sqrt(s.numel())
        assert abs(est - ref) < 5 * se + 2e-3


def test_density_lognormal_matches_edm():
    dens = get_density("lognormal", get_process("edm", sigma_min=1e-8, sigma_max=1e8))
    lam = torch.linspace(-10, 14, 101, dtype=F64)
    pdf = torch.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) / (2.4 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(dens.log_prob(lam).exp(), pdf, rtol=1e-9, atol=0)


def test_density_cosine_interpolated_matches_simple_diffusion():
    # Hoogeboom et al. 2023: lam(t) = t lam_c(t; d_low) + (1 - t) lam_c(t; d_high) with
    # lam_c(t; n) = -2 log tan(pi t / 2) + 2 log(n / d), t ~ U(0, 1). On a range wide enough
    # that truncation removes ~nothing, P(lam >= lam(t)) = t.
    d, d_low, d_high = 512, 32, 256
    proc = get_process("edm", sigma_min=1e-12, sigma_max=1e12)
    dens = get_density("cosine_interpolated", proc, shift_start=d_high / d, shift_end=d_low / d)

    def lam_paper(t):
        lam_c = lambda n: -2 * math.log(math.tan(math.pi * t / 2)) + 2 * math.log(n / d)   # noqa: E731
        return t * lam_c(d_low) + (1 - t) * lam_c(d_high)

    for t in (0.05, 0.3, 0.5, 0.8, 0.97):
        lam = torch.linspace(lam_paper(t), dens.lam_max, 200001, dtype=F64)
        assert torch.trapezoid(dens.log_prob(lam).exp(), lam).item() == pytest.approx(t, abs=1e-6)


def test_density_errors():
    with pytest.raises(ValueError, match="density must be one of"):
        get_density("gaussian", "edm")
    with pytest.raises(ValueError, match="mix"):
        get_density("adaptive", "edm", mix=0.0)
    with pytest.raises(ValueError, match="bad parameters for density 'lognormal'"):
        get_density("lognormal", "edm", mean=0)


def _synthetic(lam):
    return torch.exp(-0.5 * ((lam - 1.0) / 2.0) ** 2) + 0.05


def test_adaptive_density_converges_to_target():
    proc = get_process("edm")
    dens = get_density("adaptive", proc, bins=16, decay=0.95, mix=0.1)
    g = torch.Generator().manual_seed(5)
    for _ in range(150):
        lam = dens.sample(512, generator=g)
        noise = torch.empty_like(lam).exponential_(generator=g)       # mean-1 multiplicative noise
        dens.update(lam, _synthetic(lam) * noise)
    edges = torch.linspace(dens.lam_min, dens.lam_max, 17, dtype=F64)
    fine = torch.linspace(0, 1, 201, dtype=F64)
    bin_mean = torch.stack([_synthetic(a + (b - a) * fine).mean() for a, b in zip(edges[:-1], edges[1:])])
    target = 0.9 * bin_mean / bin_mean.sum() + 0.1 / 16
    # EMA of ~ 512/16 * 20 samples per bin, exponential noise: relative error ~ 5%
    torch.testing.assert_close(dens.mass(), target, rtol=0.15, atol=0)


def test_adaptive_density_importance_weights_unbiased():
    proc = get_process("ve")
    dens = get_density("adaptive", proc, bins=8, decay=0.9, mix=0.05)
    g = torch.Generator().manual_seed(6)
    for _ in range(30):   # a far-from-uniform state
        lam = dens.sample(256, generator=g)
        dens.update(lam, torch.exp(-0.5 * (lam - 5) ** 2) * 10 + 0.01)
    m = dens.mass()
    assert float(m.max() / m.min()) > 5
    lam_grid = torch.linspace(proc.lam_min, proc.lam_max, 100001, dtype=F64)
    truth = torch.trapezoid(_synthetic(lam_grid), lam_grid).item()        # int L(lam) dlam
    lam, logp = dens.sample(200000, generator=g, return_log_prob=True)
    vals = _synthetic(lam) * torch.exp(-logp)
    est, se = vals.mean().item(), vals.std().item() / math.sqrt(vals.numel())
    assert abs(est - truth) < 4 * se


def test_adaptive_density_state_dict_exact():
    dens = get_density("adaptive", "vp", bins=12)
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        lam = dens.sample(64, generator=g)
        dens.update(lam, lam.abs() + 0.1)
    other = get_density("adaptive", "vp", bins=12)
    other.load_state_dict(dens.state_dict())
    torch.testing.assert_close(other.mass(), dens.mass(), rtol=0, atol=0)
    a = dens.sample(100, generator=torch.Generator().manual_seed(1), return_log_prob=True)
    b = other.sample(100, generator=torch.Generator().manual_seed(1), return_log_prob=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(dens.state_dict()) == {"ema", "ema_weight"}
    # NaN losses are ignored
    before = dens.state_dict()["ema"].clone()
    dens.update(torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([float("nan"), float("inf")], dtype=F64))
    assert torch.equal(dens.state_dict()["ema"], before)
