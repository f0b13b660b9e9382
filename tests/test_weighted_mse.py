"""fastdiff.weighted_mse: forward and gradient against float64 on every backend.

Triton runs on CPU only in its interpreter, which must be switched on before
triton is imported: when this process was not started with TRITON_INTERPRET=1,
test_triton_interpreter reruns the triton-cpu cases in a subprocess that is.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff.ops import _dispatch
from fastdiff.ops.weighted_mse import _prepare, _weighted_mse_op, acc_dtype

BACKEND_DEVICES = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
                   ("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
IDS = [f"{b}-{d}" for b, d in BACKEND_DEVICES]

# (rtol, atol) per pred dtype. The loss is accumulated in float32 from inputs
# that are exact in float64, so its tolerance is float32's whatever the dtype.
# The gradient is rounded to pred's dtype: a couple of ulps (bf16: the Triton
# interpreter truncates rather than rounds), and fp16's subnormal spacing.
LOSS_TOL = {torch.float32: (2e-5, 1e-12), torch.bfloat16: (2e-5, 1e-12), torch.float16: (2e-5, 1e-12),
            torch.float64: (1e-12, 1e-300)}
GRAD_TOL = {torch.float32: (4e-6, 1e-30), torch.bfloat16: (1e-2, 1e-30), torch.float16: (2e-3, 2.0 ** -24),
            torch.float64: (1e-13, 1e-300)}

# pred shape -> weight shapes: per sample first, then broadcast forms.
CASES = {
    (1,): [(1,), ()],
    (7,): [(7,), ()],
    (47, 31): [(47,), (1, 31), (47, 31), ()],
    (123, 3, 5, 5): [(123,), (1, 3, 1, 1), (123, 3, 1, 1), (5,), (123, 3, 5, 5)],
}
SHAPE_WEIGHTS = [(s, w) for s, ws in CASES.items() for w in ws]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-w{'x'.join(map(str, w)) or '0d'}" for s, w in SHAPE_WEIGHTS]


def _available(backend: str, device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        return False
    return _dispatch.backend_status(backend, device, "weighted_mse").available


def _skip_unavailable(backend: str, device: str) -> None:
    if not _available(backend, device):
        if device == "cpu" and backend == "triton":
            pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (covered by test_triton_interpreter)")
        pytest.skip(f"{backend} on {device}: unavailable here")


def reference(pred, target, weight):
    """float64 loss and gradient of mean(weight * (pred - target)^2), plain PyTorch."""
    p, t, w = pred.double(), target.double(), weight.double()
    if w.dim() == 1 and pred.dim() >= 1 and w.shape[0] == pred.shape[0]:
        w = w.reshape((-1,) + (1,) * (pred.dim() - 1))
    diff = p - t
    return (w * diff * diff).mean(), (2.0 * w * diff / p.numel()).expand_as(p)


def _inputs(shape, wshape, dtype, device, gen, scale=1.0):
    pred = (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)
    target = (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)
    weight = torch.rand(wshape, generator=gen).mul(3.0).to(device)
    return pred, target, weight


def _assert_close(name, got, want, tol):
    rtol, atol = tol
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs()
    bound = rtol * want.abs() + atol
    assert bool((err <= bound).all()), \
        f"{name}: max error {float(err.max()):.3g}, worst ratio to tolerance {float((err / bound).max()):.3g}"


def _run_impl(backend, device, pred, target, weight, need_grad=True):
    """The backend impl called directly, with NaN-poisoned outputs."""
    p2, t2, w2 = _prepare(pred, target, weight)
    _, impl = _dispatch.resolve("weighted_mse", backend, device)
    loss = torch.full((), math.nan, dtype=acc_dtype(p2.dtype), device=device)
    grad = torch.full_like(p2, math.nan) if need_grad else p2.new_empty(0)
    impl(p2, t2, w2, loss, grad, need_grad)
    return loss, grad.reshape(pred.shape) if need_grad else grad


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------
# correctness of every backend
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,wshape", SHAPE_WEIGHTS, ids=SHAPE_IDS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=IDS)
def test_impl_against_float64(backend, device, shape, wshape, dtype, gen):
    _skip_unavailable(backend, device)
    pred, target, weight = _inputs(shape, wshape, dtype, device, gen)
    loss, grad = _run_impl(backend, device, pred, target, weight)
    want_loss, want_grad = reference(pred, target, weight)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype
    _assert_close("loss", loss, want_loss, LOSS_TOL[dtype])
    # Relative to the gradient's scale: entries near zero carry the absolute error of the largest.
    scale = float(want_grad.abs().max())
    rtol, atol = GRAD_TOL[dtype]
    _assert_close("grad", grad, want_grad, (rtol, max(atol, 1e-7 * scale if dtype == torch.float32 else 0.0)))
    # Without the gradient: the loss alone, identical bits.
    loss2, grad2 = _run_impl(backend, device, pred, target, weight, need_grad=False)
    assert grad2.numel() == 0
    assert torch.equal(loss2, loss)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=IDS)
def test_float64_and_mixed_target_dtypes(backend, device, gen):
    _skip_unavailable(backend, device)
    for pdt, tdt in [(torch.float64, torch.float64), (torch.float64, torch.float32),
                     (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                     (torch.float16, torch.bfloat16), (torch.float32, torch.float64)]:
        pred = torch.randn(47, 31, generator=gen).to(pdt).to(device)
        target = torch.randn(47, 31, generator=gen).to(tdt).to(device)
        weight = torch.rand(47, generator=gen, dtype=torch.float64).to(device)
        loss, grad = _run_impl(backend, device, pred, target, weight)
        # A target in neither pred's dtype nor float32 is read converted to float32 (float64).
        read = target if tdt in (pdt, torch.float32) else target.to(acc_dtype(pdt))
        want_loss, want_grad = reference(pred, read, weight)
        assert loss.dtype == acc_dtype(pdt) and grad.dtype == pdt
        _assert_close(f"loss {pdt}/{tdt}", loss, want_loss, LOSS_TOL[pdt])
        _assert_close(f"grad {pdt}/{tdt}", grad, want_grad, GRAD_TOL[pdt])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=IDS)
def test_many_blocks_and_chunks(backend, device, gen):
    # Rows longer and shorter than the kernels' chunks/tiles, weights per row and per element.
    _skip_unavailable(backend, device)
    for shape, wshape in [((3, 20011), (3,)), ((20011,), (20011,)), ((5, 3, 1001), (5, 3, 1))]:
        pred, target, weight = _inputs(shape, wshape, torch.float32, device, gen)
        loss, grad = _run_impl(backend, device, pred, target, weight)
        want_loss, want_grad = reference(pred, target, weight)
        _assert_close("loss", loss, want_loss, (1e-5, 0.0))
        _assert_close("grad", grad, want_grad, (4e-6, 1e-7 * float(want_grad.abs().max())))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=IDS)
def test_zero_weights_and_extreme_values(backend, device, gen):
    _skip_unavailable(backend, device)
    pred, target, _ = _inputs((47, 31), (47,), torch.float32, device, gen)
    loss, grad = _run_impl(backend, device, pred, target, torch.zeros(47, device=device))
    assert float(loss) == 0.0 and bool((grad == 0).all())
    weight = torch.rand(47, generator=gen).to(device)
    weight[::3] = 0.0
    loss, grad = _run_impl(backend, device, pred, target, weight)
    want_loss, want_grad = reference(pred, target, weight)
    _assert_close("loss", loss, want_loss, LOSS_TOL[torch.float32])
    assert bool((grad[::3] == 0).all())
    # pred == target: exactly zero.
    loss, grad = _run_impl(backend, device, pred, pred.clone(), weight)
    assert float(loss) == 0.0 and bool((grad == 0).all())
    # Large and tiny magnitudes: float32 accumulation keeps bf16/fp16 inputs' range.
    for dtype, scale in [(torch.bfloat16, 1e15), (torch.bfloat16, 1e-15), (torch.float16, 200.0),
                         (torch.float32, 1e15), (torch.float32, 1e-15)]:
        pred, target, weight = _inputs((7, 13), (7,), dtype, device, gen, scale=scale)
        loss, grad = _run_impl(backend, device, pred, target, weight)
        want_loss, want_grad = reference(pred, target, weight)
        _assert_close(f"loss x{scale:g}", loss, want_loss, LOSS_TOL[dtype])
        _assert_close(f"grad x{scale:g}", grad, want_grad,
                      (GRAD_TOL[dtype][0], GRAD_TOL[dtype][1] + 1e-6 * float(want_grad.abs().max())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=IDS)
def test_offset_pointers(backend, device, dtype, gen):
    """pred, target and grad starting at odd element offsets (not 16-byte aligned: the
    CUDA kernel's scalar path instead of its vector loads): the same bits as aligned."""
    _skip_unavailable(backend, device)
    pred, target, weight = _inputs((5, 1001), (5,), dtype, device, gen)
    p2, t2, w2 = _prepare(pred, target, weight)
    _, impl = _dispatch.resolve("weighted_mse", backend, device)

    def at_offset(t, off):
        buf = torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)
        v = buf[off:].view(t.shape)
        v.copy_(t)
        return v

    runs = []
    for po, to, go in [(0, 0, 0), (1, 1, 1), (0, 3, 0), (2, 0, 1), (0, 0, 3)]:
        loss = torch.full((), math.nan, dtype=acc_dtype(dtype), device=device)
        grad = at_offset(torch.full_like(p2, math.nan), go)
        impl(at_offset(p2, po), at_offset(t2, to), w2, loss, grad, True)
        runs.append((loss, grad.clone()))
    want_loss, want_grad = reference(pred, target, weight)
    _assert_close("loss", runs[0][0], want_loss, LOSS_TOL[dtype])
    scale = float(want_grad.abs().max())
    rtol, atol = GRAD_TOL[dtype]
    _assert_close("grad", runs[0][1], want_grad.reshape(p2.shape),
                  (rtol, max(atol, 1e-7 * scale if dtype == torch.float32 else 0.0)))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=IDS)
def test_deterministic(backend, device, gen):
    _skip_unavailable(backend, device)
    pred, target, weight = _inputs((5, 3, 1001), (5,), torch.float32, device, gen)
    loss1, grad1 = _run_impl(backend, device, pred, target, weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss2, grad2 = _run_impl(backend, device, pred, target, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)


# ----------------------------------------------------------------------------
# the public function: autograd, argument handling
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=IDS)
def test_autograd_to_pred_only(backend, device, dtype, gen):
    _skip_unavailable(backend, device)
    pred, target, weight = _inputs((123, 3, 5, 5), (123,), dtype, device, gen)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    weight.requires_grad_(True)
    loss = fastdiff.weighted_mse(pred, target, weight, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.requires_grad
    (3.0 * loss).backward()
    want_loss, want_grad = reference(pred.detach(), target.detach(), weight.detach())
    _assert_close("loss", loss.detach(), want_loss, LOSS_TOL[dtype])
    assert pred.grad.dtype == dtype and pred.grad.shape == pred.shape
    rtol, atol = GRAD_TOL[dtype]
    _assert_close("grad", pred.grad, 3.0 * want_grad, (2 * rtol, 3 * atol + 1e-7 * float(want_grad.abs().max())))
    assert target.grad is None and weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saves_only_the_gradient(dtype, gen):
    # The backward keeps one tensor alive: the gradient, in pred's dtype (not pred, target or weight).
    pred, target, weight = _inputs((7, 3, 5), (7,), dtype, "cpu", gen)
    pred.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fastdiff.weighted_mse(pred, target, weight)
    assert len(saved) == 1
    assert saved[0].dtype == dtype and saved[0].numel() == pred.numel()
    _assert_close("saved", saved[0].reshape(pred.shape), reference(pred.detach(), target, weight)[1],
                  GRAD_TOL[dtype])
    loss.backward()


def test_differentiable_once(gen):
    # The inputs are not saved, so there is no second derivative: no silent wrong one either.
    pred, target, weight = _inputs((7, 5), (7,), torch.float64, "cpu", gen)
    pred.requires_grad_(True)
    (g,) = torch.autograd.grad(fastdiff.weighted_mse(pred, target, weight), pred, create_graph=True)
    assert not g.requires_grad
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(s * fastdiff.weighted_mse(pred, target, weight), pred, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_no_graph_without_pred_grad(gen):
    pred, target, weight = _inputs((7, 5), (7,), torch.float32, "cpu", gen)
    target.requires_grad_(True)
    weight.requires_grad_(True)
    assert not fastdiff.weighted_mse(pred, target, weight).requires_grad
    pred.requires_grad_(True)
    with torch.no_grad():
        loss = fastdiff.weighted_mse(pred, target, weight)
    assert not loss.requires_grad
    _assert_close("loss", loss, reference(pred.detach(), target.detach(), weight.detach())[0],
                  LOSS_TOL[torch.float32])


def test_gradient_skipped_when_not_needed(monkeypatch, gen):
    seen = []
    real = torch.ops.fastdiff.weighted_mse.default

    def spy(pred, target, weight, need_grad, backend):
        seen.append(need_grad)
        return real(pred, target, weight, need_grad, backend)

    # (fastdiff.ops.weighted_mse, the attribute, is the function; the module is in sys.modules)
    monkeypatch.setattr(sys.modules["fastdiff.ops.weighted_mse"], "_weighted_mse_op", spy)
    pred, target, weight = _inputs((7, 5), (7,), torch.float32, "cpu", gen)
    fastdiff.weighted_mse(pred, target, weight)
    pred.requires_grad_(True)
    with torch.no_grad():
        fastdiff.weighted_mse(pred, target, weight)
    fastdiff.weighted_mse(pred, target, weight)
    assert seen == [False, False, True]


def test_non_contiguous_and_scalar_weight(gen):
    base = torch.randn(8, 3, 10, 12, generator=gen)
    pred = base.transpose(2, 3)[:, :, ::2].requires_grad_(True)     # a strided view
    assert not pred.is_contiguous()
    target = torch.randn(pred.shape, generator=gen)
    for weight in (0.7, torch.tensor(0.7), torch.full((8,), 0.7)):
        loss = fastdiff.weighted_mse(pred, target, weight)
        (g,) = torch.autograd.grad(loss, pred)
        want_loss, want_grad = reference(pred.detach(), target, torch.tensor(0.7))
        _assert_close("loss", loss.detach(), want_loss, LOSS_TOL[torch.float32])
        _assert_close("grad", g, want_grad, (4e-6, 1e-12))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(7)
    target = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    for weight in (torch.rand(5, generator=gen, dtype=torch.float64),
                   torch.rand(1, 3, 1, generator=gen, dtype=torch.float64)):
        for backend in ("torch", "cpu"):
            if not _available(backend, "cpu"):
                continue
            pred = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(
                lambda p: fastdiff.weighted_mse(p, target, weight, backend=backend), (pred,))


def test_opcheck(gen):
    for backend in ("torch", "cpu"):
        if not _available(backend, "cpu"):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            pred, target, weight = _inputs((7, 13), (7,), dtype, "cpu", gen)
            torch.library.opcheck(_weighted_mse_op, (pred.requires_grad_(True), target, weight, True, backend))
            torch.library.opcheck(_weighted_mse_op, (pred.detach(), target, weight, False, backend))


def test_torch_compile_fullgraph(tmp_path, monkeypatch, gen):
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    x, target, weight = _inputs((6, 2, 3, 4), (6,), torch.float32, "cpu", gen)
    lin = torch.nn.Linear(4, 4)

    def step(x, target, weight):
        return fastdiff.weighted_mse(torch.tanh(lin(x)), target, weight)

    loss_c = torch.compile(step, fullgraph=True)(x, target, weight)
    loss_c.backward()
    grad_c = lin.weight.grad.clone()
    lin.zero_grad()
    loss_e = step(x, target, weight)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad_c, lin.weight.grad, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_bad_arguments():
    p = torch.randn(4, 5)
    with pytest.raises(ValueError, match="target"):
        fastdiff.weighted_mse(p, torch.randn(4, 6), torch.ones(4))
    with pytest.raises(ValueError, match="weight"):
        fastdiff.weighted_mse(p, torch.randn(4, 5), torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        fastdiff.weighted_mse(p, torch.randn(4, 5), torch.ones(2, 4, 5))
    with pytest.raises(TypeError, match="pred"):
        fastdiff.weighted_mse(torch.ones(4, 5, dtype=torch.int64), p, torch.ones(4))
    with pytest.raises(TypeError, match="target"):
        fastdiff.weighted_mse(p, [[0.0] * 5] * 4, torch.ones(4))
    with pytest.raises(TypeError, match="weight"):
        fastdiff.weighted_mse(p, p, torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight"):
        fastdiff.weighted_mse(p, p, "heavy")
    with pytest.raises(ValueError, match="target.*device"):
        fastdiff.weighted_mse(p, torch.randn(4, 5, device="meta"), torch.ones(4))
    with pytest.raises(ValueError, match="weight.*device"):
        fastdiff.weighted_mse(p, p, torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="pred is empty"):
        fastdiff.weighted_mse(torch.randn(0, 5), torch.randn(0, 5), torch.ones(0))
    with pytest.raises(ValueError, match="backend"):
        fastdiff.weighted_mse(p, p, torch.ones(4), backend="fortran")
    with pytest.raises(RuntimeError, match="unavailable"):
        fastdiff.weighted_mse(p, p, torch.ones(4), backend="cuda")


# ----------------------------------------------------------------------------
# Triton in the interpreter
# ----------------------------------------------------------------------------

def test_triton_interpreter():
    """The triton-cpu cases above, in a subprocess with TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets Triton: the triton-cpu cases ran directly")
    if _dispatch._triton_import_error():
        pytest.skip(_dispatch._triton_import_error())
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "triton-cpu and not test_triton_interpreter"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, out
    assert " passed" in out and "skipped" not in out, out
