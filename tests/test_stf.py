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

def oracle(x: torch.Tensor, sigma, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t64, lse64): the STF target by direct differences, all in float64.

    x (B, D), ref (N, D), sigma a float or (B,). Rows of x in pieces so that
    the B x N x D difference tensor stays small.
    """
    x64, r64 = x.detach().double().reshape(x.shape[0], -1), ref.detach().double().reshape(ref.shape[0], -1)
    s64 = torch.as_tensor(sigma, dtype=torch.float64).expand(x64.shape[0])
    step = max(1, (1 << 22) // max(1, r64.numel()))
    ts, lses = [], []
    for i0 in range(0, x64.shape[0], step):
        d2 = ((x64[i0:i0 + step, None, :] - r64[None]) ** 2).sum(-1)
        logits = -d2 / (2 * s64[i0:i0 + step, None] ** 2)
        ts.append(torch.softmax(logits, 1) @ r64)
        lses.append(torch.logsumexp(logits, 1))
    return torch.cat(ts), torch.cat(lses)


def row_err(t: torch.Tensor, t64: torch.Tensor, sigma) -> torch.Tensor:
    """err_i = ||t_i - t64_i|| / (sigma_i sqrt(D)), float64 (B,)."""
    B = t64.shape[0]
    D = t64[0].numel()
    s64 = torch.as_tensor(sigma, dtype=torch.float64).expand(B)
    return (t.double().reshape(B, -1) - t64).norm(dim=1) / (s64 * math.sqrt(D))


def assert_contract(t: torch.Tensor, x: torch.Tensor, sigma, ref: torch.Tensor) -> None:
    t64, _ = oracle(x, sigma, ref)
    B, D = t64.shape
    s64 = torch.as_tensor(sigma, dtype=torch.float64).expand(B)
    rounding = (t64.to(t.dtype).double() - t64).norm(dim=1)
    allowed = CONTRACT * s64 * math.sqrt(D) + ROUNDING[t.dtype] * rounding
    got = (t.double().reshape(B, D) - t64).norm(dim=1)
    bad = (got > allowed).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} rows break the contract, e.g. row {bad[0].item()}: err "
                              f"{row_err(t, t64, sigma)[bad[0]].item():.3g} (sigma {s64[bad[0]].item():.3g})")


def assert_lse(lse: torch.Tensor, x, sigma, ref) -> None:
    _, lse64 = oracle(x, sigma, ref)
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


def run(backend, x, sigma, ref):
    return fastdiff.stf_target(x, sigma, ref, backend=backend, return_lse=True)


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
