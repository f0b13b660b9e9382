"""One process per run directory: an exclusive lock on RUN/.lock.

Two trainers writing one run directory would replace each other's checkpoints and interleave
metrics.jsonl. The lock is an flock(2) on RUN/.lock, held for the life of the open file: the
operating system drops it when the process ends in any way (kill -9 included), so a dead run
never leaves a stale lock behind. The file itself stays; it holds the holder's PID and host,
which a second process names in its error. flock works on local file systems and on NFS (as a
POSIX lock, Linux >= 2.6.12).
"""
from __future__ import annotations

import os
import socket
import time
import warnings

LOCK_NAME = ".lock"


_held: list = []          # the locks this process holds, for release_all


def release_all() -> None:
    """Release every run lock this process holds (a trainer called in-process, e.g. by tests, must not
    keep its run locked after it returns: a second flock in the same process would fail)."""
    while _held:
        _held.pop().release()


class RunLockError(RuntimeError):
    """The run directory is locked by another process; the message names it."""


class RunLock:
    """Holds the lock on run_dir from construction to release() (or the process's end)."""

    def __init__(self, run_dir: str):
        self.path, self._fd = os.path.join(run_dir, LOCK_NAME), None
        try:
            import fcntl
        except ImportError:                      # not POSIX (Windows): run unlocked, and say so
            warnings.warn(f"no file locks on this platform: nothing stops a second run in {run_dir}")
            return
        # No O_TRUNC: opening must not erase the holder's PID before the lock is ours.
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise RunLockError(f"{run_dir} is in use by {holder}: two runs in one directory would overwrite each "
                               f"other's checkpoints. Wait for it to end (or stop it), or use another --name") \
                from None
        except BaseException:
            os.close(self._fd)
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        _held.append(self)

    def _holder(self) -> str:
        # The holder writes its PID right after taking the lock; give it a moment to.
        for _ in range(20):
            text = os.pread(self._fd, 200, 0).decode(errors="replace").split()
            if text and text[0].isdigit():
                host = f" on {text[1]}" if len(text) > 1 and text[1] != socket.gethostname() else ""
                return f"process {text[0]}{host}"
            time.sleep(0.05)
        return "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)           # closing drops the flock
            self._fd = None
        if self in _held:
            _held.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
