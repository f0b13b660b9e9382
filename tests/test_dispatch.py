"""The dispatch table and backend availability (fastdiff/ops/_dispatch.py)."""
import importlib

import pytest
import torch

import fastdiff
from fastdiff.ops import _dispatch


def test_available_backends_reports_every_backend_with_a_reason():
    status = fastdiff.available_backends()
    assert set(status) == set(_dispatch.BACKENDS)
    assert status["torch"].available
    for name, st in status.items():
        assert isinstance(st.available, bool)
        assert st.reason, f"backend {name} gives no reason"


def test_available_backends_for_a_device():
    status = fastdiff.available_backends("cpu")
    assert status["torch"].available
    assert not status["cuda"].available and "cuda" in status["cuda"].reason


@pytest.mark.parametrize("op", sorted(_dispatch.TABLE))
def test_table_entries_name_real_functions(op):
    # Every entry whose module imports here must name a callable; Triton modules
    # may be unimportable without triton, which available_backends reports.
    for backend, path in _dispatch.TABLE[op].items():
        assert backend in _dispatch.BACKENDS, (op, backend)
        module, _, name = path.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            if backend == "triton" and _dispatch._triton_import_error():
                continue
            raise AssertionError(f"{op}/{backend}: {path} does not import: {exc}")
        assert callable(getattr(mod, name, None)), f"{op}/{backend}: {path} is not a function"


def test_every_op_has_a_torch_backend():
    for op, impls in _dispatch.TABLE.items():
        assert "torch" in impls, op


def test_auto_on_cpu_prefers_the_extension_when_built():
    name, _ = _dispatch.resolve("stf_target", "auto", "cpu")
    expected = "cpu" if _dispatch.backend_status("cpu", "cpu", "stf_target").available else "torch"
    assert name == expected


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.resolve("stf_target", "metal", "cpu")


def test_unavailable_backend_by_name_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="cuda"):
        _dispatch.resolve("stf_target", "cuda", "cpu")


# ---- backend="auto" by measured size (AUTO_BY_SIZE; empty until a GPU run fills it)

def test_auto_by_size_entries_are_well_formed():
    # Filled from benchmarks/auto_table.py's output only (empty until a GPU run); each entry
    # names a real op, device type, precision and backend, at a (B, N, D) size.
    from fastdiff.ops import stf
    for op, by_device in _dispatch.AUTO_BY_SIZE.items():
        assert op in _dispatch.TABLE
        for device_type, by_precision in by_device.items():
            assert device_type in _dispatch.AUTO
            for precision, rows in by_precision.items():
                assert precision in stf.PRECISIONS
                for size, backend in rows:
                    assert len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)
                    assert backend in _dispatch.TABLE[op]


def test_auto_by_size_without_entries_keeps_the_auto_order(monkeypatch):
    monkeypatch.setattr(_dispatch, "AUTO_BY_SIZE", {})
    assert _dispatch.auto_by_size("stf_target", "cuda", "highest", (64, 1024, 3072)) == "auto"


def test_auto_by_size_takes_the_nearest_measured_entry(monkeypatch):
    table = {"stf_target": {"cpu": {"highest": [((64, 1024, 3072), "torch"), ((512, 50000, 3072), "cpu")]}}}
    monkeypatch.setattr(_dispatch, "AUTO_BY_SIZE", table)
    assert _dispatch.auto_by_size("stf_target", "cpu", "highest", (32, 900, 3072)) == "torch"
    assert _dispatch.auto_by_size("stf_target", "cpu", "highest", (512, 20000, 2048)) == "cpu" \
        or not _dispatch.backend_status("cpu", "cpu", "stf_target").available
    assert _dispatch.auto_by_size("stf_target", "cpu", "tf32", (32, 900, 3072)) == "auto"     # not measured
    assert _dispatch.auto_by_size("stf_target", "cuda", "highest", (32, 900, 3072)) == "auto"
    assert _dispatch.auto_by_size("weighted_mse", "cpu", "highest", (32, 900, 3072)) == "auto"


def test_auto_by_size_skips_an_unavailable_choice(monkeypatch):
    table = {"stf_target": {"cpu": {"highest": [((64, 1024, 3072), "cuda")]}}}
    monkeypatch.setattr(_dispatch, "AUTO_BY_SIZE", table)
    assert not _dispatch.backend_status("cuda", "cpu", "stf_target").available
    assert _dispatch.auto_by_size("stf_target", "cpu", "highest", (64, 1024, 3072)) == "auto"


@pytest.fixture
def torch_backend_calls(monkeypatch):
    """A spy in the torch backend's place in the dispatch table; returns the list of its calls
    as (x's shape, precision)."""
    from fastdiff.ops import stf
    calls = []

    def spy(x, sigma, ref, precision, t_out, lse_out):
        calls.append((x.shape, precision))
        stf.stf_target_torch(x, sigma, ref, precision, t_out, lse_out)

    monkeypatch.setattr(stf, "_spy_backend", spy, raising=False)
    monkeypatch.setitem(_dispatch.TABLE, "stf_target", {**_dispatch.TABLE["stf_target"],
                                                        "torch": "fastdiff.ops.stf:_spy_backend"})
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    _dispatch._load.cache_clear()                   # "module:function" -> function is cached
    return calls


def test_stf_target_auto_follows_the_measured_table(monkeypatch, torch_backend_calls):
    # The table's choice is the backend that runs (a spy stands in for the torch backend).
    calls = torch_backend_calls
    monkeypatch.setattr(_dispatch, "AUTO_BY_SIZE",
                        {"stf_target": {"cpu": {"highest": [((3, 10, 12), "torch")]}}})
    x, ref = torch.randn(3, 12), torch.randn(10, 12)
    t = fastdiff.stf_target(x, 0.7, ref)
    assert calls == [(torch.Size([3, 12]), "highest")]
    torch.testing.assert_close(t, fastdiff.stf_target(x, 0.7, ref, backend="torch"))
    assert len(calls) == 2
    monkeypatch.setattr(_dispatch, "AUTO_BY_SIZE", {})          # back to the AUTO order: cpu first
    fastdiff.stf_target(x, 0.7, ref)
    assert len(calls) == 2 + (not _dispatch.backend_status("cpu", "cpu", "stf_target").available)


def test_stf_target_auto_table_under_compile(monkeypatch, torch_backend_calls):
    # Compiled code consults the table when the op runs, not while tracing (no graph break).
    calls = torch_backend_calls
    monkeypatch.setattr(_dispatch, "AUTO_BY_SIZE",
                        {"stf_target": {"cpu": {"highest": [((5, 9, 6), "torch")]}}})
    torch._dynamo.reset()
    fn = torch.compile(lambda x, ref: fastdiff.stf_target(x, 0.5, ref) * 2, fullgraph=True)
    x, ref = torch.randn(5, 6), torch.randn(9, 6)
    torch.testing.assert_close(fn(x, ref), 2 * fastdiff.stf_target(x, 0.5, ref, backend="cpu"
                               if _dispatch.backend_status("cpu", "cpu", "stf_target").available else "torch"))
    assert (torch.Size([5, 6]), "highest") in calls
