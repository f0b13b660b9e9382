"""The dispatch table: which function implements which op on which backend.

This is the only place that maps (op, backend) to code. Backends:

- ``torch``:  plain PyTorch, any device; the reference and the fallback.
- ``cpu``:    C++ kernels in csrc/cpu, op ``torch.ops.fastdiff_ext.<op>`` (CPU key).
- ``triton``: Triton kernels in kernels/ (CUDA, or CPU under TRITON_INTERPRET=1).
- ``cuda``:   CUDA kernels in csrc/cuda, op ``torch.ops.fastdiff_ext.<op>`` (CUDA key).

``backend="auto"`` tries ``AUTO[device_type]`` in order and takes the first
backend that is available for that op on that device.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from typing import Callable, NamedTuple

import torch

from fastdiff import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")

# op -> backend -> "module:function"
TABLE: dict[str, dict[str, str]] = {
    "stf_target": {
        "torch": "fastdiff.ops.stf:stf_target_torch",
        "cpu": "fastdiff.ops.stf:stf_target_ext",
        "cuda": "fastdiff.ops.stf:stf_target_ext",
        "triton": "fastdiff.kernels.stf:stf_target_triton",
    },
    "weighted_mse": {
        "torch": "fastdiff.ops.weighted_mse:weighted_mse_torch",
        "cpu": "fastdiff.ops.weighted_mse:weighted_mse_ext",
        "cuda": "fastdiff.ops.weighted_mse:weighted_mse_ext",
        "triton": "fastdiff.kernels.weighted_mse:weighted_mse_triton",
    },
    # Sampler step ops (fastdiff.ops.sampler_steps) are added here by name.
    "sampler_affine": {
        "torch": "fastdiff.ops.sampler_steps:sampler_affine_torch",
        "cpu": "fastdiff.ops.sampler_steps:sampler_affine_ext",
        "cuda": "fastdiff.ops.sampler_steps:sampler_affine_ext",
        "triton": "fastdiff.kernels.sampler_steps:sampler_affine_triton",
    },
    "heun_correct": {
        "torch": "fastdiff.ops.sampler_steps:heun_correct_torch",
        "cpu": "fastdiff.ops.sampler_steps:heun_correct_ext",
        "cuda": "fastdiff.ops.sampler_steps:heun_correct_ext",
        "triton": "fastdiff.kernels.sampler_steps:heun_correct_triton",
    },
}

# device type -> backends tried by backend="auto", fastest first.
AUTO: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

# backend="auto" by size and precision, for ops whose fastest backend depends on them
# (stf_target on CUDA): op -> device type -> precision -> [((B, N, D), backend), ...], from
# figures measured on that device. `python benchmarks/auto_table.py` prints the entries from
# the JSON that benchmarks/gpu_run.sh writes; a call takes the entry nearest its size (in log
# scale). Empty until measured: the Triton and CUDA kernels have not run on a GPU yet, so
# "auto" keeps the fixed order of AUTO, and no guess stands in for a measurement.
AUTO_BY_SIZE: dict[str, dict[str, dict[str, list[tuple[tuple[int, ...], str]]]]] = {}


def auto_by_size(op: str, device_type: str, precision: str, size: tuple[int, ...]) -> str:
    """The measured backend for `op` at `size` and `precision` on `device_type`: the entry of
    AUTO_BY_SIZE nearest in log size, or "auto" (the AUTO order) where nothing was measured
    or the measured backend is unavailable here."""
    rows = AUTO_BY_SIZE.get(op, {}).get(device_type, {}).get(precision)
    if not rows:
        return "auto"

    def distance(row):
        return sum(abs(math.log(max(a, 1) / max(b, 1))) for a, b in zip(row[0], size))

    choice = min(rows, key=distance)[1]
    try:
        resolve(op, choice, device_type)        # cached: a dict lookup per call once it has run
    except RuntimeError:                        # measured elsewhere, unavailable here
        return "auto"
    return choice


class BackendStatus(NamedTuple):
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_status(backend: str, device_type: str, op: str | None = None) -> BackendStatus:
    """Whether `backend` can run `op` (or any op, if None) on tensors of `device_type`."""
    if backend == "torch":
        return BackendStatus(True, "plain PyTorch, always available")
    if backend in ("cpu", "cuda"):
        want = "cpu" if backend == "cpu" else "cuda"
        if device_type != want:
            return BackendStatus(False, f"the '{backend}' backend runs on {want} tensors, got {device_type}")
        if _ext.LOAD_ERROR is not None:
            return BackendStatus(False, _ext.LOAD_ERROR)
        key = "CPU" if backend == "cpu" else "CUDA"
        probe = op or "stf_target"
        if not _ext.has_kernel(probe, key):
            why = ("the extension was built without CUDA kernels (no nvcc or a CPU build of torch "
                   "at build time, or FASTDIFF_NO_CUDA=1)") if key == "CUDA" else "no C++ kernel registered"
            return BackendStatus(False, f"fastdiff_ext::{probe} has no {key} kernel: {why}")
        if backend == "cuda" and not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device is visible to torch")
        return BackendStatus(True, f"C++ extension, {key} kernels")
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return BackendStatus(False, err)
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return BackendStatus(False, "no CUDA device is visible to torch")
            return BackendStatus(True, "Triton kernels on CUDA")
        if device_type == "cpu":
            if _interpreting():
                return BackendStatus(True, "Triton kernels in the interpreter (TRITON_INTERPRET=1)")
            return BackendStatus(False, "Triton runs on CPU tensors only in its interpreter: "
                                        "set TRITON_INTERPRET=1 before importing triton")
        return BackendStatus(False, f"Triton does not run on {device_type} tensors")
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def available_backends(device: str | torch.device | None = None) -> dict[str, BackendStatus]:
    """What runs here, and why the rest does not.

    With `device` (e.g. "cpu", "cuda"), the answer is for tensors on that
    device; without it, each backend is judged on its natural device (the
    `cpu` backend on CPU, `cuda` and `triton` on CUDA if a GPU is present).
    """
    out = {}
    for b in BACKENDS:
        if device is not None:
            dt = torch.device(device).type
        elif b == "cpu" or b == "torch":
            dt = "cpu"
        elif b == "triton" and not torch.cuda.is_available() and _interpreting():
            dt = "cpu"
        else:
            dt = "cuda"
        out[b] = backend_status(b, dt)
    return out


@functools.lru_cache(maxsize=None)
def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def check_backend(backend: str) -> None:
    """ValueError unless `backend` is "auto" or one of BACKENDS."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


# Successful resolutions: (op, backend, device type) -> (answer, the extension's
# load error then, TRITON_INTERPRET then or None). The answer depends on
# nothing else that can change while a process runs (has_kernel and a visible
# GPU are fixed once torch and the extension are loaded), and on
# TRITON_INTERPRET only where the Triton backend on CPU was a candidate, so
# only those entries read the environment again. Failures are never cached:
# an unavailable backend raises its RuntimeError, with the reason, on every
# call. Whoever edits TABLE or AUTO at run time calls _RESOLVED.clear().
_RESOLVED: dict[tuple[str, str, str], tuple[tuple[str, Callable], str | None, str | None]] = {}


def resolve(op: str, backend: str, device_type: str) -> tuple[str, Callable]:
    """The (backend name, implementation) that runs `op` for `backend` on `device_type`.

    Raises ValueError for an unknown backend and RuntimeError, with the
    reason, for a known backend that cannot run here. Called on every op
    call: the answer is cached (see _RESOLVED).
    """
    hit = _RESOLVED.get((op, backend, device_type))
    if (hit is not None and hit[1] is _ext.LOAD_ERROR
            and (hit[2] is None or hit[2] == os.environ.get("TRITON_INTERPRET", ""))):
        return hit[0]
    answer = _resolve(op, backend, device_type)
    cands = AUTO.get(device_type, ("torch",)) if backend == "auto" else (backend,)
    env = os.environ.get("TRITON_INTERPRET", "") if device_type == "cpu" and "triton" in cands else None
    _RESOLVED[(op, backend, device_type)] = (answer, _ext.LOAD_ERROR, env)
    return answer


def _resolve(op: str, backend: str, device_type: str) -> tuple[str, Callable]:
    impls = TABLE[op]
    if backend == "auto":
        for cand in AUTO.get(device_type, ("torch",)):
            if cand in impls and backend_status(cand, device_type, op).available:
                return cand, _load(impls[cand])
        return "torch", _load(impls["torch"])
    check_backend(backend)
    if backend not in impls:
        raise RuntimeError(f"op {op!r} has no {backend!r} backend; available: {sorted(impls)}")
    status = backend_status(backend, device_type, op)
    if not status.available:
        raise RuntimeError(f"backend={backend!r} is unavailable for {op} on {device_type}: {status.reason}")
    return backend, _load(impls[backend])
