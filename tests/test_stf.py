"""The STF target against a float64 direct-difference oracle, on every CPU backend.

The accuracy contract (shared/DESIGN.md): err_i = ||t_i - t64_i|| / (sigma_i sqrt(D))
<= 1e-4 on every row, t64 from `oracle` below on the same (upcast) inputs.

Sections: the oracle and helpers; accuracy (sigma sweep, adversarial data,
sizes, chunking, dtypes, poisoned outputs); the GEMM error bound the exact
backends rely on; torch.library / torch.compile integration; argument errors;
autograd.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff.ops import _dispatch, stf

CONTRACT = 1e-4
BACKENDS = ["torch", "cpu"]
SIGMAS = [0.002, 0.02, 0.5, 5.0, 80.0]

# Per output dtype: the contract holds for the float32/float64 result; a
# low-precision result may add its own rounding, so a row passes when
#   ||t_i - t64_i|| <= CONTRACT * sigma_i sqrt(D) + ROUNDING[dtype] * ||round(t64_i) - t64_i||.
ROUNDING = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0, torch.float16: 2.0}


# ----------------------------------------------------------------------------
# oracle and helpers
# ----------------------------------------------------------------------------

def oracle(x: torch.Tensor, sigma, ref: torch.Tensor, labels=None, ref_labels=None,
           ref_logw=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t64, lse64): the STF target by direct differences, all in float64.

    x (B, D), ref (N, D), sigma a float or (B,). Rows of x in pieces so that
    the B x N x D difference tensor stays small. labels / ref_labels /
    ref_logw as for stf_target: + ref_logw_k, -inf across labels.
    """
    x64, r64 = x.detach().double().reshape(x.shape[0], -1), ref.detach().double().reshape(ref.shape[0], -1)
    s64 = torch.as_tensor(sigma, dtype=torch.float64).expand(x64.shape[0])
    step = max(1, (1 << 22) // max(1, r64.numel()))
    ts, lses = [], []
    for i0 in range(0, x64.shape[0], step):
        d2 = ((x64[i0:i0 + step, None, :] - r64[None]) ** 2).sum(-1)
        logits = -d2 / (2 * s64[i0:i0 + step, None] ** 2)
        if ref_logw is not None:
            logits = logits + ref_logw.double()[None, :]
        if labels is not None:
            logits = logits.masked_fill(labels[i0:i0 + step, None] != ref_labels[None, :], -math.inf)
        ts.append(torch.softmax(logits, 1) @ r64)
        lses.append(torch.logsumexp(logits, 1))
    return torch.cat(ts), torch.cat(lses)


def row_err(t: torch.Tensor, t64: torch.Tensor, sigma) -> torch.Tensor:
    """err_i = ||t_i - t64_i|| / (sigma_i sqrt(D)), float64 (B,)."""
    B = t64.shape[0]
    D = t64[0].numel()
    s64 = torch.as_tensor(sigma, dtype=torch.float64).expand(B)
    return (t.double().reshape(B, -1) - t64).norm(dim=1) / (s64 * math.sqrt(D))


def assert_contract(t: torch.Tensor, x: torch.Tensor, sigma, ref: torch.Tensor, **terms) -> None:
    t64, _ = oracle(x, sigma, ref, **terms)
    B, D = t64.shape
    s64 = torch.as_tensor(sigma, dtype=torch.float64).expand(B)
    rounding = (t64.to(t.dtype).double() - t64).norm(dim=1)
    allowed = CONTRACT * s64 * math.sqrt(D) + ROUNDING[t.dtype] * rounding
    got = (t.double().reshape(B, D) - t64).norm(dim=1)
    bad = (got > allowed).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} rows break the contract, e.g. row {bad[0].item()}: err "
                              f"{row_err(t, t64, sigma)[bad[0]].item():.3g} (sigma {s64[bad[0]].item():.3g})")


def assert_lse(lse: torch.Tensor, x, sigma, ref, **terms) -> None:
    _, lse64 = oracle(x, sigma, ref, **terms)
    assert lse.dtype == torch.float64 and lse.shape == lse64.shape
    # The unflagged entries' GEMM error (what the flags bound, relative to sigma sqrt(D)) and
    # the float64 sums: well inside float32's own rounding (~6e-8 relative), the old output's.
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-6, atol=1e-5)


def need(backend: str) -> None:
    status = _dispatch.backend_status(backend, "cpu", "stf_target")
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    need(request.param)
    return request.param


def run(backend, x, sigma, ref, **terms):
    return fastdiff.stf_target(x, sigma, ref, backend=backend, return_lse=True, **terms)


def near_duplicate_case(B: int, N: int, D: int, sigma, *, dtype=torch.float32):
    """ref with near-duplicate pairs at distance ~sigma, x = ref[:B] + sigma * noise.

    Rows B..2B-1 of ref (where N allows) are copies of rows 0..B-1 moved by
    ~sigma: x_i is then near-equidistant from two rows, the case where the fp32
    expansion's error, amplified by 1/sigma^2, decides the weights.
    """
    s = torch.as_tensor(sigma, dtype=torch.float32).expand(B).clone()
    ref = torch.rand(N, D) * 2 - 1
    n_dup = min(B, N - B) if N > B else 0
    if n_dup > 0:
        step = torch.randn(n_dup, D)
        step = step / step.norm(dim=1, keepdim=True) * s[:n_dup, None]
        ref[B:B + n_dup] = ref[:n_dup] + step
    src = ref[torch.arange(B) % N]
    x = src + s[:, None] * torch.randn(B, D)
    return x.to(dtype), s, ref.to(dtype)


# ----------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", SIGMAS)
def test_sigma_sweep_near_duplicates(backend, sigma):
    x, s, ref = near_duplicate_case(16, 80, 256, sigma)
    t, lse = run(backend, x, s, ref)
    assert t.shape == x.shape and t.dtype == x.dtype
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


def test_mixed_sigmas(backend):
    B = 24
    sig = torch.logspace(math.log10(0.002), math.log10(80.0), B)[torch.randperm(B)]
    x, s, ref = near_duplicate_case(B, 100, 123, sig)
    t, lse = run(backend, x, s, ref)
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


@pytest.mark.parametrize("sigma", [0.002, 0.5])
def test_x_equal_to_reference_rows_and_duplicates(backend, sigma):
    ref = torch.rand(40, 64) * 2 - 1
    ref[10] = ref[3]                      # duplicated reference rows
    ref[11] = ref[3]
    x = torch.stack([ref[3], ref[3], ref[7], ref[0] + sigma * torch.randn(64)])  # duplicated rows of x
    t, lse = run(backend, x, sigma, ref)
    assert_contract(t, x, sigma, ref)
    assert_lse(lse, x, sigma, ref)
    if sigma == 0.002:
        torch.testing.assert_close(t[0], ref[3], rtol=0, atol=1e-6)
        assert torch.equal(t[0], t[1])
        # three identical rows at distance 0: lse = log 3
        assert abs(lse[0].item() - math.log(3.0)) < 1e-5


@pytest.mark.parametrize("B,N,D", [(1, 1, 1), (1, 5, 3), (3, 1, 10), (5, 17, 1), (7, 123, 47), (2, 31, 300)])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
def test_ragged_sizes(backend, B, N, D, sigma):
    x, s, ref = near_duplicate_case(B, N, D, sigma)
    t, lse = run(backend, x, s, ref)
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


def test_no_features(backend):
    """x of shape (B, 0, ...): every logit is 0, t is empty and lse = log N (the torch
    backend divided by D; the CUDA kernels' grids would have a zero dimension)."""
    x, ref = torch.rand(3, 0, 4), torch.rand(5, 0, 4)
    t, lse = run(backend, x, 0.5, ref)
    assert t.shape == x.shape
    torch.testing.assert_close(lse, torch.full((3,), math.log(5.0), dtype=torch.float64))


def test_image_shaped_input(backend):
    ref = torch.rand(9, 3, 4, 5) * 2 - 1
    x = ref[:2] + 0.1 * torch.randn(2, 3, 4, 5)
    t = fastdiff.stf_target(x, torch.tensor([0.1, 0.3]).view(2, 1, 1, 1), ref, backend=backend)
    assert t.shape == x.shape
    assert_contract(t.reshape(2, -1), x.reshape(2, -1), torch.tensor([0.1, 0.3]), ref.reshape(9, -1))


def test_many_chunks(backend, monkeypatch):
    """N far beyond the chunk: the online log-sum-exp across chunks, and the
    running lower bound on the max, are exercised with the nearest rows late."""
    B, N, D = 6, 200, 33
    sig = torch.tensor([0.002, 0.002, 0.02, 0.5, 5.0, 80.0])
    x, s, ref = near_duplicate_case(B, N, D, sig)
    ref = ref.flip(0).contiguous()        # sources and their near-duplicates in the last chunks
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * B * 16)  # 16 rows per chunk
    assert stf.chunk_rows(B, N, D, torch.float32) == 16
    t, lse = run(backend, x, s, ref)
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


def test_sparse_and_dense_rows_mixed_across_tiles_and_chunks(backend, monkeypatch):
    """Rows of one-hot, spread and uniform weights side by side (the cpu backend tiles the
    weighted sum's rows by their nonzero count and skips the references no row of a tile
    weighs), D neither a multiple of 16 nor of 256, several chunks."""
    B, N, D = 32, 257, 1000
    sig = torch.tensor([0.002, 0.02, 0.3, 1.0, 3.0, 80.0, 0.005, 0.01] * 4)
    x, s, ref = near_duplicate_case(B, N, D, sig)
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * B * 64)  # 64 rows per chunk
    t, lse = run(backend, x, s, ref)
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


_BASELINE_PROBE = """
import sys, torch, fastdiff
g = torch.Generator().manual_seed(0)
ref = torch.tanh(torch.randn(300, 1000, generator=g))
x = ref[:32] + 10.0 * torch.randn(32, 1000, generator=g)
s = torch.full((32,), 10.0)
t, lse = fastdiff.stf_target(x, s, ref, backend="cpu", return_lse=True)
torch.save((t, lse), sys.argv[1])
"""


def test_cpu_backend_baseline_paths(tmp_path):
    """The cpu backend's AVX2 kernels (float64 logits, sparse and dense weighted sums) have
    baseline fallbacks for CPUs without AVX2/FMA; FASTDIFF_CPU_NO_AVX2=1 takes them here. The
    op's cpu cases run so in a subprocess, and the switch is shown to take effect: at sigma 10
    every row is dense and every weight nonzero, and the float64 logits then come from MKL's
    dgemm and the weighted sum from its sgemm, which sum in other orders (the output shows it
    in its last bits; lse, float64 sums of exact products, may or may not)."""
    need("cpu")
    env = dict(os.environ, FASTDIFF_CPU_NO_AVX2="1", OMP_NUM_THREADS="1")
    tests = os.path.abspath(__file__)
    run_ = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests, "-k",
                           "cpu and (ragged or dense_rows or moderate_sigma or many_chunks or sparse_and_dense or "
                           "dtypes or sweep)"], env=env, capture_output=True, text=True, timeout=900)
    assert run_.returncode == 0, run_.stdout[-3000:] + run_.stderr[-3000:]
    outs = []
    for name, no_avx2 in (("base", "1"), ("avx2", "0")):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _BASELINE_PROBE, str(path)], check=True, timeout=300,
                       env=dict(os.environ, FASTDIFF_CPU_NO_AVX2=no_avx2, OMP_NUM_THREADS="1"))
        outs.append(torch.load(path))
    (t0, lse0), (t1, lse1) = outs
    assert not (torch.equal(t0, t1) and torch.equal(lse0, lse1))   # the two paths' rounding shows
    torch.testing.assert_close(lse0, lse1, rtol=1e-12, atol=0)
    torch.testing.assert_close(t0, t1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("x_dtype,ref_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float64, torch.float64), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
def test_dtypes(backend, x_dtype, ref_dtype, sigma, monkeypatch):
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 8 * 16 + 4 * 96 * 16)  # several chunks, whatever the dtype
    x, s, ref = near_duplicate_case(8, 50, 96, sigma)
    x, ref = x.to(x_dtype), ref.to(ref_dtype)
    t, lse = run(backend, x, s, ref)
    assert t.dtype == x_dtype
    assert_contract(t, x, s, ref)          # oracle on the same, upcast, low-precision inputs
    assert_lse(lse, x, s, ref)


@pytest.mark.parametrize("sigma", [0.002, 5.0])
def test_poisoned_outputs(backend, sigma):
    """The backend writes every element of its outputs (called directly, NaN-filled)."""
    x, s, ref = near_duplicate_case(7, 123, 47, sigma)
    _, impl = _dispatch.resolve("stf_target", backend, "cpu")
    t = torch.full_like(x, float("nan"))
    lse = torch.full((7,), float("nan"), dtype=torch.float64)
    impl(x, s, ref, "highest", t, lse)
    assert torch.isfinite(t).all() and torch.isfinite(lse).all()
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


def test_backends_agree_with_weights(backend):
    x, s, ref = near_duplicate_case(5, 30, 20, 0.3)
    w = fastdiff.stf_weights(x, s, ref)
    t = fastdiff.stf_target(x, s, ref, backend=backend)
    torch.testing.assert_close(t, (w.double() @ ref.double()).float(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------
# why the exact path is needed, and the bound it relies on
# ----------------------------------------------------------------------------

def plain_fp32(x, sigma, ref):
    """The textbook formula in fp32: expansion logits, softmax, matmul."""
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ ref.T) + (ref * ref).sum(1)[None, :]
    return torch.softmax(-d2 / (2 * sigma[:, None] ** 2), dim=1) @ ref


def test_plain_fp32_expansion_breaks_the_contract():
    """The contract is tight enough to catch a kernel that is not exact."""
    x, s, ref = near_duplicate_case(16, 80, 256, 0.002)
    t64, _ = oracle(x, s, ref)
    err = row_err(plain_fp32(x, s, ref), t64, s)
    assert err.max() > 30 * CONTRACT, err.max()


@pytest.mark.parametrize("kind", ["randn", "positive", "offset"])
@pytest.mark.parametrize("D", [1, 7, 48, 300, 3072, 12288])
def test_gemm_error_bound(kind, D):
    """|a~ - a| <= gemm_gamma(D) (||r||^2 + 2 ||x|| ||r||) for a = 2 x.r - ||r||^2 in fp32,
    computed as the backends compute it (fp32 GEMM, fp64 norms rounded to fp32)."""
    B, N = 16, 64
    gen = {"randn": torch.randn, "positive": torch.rand,
           "offset": lambda *sh: 3.0 + 0.1 * torch.randn(*sh)}[kind]
    x, ref = gen(B, D), gen(N, D)
    x64, r64 = x.double(), ref.double()
    rn = (r64 * r64).sum(1)
    a_fp32 = 2.0 * (x @ ref.T) - rn.float()[None, :]
    a64 = 2.0 * (x64 @ r64.T) - rn[None, :]
    bound = stf.gemm_gamma(D) * (rn[None, :] + 2.0 * x64.norm(dim=1)[:, None] * rn.sqrt()[None, :])
    ratio = ((a_fp32.double() - a64).abs() / bound).max().item()
    assert ratio <= 1.0, f"GEMM error reaches {ratio:.2f} of the bound"


def test_log_expm1_is_finite_where_expm1_overflows():
    # The flag rule's log(expm1(err)): err passes 709 at sigma ~ 0.002 on image
    # data; an infinite slack would flag (and re-evaluate) every entry.
    e = torch.tensor([1e-12, 1e-5, 0.3, 39.9, 40.1, 700.0, 800.0, 1e6], dtype=torch.float64)
    got = stf.log_expm1(e)
    assert torch.isfinite(got).all()
    want = torch.log(torch.expm1(e[:6]))
    torch.testing.assert_close(got[:6], want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[6:], e[6:], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------
# torch.library and torch.compile
# ----------------------------------------------------------------------------

def test_opcheck(backend):
    x, s, ref = near_duplicate_case(4, 9, 6, 0.1)
    torch.library.opcheck(torch.ops.fastdiff.stf_target.default, (x, s, ref, "highest", backend))


def test_torch_compile_fullgraph(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x, s, ref = near_duplicate_case(3, 11, 8, 0.2)

    def f(x, s, ref):
        t, lse = fastdiff.stf_target(x, s, ref, return_lse=True)
        return (t - x) / s[:, None] ** 2, lse

    torch._dynamo.reset()
    score, lse = torch.compile(f, fullgraph=True)(x, s, ref)
    ref_score, ref_lse = f(x, s, ref)
    torch.testing.assert_close(score, ref_score)
    torch.testing.assert_close(lse, ref_lse)


# ----------------------------------------------------------------------------
# argument errors (issue 2, item 5)
# ----------------------------------------------------------------------------

def _ok():
    return torch.rand(3, 5), torch.full((3,), 0.5), torch.rand(4, 5)


@pytest.mark.parametrize("case,exc,match", [
    ("shape mismatch", ValueError, "ref"),
    ("ref rank", ValueError, "ref"),
    ("0-d x", ValueError, "x"),
    ("sigma zero", ValueError, "sigma"),
    ("sigma negative", ValueError, "sigma"),
    ("sigma zero row", ValueError, "sigma"),
    ("sigma nan", ValueError, "sigma"),
    ("sigma inf", ValueError, "sigma"),
    ("sigma nan row", ValueError, "sigma"),
    ("sigma shape", ValueError, "sigma"),
    ("sigma shape 2d", ValueError, "sigma"),
    ("sigma type", TypeError, "sigma"),
    ("sigma int dtype", TypeError, "sigma"),
    ("empty ref", ValueError, "ref"),
    ("nan in x", ValueError, "x"),
    ("inf in x", ValueError, "x"),
    ("nan in ref", ValueError, "ref"),
    ("inf in ref", ValueError, "ref"),
    ("int x", TypeError, "x"),
    ("int ref", TypeError, "ref"),
    ("x not a tensor", TypeError, "x"),
    ("mixed devices", ValueError, "device"),
    ("sigma device", ValueError, "sigma"),
    ("unknown backend", ValueError, "backend"),
    ("unknown precision", ValueError, "precision"),
])
def test_bad_input(case, exc, match):
    x, s, ref = _ok()
    kw = {}
    if case == "shape mismatch":
        ref = torch.rand(4, 6)
    elif case == "ref rank":
        ref = torch.rand(4, 5, 1)
    elif case == "0-d x":
        x, ref = torch.tensor(1.0), torch.tensor(1.0)
    elif case == "sigma zero":
        s = 0.0
    elif case == "sigma negative":
        s = -1.0
    elif case == "sigma zero row":
        s[1] = 0.0
    elif case == "sigma nan":
        s = float("nan")
    elif case == "sigma inf":
        s = float("inf")
    elif case == "sigma nan row":
        s[2] = float("nan")
    elif case == "sigma shape":
        s = torch.full((4,), 0.5)
    elif case == "sigma shape 2d":
        s = torch.full((3, 2), 0.5)
    elif case == "sigma type":
        s = "0.5"
    elif case == "sigma int dtype":
        s = torch.ones(3, dtype=torch.int64)
    elif case == "empty ref":
        ref = torch.rand(0, 5)
    elif case == "nan in x":
        x[1, 2] = float("nan")
    elif case == "inf in x":
        x[0, 0] = float("-inf")
    elif case == "nan in ref":
        ref[3, 4] = float("nan")
    elif case == "inf in ref":
        ref[0, 1] = float("inf")
    elif case == "int x":
        x = torch.ones(3, 5, dtype=torch.int32)
    elif case == "int ref":
        ref = torch.ones(4, 5, dtype=torch.int64)
    elif case == "x not a tensor":
        x = [[0.0] * 5] * 3
    elif case == "mixed devices":
        ref = ref.to("meta")        # a second device without a GPU
    elif case == "sigma device":
        s = s.to("meta")
    elif case == "unknown backend":
        kw["backend"] = "fortran"
    elif case == "unknown precision":
        kw["precision"] = "fp8"
    with pytest.raises(exc, match=match):
        fastdiff.stf_target(x, s, ref, **kw)


@pytest.mark.parametrize("where", ["x", "ref"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_data_raises_on_every_backend(backend, where, value, dtype):
    # The cpu backend checks its data itself (from its float64 row norms),
    # the others in Python: both must name the argument.
    x, s, ref = torch.rand(3, 40, dtype=dtype), torch.full((3,), 0.5), torch.rand(9, 40, dtype=dtype)
    (x if where == "x" else ref)[-1, 17] = value
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        fastdiff.stf_target(x, s, ref, backend=backend)


@pytest.mark.parametrize("where", ["x", "ref"])
def test_nan_data_with_value_checks_off(backend, where, monkeypatch):
    # FASTDIFF_CHECK_VALUES=0 (and torch.compile) skip the Python checks: NaN data then gives
    # NaN (the row of a NaN x; every row for a NaN reference row), or the cpu backend's error.
    monkeypatch.setenv("FASTDIFF_CHECK_VALUES", "0")
    x, s, ref = torch.rand(3, 40), torch.full((3,), 0.5), torch.rand(9, 40)
    (x[1] if where == "x" else ref[4])[17] = float("nan")
    if backend == "cpu":
        with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
            fastdiff.stf_target(x, s, ref, backend=backend)
        return
    t, lse = fastdiff.stf_target(x, s, ref, backend=backend, return_lse=True)
    want = torch.tensor([False, True, False]) if where == "x" else torch.ones(3, dtype=torch.bool)
    assert torch.equal(t.isnan().all(1), want) and torch.equal(lse.isnan(), want)


def test_unavailable_backend_by_name_raises():
    x, s, ref = _ok()
    # The cuda backend never runs on CPU tensors, GPU or not.
    with pytest.raises(RuntimeError, match="unavailable"):
        fastdiff.stf_target(x, s, ref, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed CPU/CUDA devices need a GPU")
def test_mixed_cpu_cuda_devices():
    x, s, ref = _ok()
    with pytest.raises(ValueError, match="device"):
        fastdiff.stf_target(x, s, ref.cuda())


# ----------------------------------------------------------------------------
# autograd: the target is a training target, computed from detached inputs
# ----------------------------------------------------------------------------

def test_result_is_detached(backend):
    x, s, ref = near_duplicate_case(3, 7, 5, 0.3)
    x.requires_grad_()
    ref.requires_grad_()
    t, lse = fastdiff.stf_target(x, s, ref, backend=backend, return_lse=True)
    assert not t.requires_grad and t.grad_fn is None
    assert not lse.requires_grad
    # A loss against the target trains the prediction only.
    loss = ((x * 2 - t) ** 2).mean()
    loss.backward()
    assert ref.grad is None and x.grad is not None


@pytest.mark.parametrize("sigma, max_per_row", [(0.002, 1), (0.5, 1), (80.0, 0)])
def test_flag_rule_reevaluates_only_what_matters(monkeypatch, sigma, max_per_row):
    # Exactness must not cost O(B N D): at small sigma only the row's own source
    # is re-evaluated, at large sigma (rule A) nothing is.
    counts = []
    real = stf.flag_entries

    def spy(*args):
        flags = real(*args)
        counts.append(flags.sum(1))
        return flags

    monkeypatch.setattr(stf, "flag_entries", spy)
    B, N, D = 8, 256, 768
    ref = torch.rand(N, D) * 2 - 1
    x = ref[:B] + sigma * torch.randn(B, D)
    fastdiff.stf_target(x, sigma, ref, backend="torch")
    per_row = torch.stack(counts).sum(0)
    assert int(per_row.max()) <= max_per_row, per_row


@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 30.0])
def test_dense_rows(backend, sigma, monkeypatch):
    """Rows whose weights spread over many near-equidistant references (a cluster
    of near-duplicates around each source, and large sigma on smooth data): the
    float64-GEMM path for rows with many flags, and its fall-back to direct
    differences where the float64 expansion is still not exact enough."""
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 4 * 40)       # several chunks
    B, per, D = 4, 60, 96
    base = torch.rand(B, D) * 2 - 1
    ref = base.repeat_interleave(per, 0) + sigma * 2.0 * torch.randn(B * per, D) / math.sqrt(D)
    ref = torch.cat([ref, torch.rand(40, D) * 2 - 1])
    x = base + sigma * torch.randn(B, D)
    t, lse = run(backend, x, sigma, ref)
    assert_contract(t, x, sigma, ref)
    assert_lse(lse, x, sigma, ref)


def test_dense_path_is_taken_at_moderate_sigma(monkeypatch):
    calls = []
    real = stf.flag_entries

    def spy(*args):
        flags = real(*args)
        calls.append(int(flags.sum()))
        return flags

    monkeypatch.setattr(stf, "flag_entries", spy)
    B, N, D = 8, 256, 768
    ref = torch.rand(N, D) * 2 - 1
    ref = ref[:16].repeat(16, 1) + 0.01 * torch.randn(N, D)    # 16 tight clusters
    x = ref[:B] + 10.0 * torch.randn(B, D)
    t = fastdiff.stf_target(x, 10.0, ref, backend="torch")
    # the fp32 bound flags most entries; after the float64 GEMM none is left
    assert calls[0] > B * N // 2 and calls[-1] == 0, calls
    assert_contract(t, x, 10.0, ref)


# Moderate sigma (5..50): the weights spread over whole clusters of near-duplicates while the
# fp32 GEMM's error bound is still above budget, so most entries are flagged: the float64-GEMM
# rows (the cpu backend decides them up front from a probe of ref, or per chunk) and the bound
# both decide the result. "offset" data sits at +1000 (squared norms ~2e9): there the fp32
# expansion's error really moves the weights (a loosened bound or a skipped re-evaluation
# breaks the contract: test_moderate_sigma_cases_catch_mutations), and a dense row's fp32
# weighted sum is not provably within budget (the float64 one is taken); "unit" data is in
# [-1, 1], where it is.
MODERATE_SIGMAS = [5.0, 12.0, 30.0, 50.0]


def moderate_sigma_case(sigma: float, scale: str, *, B: int = 6, clusters: int = 6, per: int = 40,
                        D: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(clusters, D, generator=g) * 2 - 1
    # members spread so that x.(r_a - r_b) / sigma^2 is O(1): the weights cover the cluster
    spread = 1.5 * sigma / math.sqrt(D)
    ref = centers.repeat_interleave(per, 0) + spread * torch.randn(clusters * per, D, generator=g)
    ref = torch.cat([ref, torch.rand(40, D, generator=g) * 2 - 1])
    if scale == "offset":
        ref = ref + 1000.0
    src = ref[torch.arange(B) * per % ref.shape[0]]
    s = torch.full((B,), sigma) * torch.linspace(0.8, 1.25, B)     # mixed sigma around the value
    x = src + s[:, None] * torch.randn(B, D, generator=g)
    return x, s, ref


@pytest.mark.parametrize("scale", ["unit", "offset"])
@pytest.mark.parametrize("sigma", MODERATE_SIGMAS)
def test_moderate_sigma_clusters(backend, sigma, scale):
    x, s, ref = moderate_sigma_case(sigma, scale)
    t, lse = run(backend, x, s, ref)
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


@pytest.mark.parametrize("sigma", [5.0, 30.0])
def test_moderate_sigma_clusters_chunked(backend, sigma, monkeypatch):
    """The same with several chunks: the dense rows' state (float64 accumulator, running max)
    carried across chunks, and sources late in ref."""
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 6 * 70)          # 70 rows per chunk
    x, s, ref = moderate_sigma_case(sigma, "offset", D=1024)
    ref = ref.flip(0).contiguous()
    t, lse = run(backend, x, s, ref)
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_moderate_sigma_ragged(backend, dtype):
    """Sizes that fill no tile evenly (the cpu backend's float64 kernel: rows of x by 4, of ref
    by 3 and 6, D by 4 and 256), and the data dtypes (float64 ref: MKL's dgemm on ref itself)."""
    x, s, ref = moderate_sigma_case(12.0, "unit", B=7, clusters=5, per=37, D=1001)
    x, ref = x.to(dtype), ref.to(dtype)
    t, lse = run(backend, x, s, ref)
    x64, r64 = x.double(), ref.double()
    assert_contract(t, x64, s, r64)
    assert_lse(lse, x64, s, r64)


@pytest.mark.parametrize("chunked", [False, True])
def test_moderate_sigma_dense_weighted_sum_ragged(backend, chunked, monkeypatch):
    """Every weight nonzero (sigma ~20) at B = 32: the cpu backend's dense weighted-sum kernel
    (row tiles of 6 6 5 5 5 5, references in blocks of 256, D in panels of 128 and strips of
    16) on sizes that fill none of them evenly: D = 1000 ends in a panel of 104 and a strip of
    8, N = 310 in a block of 54 (one chunk) or chunks of 100 (several, the weighted sums added
    across chunks). Dropping the last strip, the last block of references or the last row tile
    (mutated by hand) each break the contract here."""
    if chunked:
        monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 32 * 100)    # 100 rows per chunk
    x, s, ref = moderate_sigma_case(20.0, "unit", B=32, clusters=6, per=45, D=1000)
    t, lse = run(backend, x, s, ref)
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


@pytest.mark.parametrize("mutant", ["loosened bound", "skipped re-evaluation"])
def test_moderate_sigma_cases_catch_mutations(mutant, monkeypatch):
    """The moderate-sigma cases can fail: with the bound 1000x too small, or with no entry
    re-evaluated, the torch backend (the rule's reference implementation; the C++ kernels
    mirror it) breaks the contract on them. (The cpu backend's own constants were mutated by
    hand the same way; see the README.)"""
    if mutant == "loosened bound":
        real = stf.gemm_gamma
        monkeypatch.setattr(stf, "gemm_gamma", lambda D, unit=2.0 ** -24: real(D, unit) * 1e-3)
    else:
        real_flags = stf.flag_entries
        monkeypatch.setattr(stf, "flag_entries", lambda *a, **k: torch.zeros_like(real_flags(*a, **k)))
    worst = 0.0
    for sigma in MODERATE_SIGMAS:
        x, s, ref = moderate_sigma_case(sigma, "offset")
        t = fastdiff.stf_target(x, s, ref, backend="torch")
        worst = max(worst, float(row_err(t, oracle(x, s, ref)[0], s).max()))
    assert worst > CONTRACT, f"{mutant}: max err {worst:.3g} still within the contract"


# ----------------------------------------------------------------------------
# reference sets: labels / ref_labels and ref_logw (issue 13, item 1)
# ----------------------------------------------------------------------------

def terms_case(B: int, N: int, D: int, sigma, *, classes: int = 4, seed: int = 0, logw_scale: float = 3.0):
    """x, sigma (B,), ref and the terms: near_duplicate_case's data (each source's near-duplicate
    at distance ~sigma, which STF must tell apart at small sigma) with the near-duplicates
    labelled with ANOTHER class than their source, so that labels change which one wins;
    ref_logw spread over +-logw_scale with every 5th entry -inf (never a source's)."""
    torch.manual_seed(seed)
    x, s, ref = near_duplicate_case(B, N, D, sigma)
    ref_labels = torch.randint(0, classes, (N,))
    labels = ref_labels[torch.arange(B) % N].clone()
    n_dup = min(B, N - B) if N > B else 0
    ref_labels[B:B + n_dup] = (labels[:n_dup] + 1) % classes
    ref_logw = logw_scale * torch.randn(N)
    ref_logw[::5] = -math.inf
    ref_logw[torch.arange(B) % N] = logw_scale * torch.randn(B)   # a row's own source stays live
    return x, s, ref, dict(labels=labels, ref_labels=ref_labels, ref_logw=ref_logw)


TERM_KINDS = {"labels": ("labels", "ref_labels"), "ref_logw": ("ref_logw",),
              "both": ("labels", "ref_labels", "ref_logw")}


def pick_terms(terms: dict, kind: str) -> dict:
    return {k: terms[k] for k in TERM_KINDS[kind]}


@pytest.mark.parametrize("kind", list(TERM_KINDS))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_terms_sigma_sweep(backend, kind, sigma):
    x, s, ref, terms = terms_case(16, 80, 256, sigma)
    kw = pick_terms(terms, kind)
    t, lse = run(backend, x, s, ref, **kw)
    assert t.shape == x.shape and t.dtype == x.dtype
    assert_contract(t, x, s, ref, **kw)
    assert_lse(lse, x, s, ref, **kw)


@pytest.mark.parametrize("kind", list(TERM_KINDS))
def test_terms_mixed_sigma_many_chunks(backend, kind, monkeypatch):
    """Mixed sigma, several chunks, and a class whose reference rows all sit in the last
    chunk: its rows see only -inf logits in the first chunks (the online log-sum-exp
    must not form exp(-inf - -inf))."""
    B, N, D = 12, 160, 40
    sig = torch.tensor([0.002, 0.002, 0.01, 0.05, 0.3, 1.0, 5.0, 80.0, 0.002, 0.5, 20.0, 0.02])
    x, s, ref, terms = terms_case(B, N, D, sig, seed=1)
    terms["ref_labels"][-16:] = 7                  # class 7 lives in the last chunk only
    terms["labels"][:3] = 7
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * B * 16)  # 16 rows per chunk
    kw = pick_terms(terms, kind)
    t, lse = run(backend, x, s, ref, **kw)
    assert torch.isfinite(t).all() and torch.isfinite(lse).all()
    assert_contract(t, x, s, ref, **kw)
    assert_lse(lse, x, s, ref, **kw)


@pytest.mark.parametrize("B,N,D", [(1, 1, 1), (1, 5, 3), (3, 2, 10), (5, 17, 1), (7, 123, 47), (2, 31, 300)])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
def test_terms_ragged_sizes(backend, B, N, D, sigma):
    x, s, ref, terms = terms_case(B, N, D, sigma, classes=2, seed=B * N + D)
    t, lse = run(backend, x, s, ref, **terms)
    assert_contract(t, x, s, ref, **terms)
    assert_lse(lse, x, s, ref, **terms)


@pytest.mark.parametrize("sigma", [0.002, 1.0, 80.0])
def test_labels_with_one_member(backend, sigma):
    """Each label has exactly one reference row: t_i is that row (exactly: one weight of 1)
    and lse_i its logit plus its log-weight, whatever sigma."""
    B, N, D = 6, 9, 20
    ref = torch.rand(N, D) * 2 - 1
    perm = torch.randperm(N)
    ref_labels = perm.to(torch.int32)                # every label once
    labels = ref_labels[[4, 0, 8, 4, 2, 7]]
    x = ref[[4, 0, 8, 1, 2, 7]] + sigma * torch.randn(B, D)
    ref_logw = torch.randn(N)
    t, lse = run(backend, x, sigma, ref, labels=labels, ref_labels=ref_labels, ref_logw=ref_logw)
    k = [4, 0, 8, 4, 2, 7]
    torch.testing.assert_close(t, ref[k], rtol=0, atol=2e-7)
    want = -((x.double() - ref[k].double()) ** 2).sum(1) / (2 * sigma ** 2) + ref_logw[k].double()
    torch.testing.assert_close(lse, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 30.0])
def test_terms_dense_rows(backend, sigma, monkeypatch):
    """test_dense_rows's clusters with labels and log-weights: the float64-GEMM rows add b_ik too."""
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 4 * 40)
    B, per, D = 4, 60, 96
    base = torch.rand(B, D) * 2 - 1
    ref = base.repeat_interleave(per, 0) + sigma * 2.0 * torch.randn(B * per, D) / math.sqrt(D)
    ref = torch.cat([ref, torch.rand(40, D) * 2 - 1])
    x = base + sigma * torch.randn(B, D)
    ref_labels = torch.arange(ref.shape[0]) % 3
    labels = torch.tensor([0, 1, 2, 0])
    ref_logw = torch.randn(ref.shape[0])
    ref_logw[1::4] = -math.inf
    kw = dict(labels=labels, ref_labels=ref_labels, ref_logw=ref_logw)
    t, lse = run(backend, x, sigma, ref, **kw)
    assert_contract(t, x, sigma, ref, **kw)
    assert_lse(lse, x, sigma, ref, **kw)


@pytest.mark.parametrize("sigma", [0.002, 5.0])
def test_terms_poisoned_outputs(backend, sigma):
    """The backend writes every element of its outputs with the terms too, and a row that no
    reference row serves gets t = 0 and lse = -inf, never NaN (the kernel contract)."""
    x, s, ref, terms = terms_case(7, 123, 47, sigma)
    labels = terms["labels"].clone()
    labels[3] = 99                                   # no reference row has label 99
    _, impl = _dispatch.resolve("stf_target", backend, "cpu")
    t = torch.full_like(x, float("nan"))
    lse = torch.full((7,), float("nan"), dtype=torch.float64)
    impl(x, s, ref, "highest", t, lse, labels=labels, ref_labels=terms["ref_labels"],
         ref_logw=terms["ref_logw"].double())
    assert torch.equal(t[3], torch.zeros(47)) and lse[3] == -math.inf
    keep = [0, 1, 2, 4, 5, 6]
    kw = dict(labels=labels[keep], ref_labels=terms["ref_labels"], ref_logw=terms["ref_logw"])
    assert torch.isfinite(t[keep]).all() and torch.isfinite(lse[keep]).all()
    assert_contract(t[keep], x[keep], s[keep], ref, **kw)
    assert_lse(lse[keep], x[keep], s[keep], ref, **kw)


def test_all_weights_minus_inf_but_one_row_of_a_chunk(backend, monkeypatch):
    # ref_logw only: all but one reference row excluded; that row is t for every row.
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 3 * 16)
    x, s, ref = near_duplicate_case(3, 50, 12, 0.01)
    ref_logw = torch.full((50,), -math.inf)
    ref_logw[37] = 0.0
    t, lse = run(backend, x, s, ref, ref_logw=ref_logw)
    torch.testing.assert_close(t, ref[37].expand(3, 12), rtol=0, atol=1e-7)
    assert_lse(lse, x, s, ref, ref_logw=ref_logw)


def test_rows_without_reference_with_value_checks_off(backend, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CHECK_VALUES", "0")
    x, s, ref, terms = terms_case(5, 30, 8, 0.1)
    terms["labels"][2] = 42
    t, lse = run(backend, x, s, ref, **terms)
    assert torch.equal(t[2], torch.zeros(8)) and lse[2] == -math.inf
    assert torch.isfinite(t).all()
    w = fastdiff.stf_weights(x, s, ref, **terms)
    assert torch.equal(w[2], torch.zeros(30))


@pytest.mark.parametrize("kind", list(TERM_KINDS))
def test_terms_weights_and_target_agree(backend, kind):
    x, s, ref, terms = terms_case(5, 30, 20, 0.3)
    kw = pick_terms(terms, kind)
    w = fastdiff.stf_weights(x, s, ref, **kw)
    t64, _ = oracle(x, s, ref, **kw)
    torch.testing.assert_close(w.double() @ ref.double(), t64, rtol=0, atol=1e-6)
    if "labels" in kw:
        assert (w[kw["labels"][:, None] != kw["ref_labels"][None, :]] == 0).all()
    if "ref_logw" in kw:
        assert (w[:, kw["ref_logw"] == -math.inf] == 0).all()
    t = fastdiff.stf_target(x, s, ref, backend=backend, **kw)
    torch.testing.assert_close(t, (w.double() @ ref.double()).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 30.0])
def test_terms_data_dtypes(backend, dtype, sigma, monkeypatch):
    # several chunks; at sigma = 30 the float64-GEMM rows (from float64 ref: its own data)
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 8 * 16 + 4 * 96 * 16)
    x, s, ref, terms = terms_case(8, 50, 96, sigma, seed=3)
    x, ref = x.to(dtype), ref.to(dtype)
    t, lse = run(backend, x, s, ref, **terms)
    assert t.dtype == dtype
    assert_contract(t, x, s, ref, **terms)
    assert_lse(lse, x, s, ref, **terms)


def test_terms_label_dtypes_and_image_shape(backend):
    ref = torch.rand(9, 2, 3, 4)
    x = ref[:3] + 0.05 * torch.randn(3, 2, 3, 4)
    rl = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    want, _ = oracle(x.reshape(3, -1), 0.05, ref.reshape(9, -1), labels=rl[:3], ref_labels=rl)
    for dt in (torch.uint8, torch.int16, torch.int32, torch.int64):
        lw = torch.zeros(9, dtype=torch.bfloat16)
        t = fastdiff.stf_target(x, 0.05, ref, labels=rl[:3].to(dt), ref_labels=rl.to(torch.int64),
                                ref_logw=lw, backend=backend)
        assert t.shape == x.shape
        assert row_err(t.reshape(3, -1), want, 0.05).max() <= CONTRACT


def test_terms_no_features(backend):
    x, ref = torch.rand(3, 0), torch.rand(5, 0)
    ref_logw = torch.tensor([0.0, 1.0, -math.inf, 2.0, 0.5])
    labels, ref_labels = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1, 1, 1])
    _, lse = run(backend, x, 0.5, ref, labels=labels, ref_labels=ref_labels, ref_logw=ref_logw)
    want = torch.stack([torch.logsumexp(torch.tensor([0.0, 1.0], dtype=torch.float64), 0),
                        torch.logsumexp(torch.tensor([2.0, 0.5], dtype=torch.float64), 0)])[[0, 1, 1]]
    torch.testing.assert_close(lse, want)


def test_minus_inf_entries_are_never_reevaluated(monkeypatch):
    # The flag rule bounds the distance part; an excluded entry weighs 0 whatever its
    # distance, so the exact pass never spends a direct difference on it.
    seen = []
    real = stf._exact_sqdist

    def spy(x64, ref, rows, cols, D):
        seen.append((rows.clone(), cols.clone()))
        return real(x64, ref, rows, cols, D)

    monkeypatch.setattr(stf, "_exact_sqdist", spy)
    B, N, D = 8, 64, 128
    ref = torch.rand(N, D) * 2 - 1
    ref[B:2 * B] = ref[:B] + 1e-3 * torch.randn(B, D)    # near-duplicates: flagged if live
    x = ref[:B] + 0.002 * torch.randn(B, D)
    ref_labels = torch.arange(N) % 2
    ref_labels[B:2 * B] = 1 - ref_labels[:B]               # the near-duplicates in the other class
    labels = ref_labels[:B]
    fastdiff.stf_target(x, 0.002, ref, labels=labels, ref_labels=ref_labels, backend="torch")
    rows = torch.cat([r for r, _ in seen])
    cols = torch.cat([c for _, c in seen])
    assert rows.numel() > 0                                 # the sources are re-evaluated
    assert (labels[rows] == ref_labels[cols]).all()


def test_terms_opcheck(backend):
    x, s, ref, terms = terms_case(4, 9, 6, 0.1)
    t = stf._ref_terms(terms["labels"], terms["ref_labels"], terms["ref_logw"], 4, 9, x.device)
    torch.library.opcheck(torch.ops.fastdiff.stf_target.default, (x, s, ref, "highest", backend, *t))
    torch.library.opcheck(torch.ops.fastdiff.stf_target.default, (x, s, ref, "highest", backend, None, None, t[2]))


def test_terms_torch_compile_fullgraph(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x, s, ref, terms = terms_case(3, 11, 8, 0.2)

    def f(x, s, ref, labels, ref_labels, ref_logw):
        t, lse = fastdiff.stf_target(x, s, ref, labels=labels, ref_labels=ref_labels, ref_logw=ref_logw,
                                     return_lse=True)
        return (t - x) / s[:, None] ** 2, lse

    torch._dynamo.reset()
    args = (x, s, ref, terms["labels"], terms["ref_labels"], terms["ref_logw"])
    score, lse = torch.compile(f, fullgraph=True)(*args)
    ref_score, ref_lse = f(*args)
    torch.testing.assert_close(score, ref_score)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("case,exc,match", [
    ("labels without ref_labels", ValueError, "ref_labels"),
    ("ref_labels without labels", ValueError, "labels"),
    ("labels shape", ValueError, r"labels must have shape \(3,\)"),
    ("ref_labels shape", ValueError, r"ref_labels must have shape \(4,\)"),
    ("ref_logw shape", ValueError, r"ref_logw must have shape \(4,\)"),
    ("labels float", TypeError, "labels must have an integer dtype"),
    ("labels bool", TypeError, "labels must have an integer dtype"),
    ("ref_labels float", TypeError, "ref_labels must have an integer dtype"),
    ("ref_logw int", TypeError, "ref_logw must have a floating dtype"),
    ("labels list", TypeError, "labels must be a torch.Tensor"),
    ("labels device", ValueError, "labels is on meta"),
    ("ref_logw device", ValueError, "ref_logw is on meta"),
    ("label without reference row", ValueError, r"row 1 has label 9 but no reference row has ref_labels == 9"),
    ("label whose rows are all -inf", ValueError, r"row 0 has label 0 but no reference row .* ref_logw > -inf"),
    ("every ref_logw -inf", ValueError, "row 0 has no reference row .* every ref_logw is -inf"),
    ("nan in ref_logw", ValueError, r"ref_logw\[2\] is nan"),
    ("+inf in ref_logw", ValueError, r"ref_logw\[1\] is inf"),
])
@pytest.mark.parametrize("fn", ["stf_target", "stf_weights"])
def test_terms_bad_input(case, exc, match, fn, backend):
    x, s, ref = _ok()
    kw = dict(labels=torch.tensor([0, 1, 0]), ref_labels=torch.tensor([0, 1, 0, 1]), ref_logw=torch.zeros(4))
    if case == "labels without ref_labels":
        del kw["ref_labels"]
    elif case == "ref_labels without labels":
        del kw["labels"]
    elif case == "labels shape":
        kw["labels"] = torch.zeros(4, dtype=torch.int64)
    elif case == "ref_labels shape":
        kw["ref_labels"] = torch.zeros(4, 1, dtype=torch.int64)
    elif case == "ref_logw shape":
        kw["ref_logw"] = torch.zeros(3)
    elif case == "labels float":
        kw["labels"] = kw["labels"].float()
    elif case == "labels bool":
        kw["labels"] = kw["labels"].bool()
    elif case == "ref_labels float":
        kw["ref_labels"] = kw["ref_labels"].double()
    elif case == "ref_logw int":
        kw["ref_logw"] = torch.zeros(4, dtype=torch.int64)
    elif case == "labels list":
        kw["labels"] = [0, 1, 0]
    elif case == "labels device":
        kw["labels"] = kw["labels"].to("meta")
    elif case == "ref_logw device":
        kw["ref_logw"] = kw["ref_logw"].to("meta")
    elif case == "label without reference row":
        kw["labels"][1] = 9
    elif case == "label whose rows are all -inf":
        kw["ref_logw"][[0, 2]] = -math.inf
    elif case == "every ref_logw -inf":
        del kw["labels"], kw["ref_labels"]
        kw["ref_logw"][:] = -math.inf
    elif case == "nan in ref_logw":
        kw["ref_logw"][2] = math.nan
    elif case == "+inf in ref_logw":
        kw["ref_logw"][1] = math.inf
    extra = {"backend": backend} if fn == "stf_target" else {}
    with pytest.raises(exc, match=match):
        getattr(fastdiff, fn)(x, s, ref, **kw, **extra)


# ----------------------------------------------------------------------------
# out-of-range sigma and data, meta tensors (issue 12, items 10 and 11)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,match", [(1e-46, "a normal float32"), (7e-46, "a normal float32"),
                                         (1e-40, "a normal float32"), (1e-39, "a normal float32"),
                                         (1e40, "a normal float32"), (3.5e38, "a normal float32"),
                                         (10 ** 400, "positive and finite, got inf")])
@pytest.mark.parametrize("fn", ["stf_target", "stf_weights"])
def test_python_sigma_out_of_float32_range(backend, sigma, match, fn):
    # 1e-46 became 0 in float32 (NaN target); 1e-40 a denormal; 1e40 an OverflowError that
    # did not name sigma.
    x, _, ref = _ok()
    extra = {"backend": backend} if fn == "stf_target" else {}
    with pytest.raises(ValueError, match="sigma must be " + match):
        getattr(fastdiff, fn)(x, sigma, ref, **extra)


@pytest.mark.parametrize("value", [1e-40, 1e-46])
def test_tensor_sigma_denormal_in_float32(backend, value):
    x, _, ref = _ok()
    s = torch.tensor([0.5, value, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma must be positive .* row 1"):
        fastdiff.stf_target(x, s, ref, backend=backend)


def test_smallest_normal_sigma_is_computed(backend):
    x, _, ref = _ok()
    x = ref[:3].clone()
    t, lse = run(backend, x, FLOAT32_TINY_, ref)
    torch.testing.assert_close(t, ref[:3], rtol=0, atol=0)
    assert torch.isfinite(lse).all()


FLOAT32_TINY_ = torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("where", ["x", "ref"])
@pytest.mark.parametrize("value", [1e19, -2e19, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_data_whose_norms_overflow_float32(backend, where, value, dtype):
    # Finite data near 1e19 returned NaN: its squared norms overflow float32 in the GEMMs.
    x, s, ref = torch.rand(3, 40, dtype=dtype), torch.full((3,), 0.5), torch.rand(9, 40, dtype=dtype)
    (x if where == "x" else ref)[-1, 17] = value
    with pytest.raises(ValueError, match=f"{where} row {2 if where == 'x' else 8} has squared norm"):
        fastdiff.stf_target(x, s, ref, backend=backend)
    with pytest.raises(ValueError, match=f"{where} row"):
        fastdiff.stf_weights(x, s, ref)


def test_large_data_within_range_is_computed(backend):
    # Elements up to ~1e17 (squared norms under MAX_SQNORM) are fine, at a matching sigma.
    x, s, ref, _ = terms_case(4, 20, 30, 0.3)
    c = 1e16
    t = fastdiff.stf_target(x * c, s * c, ref * c, backend=backend)
    assert_contract(t / c, x, s, ref)


def test_many_rows_whose_total_norm_exceeds_the_bound(backend):
    # No row is out of range, only the whole tensor's norm: checked row by row, no error.
    ref = torch.full((64, 8), 2e17)
    ref[:, 0] = torch.arange(64) * 1e16
    x = ref[:2] + 1e15 * torch.randn(2, 8)
    t = fastdiff.stf_target(x, 1e15, ref, backend=backend)
    assert torch.isfinite(t).all()


def test_meta_sigma_with_cpu_x():
    x, _, ref = _ok()
    for s in (torch.tensor(0.5, device="meta"), torch.full((1,), 0.5, device="meta")):
        with pytest.raises(ValueError, match="sigma is on meta but x is on cpu"):
            fastdiff.stf_target(x, s, ref)
        with pytest.raises(ValueError, match="sigma is on meta but x is on cpu"):
            fastdiff.stf_weights(x, s, ref)


@pytest.mark.parametrize("checks", ["1", "0"])
@pytest.mark.parametrize("sigma_kind", ["float", "meta tensor"])
def test_meta_x_and_ref(checks, sigma_kind, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CHECK_VALUES", checks)
    x, ref = torch.rand(3, 5, device="meta"), torch.rand(4, 5, device="meta")
    s = 0.5 if sigma_kind == "float" else torch.full((3,), 0.5, device="meta")
    for fn in (fastdiff.stf_target, fastdiff.stf_weights):
        with pytest.raises(ValueError, match="x and ref are on the meta device"):
            fn(x, s, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [0.01, 10.0])
def test_bf16_autocast_region_does_not_change_the_op(backend, sigma):
    """Inside a bf16 autocast region (a mixed-precision train step) the op computes as outside it: its
    GEMMs are its own precision decisions (the cpu kernel's probe GEMM once came back in bf16)."""
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(300, 48, generator=g) * 2 - 1
    x = ref[:9] + sigma * torch.randn(9, 48, generator=g)
    plain = fastdiff.stf_target(x, sigma, ref, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fastdiff.stf_target(x, sigma, ref, backend=backend)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
