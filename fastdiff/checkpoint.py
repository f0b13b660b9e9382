"""Checkpoint files: written atomically, verified before anything is loaded.

Layout: the line b"fastdiff-checkpoint 1 <sha256 of payload>\\n", then the
torch.save payload. A file that is truncated, damaged, or not ours is refused
with a message before any state is touched; the payload is read with
weights_only=True (tensors and plain Python values only).
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import re

import torch

MAGIC = b"fastdiff-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    pass


def save(state: dict, path: str) -> None:
    """Write state to path atomically: temporary file, fsync, rename, fsync the directory."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    header = MAGIC + b" %d " % VERSION + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: str) -> dict:
    """Read and verify a checkpoint; raise CheckpointError naming the file and the problem."""
    try:
        with open(path, "rb") as f:
            header = f.readline(200)
            payload = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    parts = header.split()
    if len(parts) != 3 or parts[0] != MAGIC:
        raise CheckpointError(f"{path} is not a fastdiff checkpoint")
    if parts[1] != str(VERSION).encode():
        raise CheckpointError(f"{path} has checkpoint format version {parts[1].decode()}, this fastdiff reads "
                              f"version {VERSION}")
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        raise CheckpointError(f"{path} is corrupt (checksum mismatch: the file is truncated or damaged); "
                              f"refusing to load it")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or incompatible: {e}") from None


def list_checkpoints(run_dir: str) -> list[str]:
    files = glob.glob(os.path.join(run_dir, "checkpoint-*.pt"))
    return sorted(f for f in files if re.search(r"checkpoint-\d+\.pt$", f))


def resolve(path: str) -> str:
    """A checkpoint file, or the newest checkpoint in a run directory."""
    if os.path.isdir(path):
        files = list_checkpoints(path)
        if not files:
            raise CheckpointError(f"no checkpoint-*.pt in {path}")
        return files[-1]
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path
