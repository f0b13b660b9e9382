"""fastdiff.eval.variance: V_DSM, V_STF, D against closed forms and the paper's far-field law."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.eval import variance as V


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _two_point_v_dsm(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    """Closed form: with data {a, b}, P(b | x) = sigmoid(u d / sigma^2) for u the coordinate of x
    along (b - a)/d from the midpoint; tr Cov[y | x] = p (1 - p) d^2, and u ~ 1/2 N(+-d/2, sigma^2).
    Returned in eps units (divided by sigma^2 D); the expectation over u by a dense trapezoid rule."""
    d = float(np.linalg.norm(b - a))
    u = np.linspace(-d / 2 - 12 * sigma, d / 2 + 12 * sigma, 400_001)
    dens = 0.5 * (np.exp(-0.5 * ((u - d / 2) / sigma) ** 2) + np.exp(-0.5 * ((u + d / 2) / sigma) ** 2)) \
        / (sigma * math.sqrt(2 * math.pi))
    p = 0.5 * (1 + np.tanh(0.5 * u * d / sigma ** 2))
    return float(np.trapezoid(dens * p * (1 - p), u)) * d * d / (sigma ** 2 * a.size)


@pytest.mark.parametrize("sigma", [0.2, 0.6, 2.0])
def test_v_dsm_two_points_closed_form(sigma):
    g = torch.Generator().manual_seed(3)
    data = torch.randn(2, 5, generator=g)
    data[1] = data[0] + 1.3 * torch.nn.functional.normalize(data[1] - data[0], dim=0)   # |b - a| = 1.3
    res = V.compute(data, [sigma], [1], samples=20000, seed=1)
    exact = _two_point_v_dsm(data[0].double().numpy(), data[1].double().numpy(), sigma)
    assert res["V_DSM_se"][0] > 0
    assert abs(res["V_DSM"][0] - exact) <= 4 * res["V_DSM_se"][0] + 1e-9, (res["V_DSM"][0], exact)
    # D: KL(posterior || uniform over 2 points) is between 0 and log 2
    assert 0 < res["D"][0] < math.log(2)


def test_posterior_stats_against_float64():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(37, 7, generator=g) * 0.7 + 0.3        # ragged sizes, offset data
    x = data[torch.randint(37, (23,), generator=g)] + 0.4 * torch.randn(23, 7, generator=g)
    var, kl, draw = V.posterior_stats(x, 0.4, data, generator=g)
    d2 = ((x.double()[:, None] - data.double()[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * 0.4 ** 2), 1)
    m = w @ data.double()
    var64 = (w * ((data.double()[None] - m[:, None]) ** 2).sum(-1)).sum(1)
    kl64 = math.log(37) + (w * w.log()).sum(1)
    torch.testing.assert_close(var, var64, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(kl, kl64, rtol=1e-5, atol=1e-6)
    assert draw.min() >= 0 and draw.max() < 37


def test_resampled_source_follows_posterior():
    # One x, a three-point data set: the empirical frequency of the drawn sources matches the posterior.
    data = torch.tensor([[0.0], [1.0], [3.0]])
    x = torch.full((6000, 1), 0.8)
    _, _, draw = V.posterior_stats(x, 0.7, data, generator=torch.Generator().manual_seed(0))
    w = torch.softmax(-((0.8 - data[:, 0].double()) ** 2) / (2 * 0.49), 0)
    freq = torch.bincount(draw, minlength=3).double() / 6000
    assert torch.all((freq - w).abs() <= 4 * (w * (1 - w) / 6000).sqrt() + 1e-3), (freq, w)


def test_pair_estimator_at_n1_is_v_dsm():
    # The two-draw estimator with the source alone as reference estimates V_DSM without bias.
    data, _ = V.two_gaussians(size=256, seed=2)
    g = torch.Generator().manual_seed(1)
    sigma = 2.0
    idx = torch.randint(256, (4000,), generator=g)
    x = data[idx] + sigma * torch.randn(4000, 64, generator=g)
    var, _, src2 = V.posterior_stats(x, sigma, data, generator=g)
    est = V.stf_pair_variance(x, sigma, data, idx, src2, 1, generator=g)
    se = float(est.std() / math.sqrt(est.numel()))
    assert abs(float(est.mean()) - float(var.mean())) <= 4 * se


def test_far_field_ratio_two_gaussians():
    data, params = V.two_gaussians()
    assert params["dim"] == 64 and data.shape == (params["size"], 64)
    ns = [1, 2, 16, 128]
    res = V.compute(data, [80.0], ns, samples=8192, seed=0)
    assert res["V_STF"]["1"] == res["V_DSM"]
    for n in (2, 16, 128):
        ratio = res["V_STF"][str(n)][0] / res["V_DSM"][0]
        assert 0.85 / n <= ratio <= 1.15 / (n - 1), (n, ratio)


def test_v_dsm_peaks_inside_grid_and_stf_falls_with_n():
    data, _ = V.two_gaussians(size=1024)
    sigmas = V.parse_sigmas("0.002:80:9", "edm")
    res = V.compute(data, sigmas, [1, 4, 32, "all"], samples=512, seed=0)
    assert res["phases"]["peak_inside_grid"]
    peak = res["sigma"].index(res["phases"]["peak_sigma"])
    assert res["V_DSM"][0] < res["V_DSM"][peak] > res["V_DSM"][-1]
    assert res["V_STF"]["all"] == [0.0] * len(sigmas)
    # at and beyond the peak, V_STF falls with n
    for i in range(peak, len(sigmas)):
        assert res["V_STF"]["1"][i] > res["V_STF"]["4"][i] > res["V_STF"]["32"][i] > 0
    # D falls from ~log N (near field) to ~0 (far field)
    assert res["D"][0] > 0.9 * math.log(1024) and res["D"][-1] < 0.05


def test_score_units():
    data, _ = V.two_gaussians(size=128)
    a = V.compute(data, [0.5, 2.0], [1], samples=64, seed=0, units="eps")
    b = V.compute(data, [0.5, 2.0], [1], samples=64, seed=0, units="score")
    for s, ve, vs in zip(a["sigma"], a["V_DSM"], b["V_DSM"]):
        assert vs == pytest.approx(ve * 64 / s ** 2, rel=1e-12)


def test_parse_arguments():
    assert V.parse_ns("1, 2,16,all,2") == [1, 2, 16, "all"]
    assert V.parse_sigmas("0.1,1", "edm") == [0.1, 1.0]
    s = V.parse_sigmas("0.01:10:4", "edm")
    assert len(s) == 4 and s[0] == pytest.approx(0.01) and s[-1] == pytest.approx(10)
    assert V.parse_sigmas(None, "edm")[0] == pytest.approx(0.002)
    for bad, match in (("0", "n >= 1"), ("-3", "n >= 1"), ("x", "positive integers"), (",", "empty")):
        with pytest.raises(V.UsageError, match=match):
            V.parse_ns(bad)
    for bad in ("", ",", "1:10:0"):
        with pytest.raises(V.UsageError, match="empty sigma grid"):
            V.parse_sigmas(bad, "edm")
    with pytest.raises(V.UsageError, match="positive"):
        V.parse_sigmas("0.1,-1", "edm")


def _main(capsys, *args) -> tuple[int, str]:
    try:
        code = V.main(list(args))
    except SystemExit as e:            # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--data", "no-such-data"], "no-such-data"),
    (["--n", "0"], "--n"),
    (["--n", "2,x"], "--n"),
    (["--sigmas", ","], "empty sigma grid"),
    (["--sigmas", "1:10:0"], "empty sigma grid"),
    (["--process", "bogus"], "--process"),
    (["--units", "bogus"], "--units"),
    (["--samples", "1"], "--samples"),
])
def test_cli_bad_arguments(tmp_path, capsys, args, match):
    code, err = _main(capsys, "--out", str(tmp_path), "--no-plot", *args)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("fastdiff.eval.variance: error:") and match in lines[0], err


def test_cli_subprocess_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastdiff.eval.variance", "--out", str(tmp_path), "--data", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "nope" in r.stderr


def test_cli_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, err = _main(capsys, "--data", "gmm", "--n", "1,2,all", "--sigmas", "0.01:20:5", "--samples", "64",
                      "--out", str(tmp_path))
    assert code == 0, err
    res = json.loads((tmp_path / "variance.json").read_text())
    for key in ("sigma", "V_DSM", "V_STF", "D", "settings", "phases"):
        assert key in res
    assert set(res["V_STF"]) == {"1", "2", "all"} and len(res["V_STF"]["2"]) == 5
    assert res["settings"]["units"] == "eps" and res["settings"]["N"] == 8192
    assert (tmp_path / "variance.png").stat().st_size > 10_000


def test_near_field_only_grid(tmp_path, capsys):
    # every sigma far below the nearest-neighbour distance: V_DSM is 0 everywhere, no phase to mark
    code, err = _main(capsys, "--data", "two-gaussians", "--n", "1,2", "--sigmas", "0.002,0.004", "--samples", "16",
                      "--out", str(tmp_path), *([] if _has_mpl() else ["--no-plot"]))
    assert code == 0, err
    res = json.loads((tmp_path / "variance.json").read_text())
    assert res["V_DSM"] == [0.0, 0.0] and res["phases"]["intermediate"] is None


def _has_mpl():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False
