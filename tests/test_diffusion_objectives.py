"""DSM/STF objectives and the ELBO against closed-form denoisers (float64)."""
import math

import pytest
import torch

import fastdiff
from fastdiff.diffusion import GaussianMixture, elbo_bpd, get_process, make_objective

F64 = torch.float64


def sigma_of_c_noise(param, c_noise):
    if param.name in ("edm", "eps", "x0", "v", "score"):
        return torch.exp(4 * c_noise)
    if param.name == "ve":
        return 2 * torch.exp(c_noise)
    if param.name == "vp":
        return get_process("vp").sigma_ve(c_noise / 999)
    raise ValueError(param.name)


def net_from_denoiser(obj, denoise, perturb=0.0):
    """The raw network F whose preconditioned output is denoise(x_ve, sigma) (+ perturb)."""
    param = obj.param

    def net(inp, c_noise):
        sigma = sigma_of_c_noise(param, c_noise)
        c_skip, c_out, c_in, _ = param.precond(sigma)
        x = inp / c_in[:, None]
        D = denoise(x, sigma) + perturb * torch.tanh(x)
        return (D - c_skip[:, None] * x) / c_out[:, None]
    return net


COMBOS = [
    ("edm", "edm", "edm", "lognormal"),
    ("vp", "eps", "elbo", "uniform"),
    ("vp_cosine", "v", "sigmoid", "cosine"),
    ("ve", "ve", "min_snr", "uniform_lambda"),
    ("vp", "vp", "edm_monotone", "logit_normal"),
    ("edm", "x0", "soft_min_snr", "adaptive"),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_dsm_minimized_by_exact_denoiser(combo):
    process, param, weighting, density = combo
    gmm = GaussianMixture.random(4, (2,), generator=torch.Generator().manual_seed(0), scale=0.6)
    obj = make_objective("dsm", process, param, weighting, density)
    y = gmm.sample(20000, generator=torch.Generator().manual_seed(1))
    losses = {}
    for delta in (-0.1, 0.0, 0.1):
        net = net_from_denoiser(obj, gmm.denoiser, delta)
        loss, stats = obj(net, y, generator=torch.Generator().manual_seed(2))   # same noise and lam
        torch.testing.assert_close(loss.to(F64), stats["per_sample"].mean(), rtol=1e-5, atol=0)
        losses[delta] = loss.item()
    assert losses[0.0] < losses[-0.1] and losses[0.0] < losses[0.1], losses


def test_stf_whole_set_is_empirical_posterior_mean():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(37, 3, generator=g, dtype=F64)
    empirical = GaussianMixture(torch.ones(37, dtype=F64), data, torch.zeros(37, dtype=F64))
    x = data[:5] + 0.7 * torch.randn(5, 3, generator=g, dtype=F64)
    for sigma in (0.01, 0.7, 20.0):
        t = fastdiff.stf_target(x, sigma, data)
        err = (t - empirical.denoiser(x, sigma)).norm(dim=1) / (sigma * math.sqrt(3))
        assert float(err.max()) <= 1e-4
    # through the objective: batch = the whole set, the empirical denoiser has zero STF loss
    for param in ("edm", "eps", "v"):
        obj = make_objective("stf", "edm", param, "edm", "lognormal")
        loss, stats = obj(net_from_denoiser(obj, empirical.denoiser), data, generator=g)
        assert float(stats["per_sample"].max()) < 1e-6 * float(stats["weight"].max()) + 1e-8
        dsm = make_objective("dsm", "edm", param, "edm", "lognormal")
        loss_dsm, _ = dsm(net_from_denoiser(dsm, empirical.denoiser), data, generator=g)
        assert loss_dsm.item() > 1e3 * max(loss.item(), 1e-12)
    # extra_ref joins the reference: splitting the set gives the same target
    obj = make_objective("stf", "edm", "edm", "edm", "lognormal")
    a, _ = obj(net_from_denoiser(obj, empirical.denoiser), data[:10], extra_ref=data[10:],
               generator=torch.Generator().manual_seed(4))
    assert a.item() < 1e-8


def _stf_targets(x, sigma, y, ref):
    """Per draw j: the STF target of x_j with reference [y_j, ref_j] (plain float64)."""
    r = torch.cat([y[:, None], ref], 1)                                 # (M, N, D)
    logits = -(x[:, None] - r).pow(2).sum(-1) / (2 * sigma ** 2)
    return (torch.softmax(logits, 1)[..., None] * r).sum(1)


def test_stf_bias_shrinks_with_reference_size():
    # Theorem 1 of Xu et al. (2023): for a fixed x and a reference batch of N samples of
    # p(y), the STF target is a self-normalized importance-sampling estimate of E[y | x]
    # whose bias decays like 1/N.
    g = torch.Generator().manual_seed(5)
    gmm = GaussianMixture.ring(6, radius=1.0, std=0.15)
    sigma, M = 0.6, 10000
    xs = gmm.sample(3, generator=g, sigma=sigma)
    bias, se = {}, {}
    for N in (2, 8, 32, 128):
        errs, ses = [], []
        for x in xs:
            ref = gmm.sample(M * N, generator=g).reshape(M, N, 2)
            t = _stf_targets(x[None].expand(M, 2), sigma, ref[:, 0], ref[:, 1:])
            errs.append((t.mean(0) - gmm.denoiser(x[None], sigma)[0]).norm().item())
            ses.append(t.std(0).norm().item() / math.sqrt(M))
        bias[N], se[N] = sum(errs) / len(errs), max(ses)
    assert bias[2] > 0.1, bias
    for a, b in ((2, 8), (8, 32), (32, 128)):     # ~4x per step; demand 2x beyond Monte Carlo error
        assert bias[b] < bias[a] / 2 + 3 * se[b], (bias, se)
    # the plain formula agrees with fastdiff.stf_target on one draw
    t_op = fastdiff.stf_target(xs[:1], sigma, ref[0])
    torch.testing.assert_close(t_op, _stf_targets(xs[:1], sigma, ref[:1, 0], ref[:1, 1:]), atol=1e-5, rtol=0)


def test_stf_target_unbiased_given_its_source():
    # In training the source y of x is always in the reference (y ~ p(y | x), the rest ~ p(y)).
    # Given the set, the source is row k with probability softmax_k: E[t | x] = E[y | x] for
    # every N, so the STF loss is minimized by the exact denoiser, like DSM.
    g = torch.Generator().manual_seed(12)
    gmm = GaussianMixture.ring(6, radius=1.0, std=0.15)
    sigma, M = 0.6, 10000
    gain = gmm.vars / (gmm.vars + sigma ** 2)
    for x in gmm.sample(2, generator=g, sigma=sigma):
        x = x[None]
        for N in (2, 16):
            k = torch.multinomial(gmm.posterior(x, sigma)[0], M, replacement=True, generator=g)
            y = gmm.means[k] + gain[k] * (x - gmm.means[k]) + (gain[k] * sigma ** 2).sqrt() * torch.randn(
                M, 2, generator=g, dtype=F64)
            ref = gmm.sample(M * (N - 1), generator=g).reshape(M, N - 1, 2)
            t = _stf_targets(x.expand(M, 2), sigma, y, ref)
            err = (t.mean(0) - gmm.denoiser(x, sigma)[0]).abs()
            assert bool((err < 5 * t.std(0) / math.sqrt(M)).all()), (N, err)


def test_edm_objective_equals_edm_loss():
    # EDM: E_{sigma ~ LN} lambda(sigma) mean (D - y)^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2.
    g = torch.Generator().manual_seed(6)
    obj = make_objective("dsm", "edm", "edm", "edm", "lognormal",
                         process_kwargs={"sigma_min": 1e-6, "sigma_max": 1e6})   # practically untruncated
    y = 0.5 * torch.randn(16, 3, 4, 4, generator=g, dtype=F64)

    def net(x, c_noise):
        return 0.3 * torch.tanh(x) + c_noise[:, None, None, None]
    loss, stats = obj(net, y, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    lam = obj.density.sample(16, generator=gen)
    sigma = torch.exp(-lam / 2)[:, None, None, None]
    n = torch.randn(y.shape, generator=gen, dtype=F64)
    D = obj.denoiser(net)(y + sigma * n, sigma.flatten())
    lam_edm = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    ref = (lam_edm * (D - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(stats["per_sample"], ref, rtol=1e-7, atol=0)
    assert set(stats) >= {"per_sample", "lam", "sigma", "weight"}
    assert all(v.shape == (16,) and not v.requires_grad for v in stats.values())


def test_learned_weighting_trains_logvar():
    g = torch.Generator().manual_seed(8)
    obj = make_objective("stf", "edm", "edm", "learned", "lognormal")
    assert len(list(obj.parameters())) == 2
    net = torch.nn.Linear(4, 4).double()
    f = lambda x, c: net(x)                                             # noqa: E731
    y = torch.randn(32, 4, generator=g, dtype=F64)
    loss, stats = obj(f, y, generator=torch.Generator().manual_seed(9))
    base = make_objective("stf", "edm", "edm", "edm", "lognormal")
    loss0, _ = base(f, y, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(loss, loss0)                            # u = 0 at init
    loss.backward()
    w = obj.weighting.linear
    assert w.bias.grad is not None and net.weight.grad is not None
    # d loss / d bias = mean(1 - base_i) (d/du of base e^-u + u at u = 0)
    torch.testing.assert_close(w.bias.grad.to(F64)[0], (1 - stats["per_sample"]).mean(), rtol=1e-5, atol=1e-6)


def test_objective_density_update_and_state_dict():
    obj = make_objective("dsm", "vp", "eps", "sigmoid", "adaptive", density_kwargs={"bins": 8})
    y = torch.randn(64, 2, dtype=F64)
    f = lambda x, c: torch.zeros_like(x)                                # noqa: E731
    for i in range(3):
        _, stats = obj(f, y, generator=torch.Generator().manual_seed(i))
        obj.update_density(stats)
    sd = obj.state_dict()
    assert "density.ema" in sd and float(sd["density.ema_weight"].max()) > 0
    other = make_objective("dsm", "vp", "eps", "sigmoid", "adaptive", density_kwargs={"bins": 8})
    other.load_state_dict(sd)
    a, sa = obj(f, y, generator=torch.Generator().manual_seed(11))
    b, sb = other(f, y, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b) and torch.equal(sa["lam"], sb["lam"])
    sums, counts = obj.loss_per_bin(sa, bins=4)
    assert counts.sum().item() == 64 and sums.sum().item() == pytest.approx(sa["per_sample"].sum().item())


def test_denoiser_wrapper():
    obj = make_objective("stf", "vp", "v", "elbo", "uniform")
    gmm = GaussianMixture.ring(4)
    net = net_from_denoiser(obj, gmm.denoiser)
    D = obj.denoiser(net)
    x = gmm.sample(5, sigma=1.0)
    torch.testing.assert_close(D(x, 1.0), gmm.denoiser(x, 1.0))
    s = torch.tensor([0.1, 0.5, 1.0, 2.0, 9.0], dtype=F64)
    torch.testing.assert_close(D(x, s), gmm.denoiser(x, s))


def test_objective_errors():
    with pytest.raises(ValueError, match="objective must be one of"):
        make_objective("sm")
    with pytest.raises(ValueError, match="unknown option"):
        make_objective("stf", precision="tf32")
    with pytest.raises(ValueError, match="param must be one of"):
        make_objective("stf", param="f")
    obj = make_objective("stf")
    f = lambda x, c: x                                                  # noqa: E731
    with pytest.raises(ValueError, match="extra_ref must have shape"):
        obj(f, torch.randn(4, 3), extra_ref=torch.randn(4, 2))
    with pytest.raises(ValueError, match="net output"):
        obj(lambda x, c: x[:, :1], torch.randn(4, 3))
    with pytest.raises(ValueError, match="y must be"):
        obj(f, torch.randn(4))
    with pytest.raises(ValueError, match="only used by the 'stf'"):
        make_objective("dsm")(f, torch.randn(4, 3), extra_ref=torch.randn(2, 3))


# ----------------------------------------------------------------------------- likelihood

def test_elbo_gaussian_matches_nll():
    g = torch.Generator().manual_seed(10)
    mu = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=F64)
    s = 0.5
    y = mu + s * torch.randn(64, 4, generator=g, dtype=F64)

    def exact(x, sigma):
        return mu + (s * s / (s * s + sigma[:, None] ** 2)) * (x - mu)
    r = elbo_bpd(exact, y, sigma_min=1e-4, sigma_max=1e3, n_lambda=256, discrete=False, generator=g)
    nll = (0.5 * ((y - mu) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)).sum(1)
    d = r["nll"] - nll
    se = d.std().item() / math.sqrt(d.numel())          # rows are independent
    assert abs(d.mean().item()) < 4 * se + 1e-3, (d.mean().item(), se)
    # the reported per-row standard error is of the right size
    assert 0.5 < (d / r["diffusion_se"]).std().item() < 2.0
    torch.testing.assert_close(r["bpd"], r["nll"] / (4 * math.log(2)))
    # a worse denoiser has a larger bound
    r2 = elbo_bpd(lambda x, sig: exact(x, sig) + 0.05, y, sigma_min=1e-4, sigma_max=1e3, n_lambda=256,
                  discrete=False, generator=torch.Generator().manual_seed(10))
    assert r2["nll"].mean() > r["nll"].mean()


def test_elbo_discrete_8bit():
    g = torch.Generator().manual_seed(11)
    k = torch.randint(0, 256, (8, 3, 2, 2), generator=g)
    y = (k.to(F64) / 127.5 - 1)
    gmm = GaussianMixture(torch.ones(8, dtype=F64), y, torch.zeros(8, dtype=F64))   # the data set itself
    r = elbo_bpd(gmm.denoiser, y, n_lambda=32, generator=g)
    # the empirical distribution of 8 points: -log p(y) = log 8 nats for the whole image, so the
    # bound is close to log(8) / (D log 2) bits/dim plus the small prior/recon terms
    D = 12
    assert float(r["bpd"].mean()) == pytest.approx(math.log(8) / (D * math.log(2)), abs=0.3)
    assert bool((r["recon"] >= 0).all()) and bool((r["prior"] >= 0).all())
    with pytest.raises(ValueError, match="8-bit"):
        elbo_bpd(gmm.denoiser, y + 0.001)
    with pytest.raises(ValueError, match="sigma_min"):
        elbo_bpd(gmm.denoiser, y, sigma_min=1.0, sigma_max=0.5)
