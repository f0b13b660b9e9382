"""Checkpoint files: plain torch.save archives with a checksum inside, written atomically.

A checkpoint is what torch.save writes (a zip archive), so `torch.load(path, weights_only=True)`
reads it without fastdiff. The archive's comment (the zip format's free text at the very end of
the file, which zip readers skip) holds b"fastdiff-checkpoint 2 sha256 <hex>": the SHA-256 of
every byte before the comment. `load` checks it before anything is unpickled, so a file that is
truncated, damaged or not ours is refused with a message naming it; the payload is read with
weights_only=True (tensors and plain Python values only). Files of format 1 (a header line
b"fastdiff-checkpoint 1 <sha256 of the rest>\\n" before the archive) are still read.

`save` writes a temporary file beside the target, fsyncs it, renames it over the target and
fsyncs the directory: a reader sees the old file or the new one, never a part. A failed write
(a full disk, any error, an interrupt) removes its temporary file and leaves every other file
as it was. `prune` and `check_newer` are the rules for deleting and superseding checkpoints.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import re
import shutil
import struct

import torch

MAGIC = b"fastdiff-checkpoint"
VERSION = 2
_TRAILER = MAGIC + b" 2 sha256 "               # then 64 hex digits: the zip comment, fixed length
_COMMENT_LEN = len(_TRAILER) + 64
_EOCD = b"PK\x05\x06"                          # zip end-of-central-directory record, 22 bytes + comment
_CHUNK = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or used; the message names the file and the problem."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (e.g. a full disk); the partial file was removed."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def encode(state: dict) -> memoryview:
    """state as checkpoint bytes: torch.save's archive, its comment holding the checksum. Built in one
    buffer, never copied (a DDPM++ checkpoint is ~1 GB)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with buf.getbuffer() as data:
        if data[-22:-18] != _EOCD or data[-2:] != b"\0\0":
            raise CheckpointError("torch.save wrote an archive this fastdiff cannot checksum (no empty zip "
                                  "comment at its end)")
        data[-2:] = struct.pack("<H", _COMMENT_LEN)  # the comment's length, then the comment itself
        digest = hashlib.sha256(data).hexdigest().encode()
    buf.write(_TRAILER + digest)
    return buf.getbuffer()


def _write(f, data: memoryview, midway=None) -> None:
    """Writes data to f in chunks; midway() is called once half of it is written (a test hook)."""
    half = len(data) // 2
    for i in range(0, len(data), _CHUNK):
        if midway is not None and i <= half < i + _CHUNK:
            f.write(data[i:half])
            f.flush()
            midway()
            f.write(data[half:i + _CHUNK])
        else:
            f.write(data[i:i + _CHUNK])


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def temp_path(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def save(state: dict, path: str, *, midway=None) -> None:
    """Write state to path as a checkpoint, atomically (see write_atomic)."""
    write_atomic(path, encode(state), midway=midway)
    _verified[os.path.abspath(path)] = _fingerprint(path)


def write_atomic(path: str, data: bytes, *, midway=None) -> None:
    """Write data to path atomically: temporary file, fsync, rename, fsync the directory.

    Raises CheckpointWriteError (naming the file and, for a full disk, the space needed) after
    removing the temporary file; path and every other file stay as they were. midway: a test hook,
    called once half of data is written."""
    data = memoryview(data)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < len(data):
        raise CheckpointWriteError(f"cannot write {path}: it needs {_mb(len(data))} and {directory} has "
                                   f"{_mb(free)} free; no file was changed")
    try:
        with open(tmp, "wb") as f:
            _write(f, data, midway)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = _mb(shutil.disk_usage(directory).free)
            except OSError:
                free = "unknown"
            raise CheckpointWriteError(f"cannot write {path}: no space left on the device ({_mb(len(data))} needed, "
                                       f"{free} free in {directory}); the partial file was removed, no other file "
                                       f"was changed") from None
        raise CheckpointWriteError(f"cannot write {path}: {e.strerror or e}; the partial file was removed, no other "
                                   f"file was changed") from None


def _payload(data: bytes, path: str) -> io.BytesIO:
    """The torch.load-able part of a checkpoint's bytes, after its checksum was checked."""
    if data.startswith(MAGIC + b" "):                       # format 1: header line, then the archive
        end = data.find(b"\n", 0, 200)
        parts = data[:end].split() if end > 0 else []
        if len(parts) != 3:
            raise CheckpointError(f"{path} is corrupt (its header line is damaged)")
        if parts[1] != b"1":
            raise CheckpointError(f"{path} has checkpoint format version {parts[1].decode(errors='replace')}, "
                                  f"this fastdiff reads versions 1 and {VERSION}")
        body = memoryview(data)[end + 1:]
        if hashlib.sha256(body).hexdigest().encode() != parts[2]:
            raise CheckpointError(f"{path} is corrupt (checksum mismatch: the file is truncated or damaged); "
                                  f"refusing to load it")
        return io.BytesIO(body)
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path} is not a fastdiff checkpoint")
    tail = data[-_COMMENT_LEN:]
    if not tail.startswith(_TRAILER):
        eocd = data.rfind(_EOCD, max(0, len(data) - 65557))
        comment = struct.unpack("<H", data[eocd + 20:eocd + 22])[0] if 0 <= eocd <= len(data) - 22 else -1
        if comment not in (-1, _COMMENT_LEN) and eocd + 22 + comment == len(data):   # a whole zip, not ours
            raise CheckpointError(f"{path} is not a fastdiff checkpoint (a zip archive without fastdiff's "
                                  f"checksum; a plain torch.save file is read with torch.load)")
        raise CheckpointError(f"{path} is corrupt or not a fastdiff checkpoint (the checksum at its end is "
                              f"missing: a truncated or damaged file); refusing to load it")
    body = memoryview(data)[:-_COMMENT_LEN]
    if hashlib.sha256(body).hexdigest().encode() != tail[len(_TRAILER):]:
        raise CheckpointError(f"{path} is corrupt (checksum mismatch: the file is truncated or damaged); "
                              f"refusing to load it")
    return io.BytesIO(data)


class CheckpointGoneError(CheckpointError):
    """The checkpoint file no longer exists (a live run pruned it after it was listed)."""


def _read(path: str) -> tuple[bytes, tuple]:
    """(contents, fingerprint) from one open file: a file replaced or removed meanwhile cannot
    pair one file's bytes with another's fingerprint."""
    try:
        with open(path, "rb") as f:
            return f.read(), _stat_key(os.fstat(f.fileno()))
    except FileNotFoundError:
        raise CheckpointGoneError(f"checkpoint {path} does not exist (any more)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None


def load(path: str) -> dict:
    """Read and verify a checkpoint; raise CheckpointError naming the file and the problem."""
    data, key = _read(path)
    payload = _payload(data, path)
    try:
        state = torch.load(payload, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or incompatible: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a fastdiff checkpoint (it holds a {type(state).__name__})")
    _verified[os.path.abspath(path)] = key
    return state


# Files found intact in this process: path -> (size, mtime_ns, inode) then. A file that changed
# since is verified again.
_verified: dict = {}


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _fingerprint(path: str) -> tuple:
    return _stat_key(os.stat(path))


def verify(path: str) -> str | None:
    """None if path is an intact checkpoint, else why not (the CheckpointError's message)."""
    key = os.path.abspath(path)
    try:
        if _verified.get(key) == _fingerprint(path):
            return None
        data, stamp = _read(path)
        _payload(data, path)
    except (CheckpointError, OSError) as e:
        return str(e)
    _verified[key] = stamp
    return None


def step_of(path: str) -> int:
    return int(re.search(r"checkpoint-(\d+)\.pt$", path).group(1))


def list_checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint-<step>.pt files, oldest step first."""
    files = glob.glob(os.path.join(glob.escape(run_dir), "checkpoint-*.pt"))
    return sorted((f for f in files if re.search(r"checkpoint-\d+\.pt$", f)), key=lambda f: (step_of(f), f))


def remove_temporaries(run_dir: str) -> list[str]:
    """Delete the temporary files of checkpoint writes that never finished (a process killed while
    writing leaves checkpoint-N.pt.tmp-PID). Call it only while holding the run's lock."""
    removed = []
    for f in glob.glob(os.path.join(glob.escape(run_dir), "checkpoint-*.pt.tmp-*")):
        try:
            os.remove(f)
            removed.append(f)
        except FileNotFoundError:
            pass
    return removed


def move_aside(path: str) -> str:
    """Rename a damaged checkpoint to path.damaged (or .damaged-2, ...): kept, but no longer a checkpoint
    of the run."""
    target, i = f"{path}.damaged", 1
    while os.path.exists(target):
        i += 1
        target = f"{path}.damaged-{i}"
    os.replace(path, target)
    return target


def newest_good(run_dir: str, before: int | None = None) -> str | None:
    """The newest intact checkpoint of run_dir (with a step below `before`, if given), or None."""
    for f in reversed(list_checkpoints(run_dir)):
        if (before is None or step_of(f) < before) and verify(f) is None:
            return f
    return None


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


def load_newest(path: str, option: str = "--resume") -> tuple[str, dict]:
    """(file, state) of a checkpoint file, or of a run directory's newest checkpoint. When that one is
    damaged, the error names the newest intact older one and how to use it. A run still writing to the
    directory may prune the newest file between listing and reading: its newer one is then read."""
    for attempt in range(10):
        file = resolve(path)
        try:
            return file, load(file)
        except CheckpointGoneError:
            if not os.path.isdir(path) or attempt == 9:
                raise
        except CheckpointError as e:
            if not os.path.isdir(path):
                raise
            older = newest_good(path, before=step_of(file))
            hint = (f"; the newest intact checkpoint is {older}: continue from it with {option} {older}"
                    f"{' (the damaged newer ones are then moved aside)' if option == '--resume' else ''}") \
                if older else f"; {path} holds no intact checkpoint"
            raise CheckpointError(f"{e}{hint}") from None
    raise AssertionError("unreachable")


def check_newer(path: str, step: int) -> list[tuple[str, str]]:
    """Before training continues from checkpoint `path` (of step `step`; its name need not say it): its
    run directory must hold no newer checkpoint but damaged ones, which are moved aside (never deleted).
    Returns [(damaged file, where it went)]; raises CheckpointError if a newer intact checkpoint exists
    (continuing would overwrite it). Call it only while holding the run's lock."""
    run_dir = os.path.dirname(os.path.abspath(path))
    newer = [f for f in list_checkpoints(run_dir) if step_of(f) > step]
    good = [f for f in newer if verify(f) is None]
    if good:
        raise CheckpointError(f"{good[-1]} is newer than {path} and intact: continuing from {path} would "
                              f"overwrite it. Continue from the newest with --resume {run_dir}, or copy "
                              f"{os.path.basename(path)} into a new directory and resume from the copy")
    return [(f, move_aside(f)) for f in newer]


def prune(run_dir: str, keep: int) -> list[str]:
    """Delete old checkpoints so that `keep` intact ones remain, and return the deleted files.

    Only intact checkpoints older than the newest intact one are deleted (keep >= 1 keeps that one
    too): a damaged file is never counted as kept and never deleted, and nothing newer than the
    newest intact checkpoint is touched. Verifying reads each older file once per process."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    kept, removed = 0, []
    for f in reversed(list_checkpoints(run_dir)):
        if verify(f) is not None:
            continue
        kept += 1
        if kept > keep:
            os.remove(f)
            _verified.pop(os.path.abspath(f), None)
            removed.append(f)
    return removed
