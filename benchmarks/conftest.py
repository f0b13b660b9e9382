"""Prints the ratio report (benchmarks/report.py) at the end of a benchmark run.

    pytest benchmarks/ --benchmark-only
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import report  # noqa: E402  (benchmarks/report.py)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    data = {
        "machine_info": getattr(session, "machine_info", None) or {},
        "benchmarks": [b.as_dict(include_data=False) for b in session.benchmarks if b.has_error is False],
    }
    terminalreporter.write_sep("=", "fastdiff ratios (median; x faster = vs published/eager; x floor = vs floor)")

    class _Out:
        def write(self, s):
            terminalreporter.write(s)

    report.report(data, out=_Out())
    terminalreporter.write("\n")
