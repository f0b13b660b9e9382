"""Prints the ratio report (benchmarks/report.py) at the end of a benchmark run.

    pytest benchmarks/ --benchmark-only
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import report  # noqa: E402  (benchmarks/report.py)


@pytest.fixture
def one_thread():
    """CPU peers run single-threaded: at small sizes intra-op threads on a shared machine add
    millisecond-scale synchronization noise that swamps the call being timed."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


_LOAD: dict = {}


def _loadavg() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def pytest_sessionstart(session):
    _LOAD.update(start=_loadavg(), cpus=os.cpu_count())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The run's load average at its start and end go into --benchmark-json (report.py prints them)."""
    output_json["load"] = dict(_LOAD, end=_loadavg())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    data = {
        "machine_info": getattr(session, "machine_info", None) or {},
        "load": dict(_LOAD, end=_loadavg()),
        "benchmarks": [b.as_dict(include_data=False) for b in session.benchmarks if b.has_error is False],
    }
    terminalreporter.write_sep("=", "fastdiff ratios (median; x faster = vs published/eager; x floor = vs floor)")

    class _Out:
        def write(self, s):
            terminalreporter.write(s)

    report.report(data, out=_Out())
    terminalreporter.write("\n")
