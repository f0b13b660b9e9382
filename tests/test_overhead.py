"""The low-overhead call paths of the ops (ops/_library.py, the cache in
_dispatch.resolve, the public wrappers' fast paths) behave like the slow ones.

The timings are in benchmarks/test_overhead_bench.py; nothing here is timed.
"""
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastdiff
from fastdiff.ops import _dispatch, _library
from fastdiff.ops import sampler_steps as steps

stf = sys.modules["fastdiff.ops.stf"]
wmse = sys.modules["fastdiff.ops.weighted_mse"]


def _stf_inputs(B=3, N=5, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.rand(B, generator=g) + 0.5, torch.randn(N, D, generator=g)


# ----------------------------------------------------------------------------
# _dispatch.resolve cache
# ----------------------------------------------------------------------------

def test_resolve_is_cached_and_agrees_with_the_uncached_answer():
    for op in _dispatch.TABLE:
        first = _dispatch.resolve(op, "auto", "cpu")
        assert _dispatch.resolve(op, "auto", "cpu") is first
        assert first == _dispatch._resolve(op, "auto", "cpu")


def test_unavailable_backend_raises_on_every_call():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    messages = set()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="cuda") as exc:
            _dispatch.resolve("stf_target", "cuda", "cpu")
        messages.add(str(exc.value))
    assert len(messages) == 1
    with pytest.raises(RuntimeError, match="unavailable"):
        fastdiff.stf_target(*_stf_inputs(), backend="cuda")


def test_resolve_follows_triton_interpret(monkeypatch):
    if _dispatch._triton_import_error():
        pytest.skip("triton is not importable")
    # A fresh cache, and no Triton kernel import in this process (TRITON_INTERPRET
    # must be set before that): the implementation is a stand-in.
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    monkeypatch.setattr(_dispatch, "_load", lambda path: path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.resolve("stf_target", "triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve("stf_target", "triton", "cpu")[0] == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.resolve("stf_target", "triton", "cpu")


def test_resolve_follows_the_extension_load_error(monkeypatch):
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    monkeypatch.setattr(_dispatch._ext, "LOAD_ERROR", "pretend the extension did not load")
    with pytest.raises(RuntimeError, match="pretend the extension"):
        _dispatch.resolve("weighted_mse", "cpu", "cpu")
    assert _dispatch.resolve("weighted_mse", "auto", "cpu")[0] == "torch"


# ----------------------------------------------------------------------------
# when the kernel may be called directly
# ----------------------------------------------------------------------------

def test_plain_eager():
    x = torch.randn(3)
    assert _library.plain_eager(x, x)
    assert not _library.plain_eager(x, torch.randn(3, requires_grad=True))
    assert not _library.plain_eager(torch.nn.Parameter(torch.randn(3)))
    with torch.device("cpu"):                       # a torch-function mode
        assert not _library.plain_eager(x)
    with FakeTensorMode():
        assert not _library.plain_eager(x)
    assert not torch.func.vmap(lambda t: torch.tensor(float(_library.plain_eager(t))))(torch.randn(2, 3)).any()


def test_stf_target_under_fake_tensor_mode_uses_the_fake_impl(monkeypatch):
    monkeypatch.setenv("FASTDIFF_CHECK_VALUES", "0")    # value checks read data, which fake tensors lack
    with FakeTensorMode():
        x, s, ref = torch.randn(3, 2, 2), torch.ones(3), torch.randn(5, 2, 2)
        t, lse = fastdiff.stf_target(x, s, ref, return_lse=True)
    assert t.shape == (3, 2, 2) and lse.shape == (3,) and lse.dtype == torch.float64


def test_direct_and_dispatched_calls_agree():
    x, s, ref = _stf_inputs(4, 9, 6)
    for backend in ("torch", "cpu"):
        if not _dispatch.backend_status(backend, "cpu", "stf_target").available:
            continue
        t, lse = fastdiff.stf_target(x, s, ref, backend=backend, return_lse=True)
        t_op, lse_op = torch.ops.fastdiff.stf_target.default(x, s, ref, "highest", backend)
        torch.testing.assert_close(t, t_op, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_op, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_non_differentiable_ops_take_inputs_that_require_grad(backend):
    if not _dispatch.backend_status(backend, "cpu", "stf_target").available:
        pytest.skip(f"{backend} unavailable")
    x, s, ref = _stf_inputs()
    xg, refg = x.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    t, lse = torch.ops.fastdiff.stf_target.default(xg, s, refg, "highest", backend)
    assert not t.requires_grad and not lse.requires_grad
    torch.testing.assert_close(t, fastdiff.stf_target(x, s, ref, backend=backend), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fastdiff.stf_target.default, (xg, s, refg, "highest", backend))
    u = torch.randn(3, 4, requires_grad=True)
    out = torch.ops.fastdiff.sampler_affine.default(u, u, None, 0.5, 2.0, 0.0, backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, 2.5 * u.detach())
    torch.library.opcheck(steps._sampler_affine_op, (u, u, None, 0.5, 2.0, 0.0, backend))


# ----------------------------------------------------------------------------
# cheaper checks, same errors
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sigma_rows_checked(bad, backend):
    if not _dispatch.backend_status(backend, "cpu", "stf_target").available:
        pytest.skip(f"{backend} unavailable")
    x, s, ref = _stf_inputs()
    s[1] = bad
    with pytest.raises(ValueError, match="sigma must be positive and finite in every row"):
        fastdiff.stf_target(x, s, ref, backend=backend)
    s[0] = float("inf") if bad == 0.0 else 0.0      # -inf + inf in the sum of logs
    with pytest.raises(ValueError, match="sigma must be positive and finite in every row"):
        fastdiff.stf_target(x, s, ref, backend=backend)


@pytest.mark.parametrize("name", ["x", "ref"])
def test_data_checked_in_one_read_back_names_the_culprit(name):
    x, s, ref = _stf_inputs()
    (x if name == "x" else ref)[1, 2] = float("nan")
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        fastdiff.stf_target(x, s, ref, backend="torch")
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        fastdiff.stf_weights(x, s, ref)
    s[0] = -1.0                                      # sigma is named first, as before
    with pytest.raises(ValueError, match="sigma"):
        fastdiff.stf_target(x, s, ref, backend="torch")


def test_finite_data_whose_row_norms_overflow_float32_is_named():
    # Issue 12 item 10: rows whose squared norm is beyond float32 (the distance GEMMs run in
    # float32) raise naming the argument and row; tests/test_stf.py has the other backends,
    # and data whose total norm (not a row's) passes the bound is accepted there.
    x = torch.full((2, 4), 3e38)
    with pytest.raises(ValueError, match="x row 0 has squared norm"):
        fastdiff.stf_target(x, 1e38, x.clone(), backend="torch")


def test_empty_batch_with_per_row_sigma():
    x, _, ref = _stf_inputs()
    t, lse = fastdiff.stf_target(x[:0], torch.ones(0), ref, return_lse=True)
    assert t.shape == (0, 4) and lse.shape == (0,)


def test_sigma_shapes_give_the_same_target():
    x, s, ref = _stf_inputs()
    want = fastdiff.stf_target(x, s, ref)
    for sig in (s.double(), s[:, None], s[:, None, None]):
        torch.testing.assert_close(fastdiff.stf_target(x, sig, ref), want, rtol=0, atol=0)
    x4, ref4 = x.reshape(3, 1, 2, 2), ref.reshape(5, 1, 2, 2)
    torch.testing.assert_close(fastdiff.stf_target(x4, s, ref4), want.reshape(3, 1, 2, 2), rtol=0, atol=0)


def test_weighted_mse_per_sample_weight_matches_the_broadcast_form():
    g = torch.Generator().manual_seed(3)
    for shape in ((5, 7), (1, 7), (4, 3, 2, 2)):
        pred = torch.randn(shape, generator=g, requires_grad=True)
        target = torch.randn(shape, generator=g)
        w = torch.rand(shape[0], generator=g)
        loss = fastdiff.weighted_mse(pred, target, w)
        (grad,) = torch.autograd.grad(loss, pred)
        wb = w.reshape((-1,) + (1,) * (len(shape) - 1))
        loss_b = fastdiff.weighted_mse(pred, target, wb)
        (grad_b,) = torch.autograd.grad(loss_b, pred)
        assert torch.equal(loss, loss_b) and torch.equal(grad, grad_b)
