"""The GPU backends of stf_target (`cuda`, `triton`).

Here (no GPU): only that the extension, when built with CUDA, registered a
CUDA kernel for fastdiff_ext::stf_target. On a CUDA machine: the oracle suite
at full sizes for both backends, outputs poisoned with NaN before each run,
precision "highest" against the 1e-4 contract and the faster modes against
twice their documented (CPU-emulated) bounds. The Triton kernels' logic is
tested on CPU in the interpreter by tests/test_stf_triton.py.

On the GPU machine also run the small ragged cases under compute-sanitizer
(memcheck for out-of-bounds access, racecheck for shared-memory races in the
CUDA row kernel's flag list, initcheck for workspace read before written):
    compute-sanitizer --tool memcheck python -m pytest tests/test_stf_gpu.py -k "7-1023-3071 or ragged"
    compute-sanitizer --tool racecheck python -m pytest tests/test_stf_gpu.py -k "ragged and cuda and 0.5"
    compute-sanitizer --tool initcheck python -m pytest tests/test_stf_gpu.py -k "ragged and cuda"
"""
from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff import _ext
from fastdiff.ops import _dispatch, stf
from test_stf import CONTRACT, assert_contract, assert_lse, near_duplicate_case, oracle, row_err

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device (none visible)")
GPU_BACKENDS = ["cuda", "triton"]


def _built_with_cuda() -> bool:
    """Whether fastdiff._C was linked against torch's CUDA libraries."""
    if _ext._C is None:
        return False
    with open(_ext._C.__file__, "rb") as f:
        blob = f.read()
    return b"libc10_cuda.so" in blob


def test_cuda_kernel_registered():
    if _ext.LOAD_ERROR is not None:
        pytest.skip(_ext.LOAD_ERROR)
    if not _built_with_cuda():
        pytest.skip("fastdiff._C was built without CUDA (FASTDIFF_NO_CUDA=1, no nvcc, or a CPU build of torch)")
    assert _ext.has_kernel("stf_target", "CUDA"), "the CUDA build did not register fastdiff_ext::stf_target for CUDA"
    assert _ext.has_kernel("stf_target", "CPU")


def _impl(backend):
    status = _dispatch.backend_status(backend, "cuda", "stf_target")
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    return _dispatch.resolve("stf_target", backend, "cuda")[1]


def _run_poisoned(backend, x, sigma, ref, precision="highest", finite=True, **terms):
    """Calls the backend on NaN-poisoned outputs; returns (t, lse). terms: labels / ref_labels /
    ref_logw, as the public function passes them (int64, int64, float64)."""
    impl = _impl(backend)
    x2, ref2 = x.reshape(x.shape[0], -1).contiguous(), ref.reshape(ref.shape[0], -1).contiguous()
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0]).contiguous()
    t = torch.full_like(x2, float("nan"))
    lse = torch.full((x.shape[0],), float("nan"), dtype=torch.float64, device=x.device)
    impl(x2, s, ref2, precision, t, lse, **terms)
    torch.cuda.synchronize()
    if finite:
        assert torch.isfinite(t).all() and torch.isfinite(lse).all(), "NaN/Inf left in the poisoned outputs"
    return t, lse


def _check(t, lse, x, sigma, ref, **terms):
    t64, lse64 = oracle(x, sigma, ref, **terms)
    err = row_err(t, t64, sigma)
    assert err.max().item() <= CONTRACT, f"max err {err.max().item():.3g} at row {err.argmax().item()}"
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-6, atol=1e-5)


FULL_SIZES = [(64, 4096, 3072), (128, 1024, 12288), (512, 4096, 3072), (64, 1024, 16384), (7, 1023, 3071)]
SIGMAS = [0.002, 0.02, 0.5, 5.0, 80.0]


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_sigma_duplicates_and_big_n(backend):
    B, N, D = 64, 50000, 3072
    x, s, ref = near_duplicate_case(B, N, D, 0.01)
    s = torch.tensor(SIGMAS).repeat(B // len(SIGMAS) + 1)[:B]
    ref[N - 8:] = ref[:8]                       # exact duplicates
    x = ref[:B] + s[:, None] * torch.randn(B, D)
    x[:4] = ref[:4]                             # x equal to reference rows
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    t, lse = _run_poisoned(backend, x, s, ref)
    _check(t, lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_public_api(backend, dtype):
    _impl(backend)
    x, s, ref = near_duplicate_case(16, 777, 3072, 0.05, dtype=dtype)
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    t, lse = fastdiff.stf_target(x, s, ref, backend=backend, return_lse=True)
    assert t.dtype == dtype and torch.isfinite(t).all()
    t64, _ = oracle(x, s, ref)
    rounding = (t64.to(dtype).double() - t64).norm(dim=1)
    got = (t.double() - t64).norm(dim=1)
    assert (got <= CONTRACT * s.double() * math.sqrt(3072) + 2.0 * rounding).all()


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
@pytest.mark.parametrize("D", [3072, 12288])
@pytest.mark.parametrize("sigma", [0.002, 0.02, 0.1, 0.5, 1.0, 5.0, 80.0])
def test_fast_modes_within_documented_bounds(backend, precision, D, sigma):
    from fastdiff.kernels.stf import PRECISION_BOUNDS
    x, s, ref = near_duplicate_case(32, 512, D, sigma)
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    t, _ = _run_poisoned(backend, x, s, ref, precision=precision)
    t64, _ = oracle(x, s, ref)
    err = row_err(t, t64, s).max().item()
    bound = PRECISION_BOUNDS[precision][D][sigma]
    print(f"{backend} {precision} D={D} sigma={sigma}: err {err:.3g} (documented {bound:.3g})")
    # the bound was emulated on CPU; a measured error within 2x of it (plus fp32
    # accumulation noise) confirms it
    assert err <= 2.0 * bound + 1e-6


@needs_gpu
@pytest.mark.cuda
def test_auto_on_cuda_is_exact():
    x, s, ref = near_duplicate_case(8, 300, 3072, 0.002)
    t = fastdiff.stf_target(x.cuda(), s.cuda(), ref.cuda(), backend="auto")
    t64, _ = oracle(x, s, ref)
    assert row_err(t.cpu(), t64, s).max() <= CONTRACT


# ----------------------------------------------------------------------------
# paths the full-size cases miss: ragged tiles, many chunks, empty splits,
# dtype pairs, offset pointers, streams and devices
# ----------------------------------------------------------------------------

# B, N, D at tile edges (64 in csrc/cuda/stf.cu): one row, one reference row, one
# feature, a ragged 65th row/column, N < one tile and N just above a split's size.
RAGGED = [(1, 1, 1), (1, 5, 3), (3, 1, 10), (5, 17, 1), (7, 123, 47), (2, 31, 300), (1, 700, 1), (65, 130, 65)]


# "highest" at full sizes and at the ragged ones (ids full-B-N-D-sigma, ragged-B-N-D-sigma:
# the sanitizer commands above select by them).
HIGHEST_CASES = (
    [pytest.param(B, N, D, sg, id=f"full-{B}-{N}-{D}-{sg}") for B, N, D in FULL_SIZES for sg in SIGMAS]
    + [pytest.param(B, N, D, sg, id=f"ragged-{B}-{N}-{D}-{sg}") for B, N, D in RAGGED
       for sg in (0.002, 0.5, 30.0, 80.0)])


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,N,D,sigma", HIGHEST_CASES)
def test_highest(backend, B, N, D, sigma):
    x, s, ref = near_duplicate_case(B, N, D, sigma)
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    t, lse = _run_poisoned(backend, x, s, ref)
    _check(t, lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
@pytest.mark.parametrize("B,N,D", [(1, 1, 1), (5, 17, 1), (7, 123, 47), (65, 130, 65)])
def test_fast_modes_ragged_sizes(backend, precision, B, N, D):
    # At sigma = 80 every mode is far inside 1e-3 (PRECISION_BOUNDS); this checks the
    # tails and that every output element is written.
    x, s, ref = near_duplicate_case(B, N, D, 80.0)
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    t, lse = _run_poisoned(backend, x, s, ref, precision=precision)
    t64, lse64 = oracle(x, s, ref)
    assert row_err(t, t64, s).max().item() <= 1e-3
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-4, atol=1e-2)


def _splits_call(backend, x, s, ref, splits, chunk):
    """The Triton backend with its split count and chunk width forced (poisoned outputs)."""
    from fastdiff.kernels.stf import stf_target_splits
    t = torch.full_like(x, float("nan"))
    lse = torch.full((x.shape[0],), float("nan"), dtype=torch.float64, device=x.device)
    stf_target_splits(x, s, ref, "highest", t, lse, splits=splits, chunk=chunk)
    torch.cuda.synchronize()
    assert torch.isfinite(t).all() and torch.isfinite(lse).all(), "NaN/Inf left in the poisoned outputs"
    return t, lse


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_chunks_and_splits(backend, monkeypatch):
    """The online log-sum-exp over many chunks in several splits, the nearest rows late,
    chunks past a split's last row, and the running lower bound on the max."""
    B, N, D = 6, 3000, 33
    sig = torch.tensor([0.002, 0.002, 0.02, 0.5, 30.0, 80.0])
    x, s, ref = near_duplicate_case(B, N, D, sig)
    ref = ref.flip(0).contiguous()              # sources and their near-duplicates in the last chunks
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    if backend == "cuda":
        # 128 rows per chunk over all splits: 64-row chunks in each of the 6 splits
        # (B = 6, D = 33 leave pv_kernel one block, so stf_plan takes ceil(N / 512) splits)
        monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * B * 128)
        t, lse = _run_poisoned(backend, x, s, ref)
    else:
        _impl(backend)
        t, lse = _splits_call(backend, x, s, ref, splits=5, chunk=128)
    _check(t, lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_empty_split(backend):
    """A split with no reference rows (m = -inf, l = 0) must weigh 0 in the combine, not NaN."""
    B, N, D = 4, 8193, 64
    if backend == "cuda":
        # mirrors stf_plan (csrc/cuda/stf.cu): one pv block, so S = min(2 * SMs, ceil(N / 512), 16)
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        S = min(2 * sms, -(-N // 512), 16)
        span = -(-(-(-N // S)) // 64) * 64
        assert (S - 1) * span >= N, f"this case has no empty split on {sms} SMs (S = {S}, span = {span})"
    x, s, ref = near_duplicate_case(B, N, D, torch.tensor([0.002, 0.5, 30.0, 80.0]))
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    if backend == "cuda":
        t, lse = _run_poisoned(backend, x, s, ref)
    else:
        _impl(backend)
        t, lse = _splits_call(backend, x, s, ref, splits=16, chunk=None)
    _check(t, lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("x_dtype,ref_dtype", [
    (torch.float32, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float64),
    (torch.float64, torch.float32), (torch.bfloat16, torch.bfloat16),
])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 80.0])
def test_dtype_pairs_several_chunks(backend, x_dtype, ref_dtype, sigma, monkeypatch):
    """x and ref in different dtypes (the CUDA launcher upcasts both to float64 if either
    is, else to float32), several chunks on the cuda backend."""
    _impl(backend)
    monkeypatch.setattr(stf, "CHUNK_BYTES", 48 * 8 * 64 + 4 * 96 * 64)
    x, s, ref = near_duplicate_case(8, 300, 96, sigma)
    x, s, ref = x.to(x_dtype).cuda(), s.cuda(), ref.to(ref_dtype).cuda()
    t, lse = fastdiff.stf_target(x, s, ref, backend=backend, return_lse=True)
    assert t.dtype == x_dtype
    assert_contract(t, x, s, ref)
    assert_lse(lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_offset_pointers(backend):
    """Inputs and outputs that start at odd element offsets (4-byte but not 16-byte aligned)."""
    impl = _impl(backend)
    B, N, D = 7, 123, 47
    x, s, ref = near_duplicate_case(B, N, D, 0.02)
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()

    def at_offset(t, off, fill=None):
        buf = torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)
        v = buf[off:].view(t.shape)
        v.copy_(t) if fill is None else v.fill_(fill)
        return v

    xo, so, ro = at_offset(x, 1), at_offset(s, 3), at_offset(ref, 5)
    t, lse = at_offset(x, 3, float("nan")), at_offset(s.double(), 1, float("nan"))
    impl(xo, so, ro, "highest", t, lse)
    torch.cuda.synchronize()
    assert torch.isfinite(t).all() and torch.isfinite(lse).all()
    _check(t, lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_runs_on_the_current_stream(backend):
    """Every launch and workspace allocation on torch's current stream: inputs finished
    late on a side stream (after a sleep) are read only after they are written."""
    impl = _impl(backend)
    B, N, D = 32, 2048, 512
    x, s, ref = near_duplicate_case(B, N, D, 0.02)
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ref_late = torch.full_like(ref, float("nan"))
        torch.cuda._sleep(200_000_000)          # ~0.1 s of GPU time before ref_late is written
        ref_late.copy_(ref)
        t = torch.full_like(x, float("nan"))
        lse = torch.full((B,), float("nan"), dtype=torch.float64, device=x.device)
        impl(x, s, ref_late, "highest", t, lse)
    side.synchronize()
    assert torch.isfinite(t).all() and torch.isfinite(lse).all()
    _check(t, lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_a_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the launcher's device guard."""
    impl = _impl(backend)
    x, s, ref = near_duplicate_case(7, 1023, 300, 0.02)
    x, s, ref = x.to("cuda:1"), s.to("cuda:1"), ref.to("cuda:1")
    with torch.cuda.device(0):
        t = torch.full_like(x, float("nan"))
        lse = torch.full((7,), float("nan"), dtype=torch.float64, device=x.device)
        impl(x, s, ref, "highest", t, lse)
        torch.cuda.synchronize(1)
    assert t.device == x.device and torch.isfinite(t).all() and torch.isfinite(lse).all()
    _check(t, lse, x, s, ref)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bitwise_reproducible(backend):
    """Two runs give the same bits (the CUDA row kernel lists flagged entries in thread
    order, so its float64 sums over them have a fixed order)."""
    x, s, ref = near_duplicate_case(16, 3000, 768, torch.tensor([0.002, 0.05, 5.0, 30.0]).repeat(4))
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    t1, lse1 = _run_poisoned(backend, x, s, ref)
    t2, lse2 = _run_poisoned(backend, x, s, ref)
    assert torch.equal(t1, t2) and torch.equal(lse1, lse2)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_features(backend):
    """x of shape (B, 0): lse = log N. The public function answers it before any kernel;
    the CUDA launcher answers it too (its grids would have a zero dimension)."""
    impl = _impl(backend)
    x, ref = torch.rand(3, 0, device="cuda"), torch.rand(5, 0, device="cuda")
    t, lse = fastdiff.stf_target(x, 0.5, ref, backend=backend, return_lse=True)
    assert t.shape == (3, 0)
    log5 = torch.full((3,), math.log(5.0), dtype=torch.float64, device="cuda")
    torch.testing.assert_close(lse, log5)
    if backend == "cuda":
        lse = torch.full((3,), float("nan"), dtype=torch.float64, device="cuda")
        impl(x, torch.full((3,), 0.5, device="cuda"), ref, "highest", torch.empty_like(x), lse)
        torch.testing.assert_close(lse, log5)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("D", [3072, 16384])
@pytest.mark.parametrize("sigma", [0.002, 0.02, 0.5])
def test_highest_mean_offset_data(backend, D, sigma):
    """The full-size cases shifted by +8: the same distances, but ||x||^2 ~ 64 D, where
    the expansion cancels worst and the tensor cores' accumulation error is largest.
    Data this far outside [-1, 1] puts t's own float32 rounding (ulp(8) ~ 1e-6) at
    ~1.4e-4 noise units at sigma = 0.002 (the cpu backend measures 1.1e-4), so the
    contract is checked on top of twice that rounding."""
    x, s, ref = near_duplicate_case(64, 1024, D, sigma)
    x, s, ref = (x + 8.0).cuda(), s.cuda(), (ref + 8.0).cuda()
    t, lse = _run_poisoned(backend, x, s, ref)
    t64, lse64 = oracle(x, s, ref)
    rounding = (t64.float().double() - t64).norm(dim=1)
    got = (t.double() - t64).norm(dim=1)
    allowed = CONTRACT * s.double() * math.sqrt(D) + 2.0 * rounding
    assert (got <= allowed).all(), f"max err {row_err(t, t64, s).max().item():.3g} beyond contract + rounding"
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-6, atol=1e-5)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["randn", "positive", "offset"])
@pytest.mark.parametrize("D", [1, 7, 48, 300, 3072, 12288, 16384])
def test_gemm_error_within_the_flag_bound(backend, kind, D):
    """The premise of the flag rule on real tensor cores: the logit GEMM's error is within
    the bound the kernels use, e = 2 (gemm_gamma(D) + TF32X3_EXTRA) (||r||^2 + 2 ||x|| ||r||)
    / (2 sigma^2) (tests/test_stf.py checks gemm_gamma for IEEE fp32 GEMMs on CPU only;
    tensor cores accumulate with their own rounding). With N = 1 and no re-evaluation
    ("tf32x3"), lse_i = g_i - ||x_i||^2 / (2 sigma^2) carries g_i's GEMM error unchanged."""
    from fastdiff.kernels.stf import TF32X3_EXTRA
    B = 512
    r = {"randn": torch.randn(1, D), "positive": torch.rand(1, D), "offset": torch.rand(1, D) * 2 - 1 + 8.0}[kind]
    x = r + torch.randn(B, D)                   # sigma = 1: near r, the cancelling case
    x, r = x.cuda(), r.cuda()
    s = torch.ones(B, device="cuda")
    _, lse = _run_poisoned(backend, x, s, r, precision="tf32x3")
    _, lse64 = oracle(x, s, r)
    x64, r64 = x.double(), r.double()
    gamma = 2.0 * (stf.gemm_gamma(D) + TF32X3_EXTRA)
    bound = gamma * ((r64 * r64).sum() + 2.0 * x64.norm(dim=1) * r64.norm()) * 0.5
    err = (lse.double() - lse64).abs()
    ratio = (err / bound).max().item()
    print(f"{backend} {kind} D={D}: max GEMM error / bound = {ratio:.3g}")
    assert (err <= bound + 2.0 ** -23 * lse64.abs()).all(), f"GEMM error {ratio:.3g}x the flag bound"


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("precision", ["highest", "tf32x3"])
@pytest.mark.parametrize("where", ["x", "ref"])
def test_nan_data_gives_nan(backend, precision, where):
    """NaN data reaches the kernels when value checks are off (FASTDIFF_CHECK_VALUES=0,
    torch.compile): the row of a NaN x, or every row for a NaN reference row, comes out
    NaN, never a finite wrong number (the combine once turned a NaN sum into t = 0)."""
    impl = _impl(backend)
    x, s, ref = near_duplicate_case(7, 1023, 3071, torch.tensor(SIGMAS + SIGMAS[:2]))
    (x[1] if where == "x" else ref[500])[3] = float("nan")
    x, s, ref = x.cuda(), s.cuda(), ref.cuda()
    t = torch.zeros_like(x)
    lse = torch.zeros(7, dtype=torch.float64, device="cuda")
    impl(x, s, ref, precision, t, lse)
    want = torch.zeros(7, dtype=torch.bool)
    want[1] = True
    if where == "ref":
        want[:] = True
    assert torch.equal(t.isnan().all(1).cpu(), want) and torch.equal(lse.isnan().cpu(), want)


# ----------------------------------------------------------------------------
# labels / ref_labels and ref_logw (issue 13)
# ----------------------------------------------------------------------------

def _terms_case(B, N, D, seed=0):
    """Mixed sigma, each source's near-duplicate (distance ~sigma) in another class, exact
    duplicates, log-weights over +-3 with every 7th row excluded (never a source), and a class
    (9) whose rows all sit at the end of ref (late chunks and splits only)."""
    torch.manual_seed(seed)
    s = torch.tensor(SIGMAS).repeat(B // len(SIGMAS) + 1)[:B]
    x, _, ref = near_duplicate_case(B, N, D, s)
    ref[N - 8:] = ref[:8]
    x = ref[:B] + s[:, None] * torch.randn(B, D)
    ref_labels = torch.randint(0, 4, (N,))
    n_dup = min(B, N - B)
    ref_labels[B:B + n_dup] = (ref_labels[:n_dup] + 1) % 4
    ref_labels[N - 64:] = 9
    labels = ref_labels[:B].clone()
    labels[B - 2:] = 9
    ref_logw = 3.0 * torch.randn(N, dtype=torch.float64)
    ref_logw[::7] = -math.inf
    ref_logw[:B] = 0.0
    terms = dict(labels=labels.cuda(), ref_labels=ref_labels.cuda(), ref_logw=ref_logw.cuda())
    return x.cuda(), s.cuda(), ref.cuda(), terms


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["labels", "ref_logw", "both"])
@pytest.mark.parametrize("B,N,D", [(64, 4096, 3072), (7, 1023, 3071), (128, 50000, 768)])
def test_terms_highest(backend, kind, B, N, D):
    x, s, ref, terms = _terms_case(B, N, D)
    kw = {k: v for k, v in terms.items() if (k == "ref_logw") == (kind == "ref_logw") or kind == "both"}
    t, lse = _run_poisoned(backend, x, s, ref, **kw)
    _check(t, lse, x, s, ref, **kw)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_terms_row_without_reference(backend):
    """The kernel contract: a row that no reference row serves gets t = 0 and lse = -inf (the
    public function raises before); the other rows are unaffected."""
    x, s, ref, terms = _terms_case(16, 3000, 768, seed=1)
    terms["labels"][5] = 42
    t, lse = _run_poisoned(backend, x, s, ref, finite=False, **terms)
    assert torch.equal(t[5], torch.zeros_like(t[5])) and lse[5].item() == -math.inf
    keep = [i for i in range(16) if i != 5]
    assert torch.isfinite(t[keep]).all() and torch.isfinite(lse[keep]).all()
    _check(t[keep], lse[keep], x[keep], s[keep], ref, **dict(terms, labels=terms["labels"][keep]))
    with pytest.raises(ValueError, match="row 5 has label 42"):
        fastdiff.stf_target(x, s, ref, backend=backend, **terms)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_terms_public_api(backend, dtype):
    x, s, ref, terms = _terms_case(32, 2048, 1024, seed=2)
    x, ref = x.to(dtype), ref.to(dtype)
    t, lse = fastdiff.stf_target(x, s, ref, labels=terms["labels"].int(), ref_labels=terms["ref_labels"].short(),
                                 ref_logw=terms["ref_logw"].float(), backend=backend, return_lse=True)
    assert t.dtype == dtype
    kw = dict(terms, ref_logw=terms["ref_logw"].float())
    assert_contract(t, x, s, ref, **kw)
    assert_lse(lse, x, s, ref, **kw)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("sigma", [1e-30, 1.2e-38])
def test_sigma_down_to_the_smallest_normal_float32(backend, sigma):
    # The GEMM part is scaled by 1/(2 sigma^2) in float64: in fp32 it overflowed below ~4e-20.
    ref = torch.rand(300, 256, device="cuda") * 2 - 1
    x = ref[:8].clone()
    t = fastdiff.stf_target(x, sigma, ref, backend=backend)
    torch.testing.assert_close(t, ref[:8], rtol=0, atol=0)
