"""Shared test settings.

Triton interpreter tests set TRITON_INTERPRET=1 in a subprocess of their own
(the variable must be set before triton is imported), so this process keeps
the normal Triton backend.
"""
import os
import tempfile
import zlib

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":      # the interpreter subprocesses
    from _triton_compat import patch_triton_interpreter
    patch_triton_interpreter()

# One inductor cache for the whole run: compiled graphs are reused across tests.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastdiff-inductor"))


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh but reproducible inputs per test: the seed comes from the test's name.
    name = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    torch.manual_seed(zlib.crc32(name.encode()))
    yield
