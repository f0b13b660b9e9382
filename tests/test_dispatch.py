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
