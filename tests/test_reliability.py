"""Reliability (issue 12): no code run from data files, no lost checkpoints, one run per directory,
a one-line error for every bad input; checkpoints readable by plain torch.load, EMA export.

Training runs are tiny (--data gmm --model mlp, a few steps); the ones that must be killed or run
side by side are subprocesses with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import checkpoint as ckpt_io
from fastdiff import runlock
from fastdiff.data import DataError, load_dataset
from fastdiff.train import main
from test_train import _assert_bitwise_equal as _equal, _env, _train     # tests/ is on sys.path under pytest

VEC = ["--data", "gmm", "--model", "mlp", "--batch", "16", "--ref-size", "64", "--fid-every", "-1",
       "--sample-steps", "2", "--log-every", "1", "--warmup", "2", "--device", "cpu", "--no-compile"]




def _run(tmp_path, *args):
    return main([*VEC, "--out", str(tmp_path / "runs"), *args])


def _error_line(err: str, tool: str = "train") -> str:
    """The one error line (the progress bar may share stderr); no traceback."""
    lines = [x for x in err.replace("\r", "\n").splitlines() if f"fastdiff.{tool}: error: " in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _names(run_dir):
    return sorted(os.listdir(run_dir))


def _damage(path, at=-200):
    b = bytearray(open(path, "rb").read())
    b[at] ^= 1
    st = os.stat(path)
    open(path, "wb").write(b)
    # A later time stamp, as damage found later would have (a write within the file system's clock
    # tick of the save could keep its mtime, and checkpoint.verify trusts unchanged files).
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


# ---------------------------------------------------------------------------- 1. no code from data files

class _OpensAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for where in ("data", "fidref"):
        os.makedirs(tmp_path / where)
        with open(tmp_path / where / "data_batch_1", "wb") as f:
            pickle.dump({b"data": _OpensAFile(str(marker)), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"refusing .*data_batch_1.*names io\.open.*could run code"):
        load_dataset(str(tmp_path / "data"))
    from fastdiff.eval import fid
    with pytest.raises(DataError, match="refusing"):                    # --fid-ref reads folders the same way
        fid(torch.zeros(4, 3, 32, 32), str(tmp_path / "fidref"), extractor=lambda x: x.flatten(1)[:, :4])
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_still_load(tmp_path, protocol):
    raw = np.random.default_rng(protocol).integers(0, 256, (6, 3072), dtype=np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1, 5, 9], b"data": raw,
                     b"filenames": [b"x.png"] * 6}, f, protocol=protocol)
    ds = load_dataset(str(tmp_path))
    assert torch.equal(ds.data, torch.from_numpy(raw.reshape(6, 3, 32, 32)))


# ---------------------------------------------------------------------------- bad data, bad sigma_data

@pytest.mark.parametrize("values, message", [
    ([[0.1, np.nan], [0.0, 0.0]], "NaN or Inf"),                      # 2-D arrays were not checked
    ([[1e300, 0.0]], "NaN or Inf"),                                   # float64 beyond float32's range
    ([[1e30, 1.0], [0.0, 0.0]], "row 0 has norm 1e\\+30.*standardize"),
])
def test_vector_npz_that_cannot_train_is_refused(tmp_path, values, message):
    np.savez(tmp_path / "v.npz", x=np.array(values, dtype=np.float64))
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "v.npz"))
    np.savez(tmp_path / "s.npz", x=np.array([["a", "b"]]))
    with pytest.raises(DataError, match="dtype <U1"):
        load_dataset(str(tmp_path / "s.npz"))


def test_training_on_nan_or_huge_vectors_stops_before_the_first_step(tmp_path, capsys):
    np.savez(tmp_path / "nan.npz", x=np.where(np.arange(64)[:, None] == 7, np.nan, np.ones((64, 2))))
    np.savez(tmp_path / "huge.npz", x=np.full((64, 2), 1e30))
    for name, cause in (("nan", "NaN"), ("huge", "standardize")):
        assert _run(tmp_path, "--data", str(tmp_path / f"{name}.npz"), "--steps", "2", "--name", name) == 2
        err = capsys.readouterr().err
        assert cause in err and "Lower --lr" not in err, err
        assert not (tmp_path / "runs" / name).exists()


@pytest.mark.parametrize("value", [math.inf, math.nan, True, 0, -1.0, "0.5", 1e-300, 1e30])
def test_make_objective_refuses_bad_sigma_data(value):
    from fastdiff.diffusion import make_objective
    with pytest.raises(ValueError, match="sigma_data must be a positive finite number"):
        make_objective(sigma_data=value)


def test_make_objective_takes_numpy_sigma_data():
    from fastdiff.diffusion import make_objective
    assert make_objective(sigma_data=np.float32(0.25)).sigma_data == 0.25


# ---------------------------------------------------------------------------- 7-9. options: one line, before any step

@pytest.mark.parametrize("args, message", [
    (["--ema", "nan"], "--ema must be finite"),
    (["--ema", "inf"], "--ema must be finite"),
    (["--ema-rampup", "nan"], "--ema-rampup must be finite and non-negative"),
    (["--ema-rampup", "-1"], "--ema-rampup must be finite and non-negative"),
    (["--grad-clip", "inf"], "--grad-clip must be finite"),
    (["--grad-clip", "nan"], "--grad-clip must be finite"),
    (["--threads", "-2"], "--threads must be at least 0"),
    (["--lr", "nan"], "--lr must be finite and positive"),
    (["--lr", "inf"], "--lr must be finite and positive"),
    (["--kimg", "nan"], "--kimg must be finite"),
    (["--kimg", "inf"], "--kimg must be finite"),
    (["--sigma-data", "inf"], "--sigma-data must be finite"),
    (["--sample-every", "-1"], "--sample-every must be at least 0"),
    (["--fid-every", "-2"], "--fid-every must be at least -1"),
    (["--resolution", "0"], "--resolution must be positive"),
    (["--resolution", "-4"], "--resolution must be positive"),
    (["--lr", "1e300"], "--lr 1e+300 is beyond float32's range"),
    (["--threads", "100000"], "--threads 100000 is more than this machine can use"),   # OpenMP segfaulted
    (["--device", "meta"], "--device meta: fastdiff trains on cpu or cuda"),
    (["--out", ""], "--out '': cannot create it"),
    (["--sigma-data", "1e-300"], "sigma_data must be a positive finite number within"),
    (["--name", "../escape"], "--name must be a plain directory name"),
    (["--fid-ref", "/nonexistent/dir", "--fid-every", "0"], "--fid-ref /nonexistent/dir: no such directory"),
    (["--fid-ref", "/nonexistent/stats.npz", "--fid-every", "0"], "--fid-ref /nonexistent/stats.npz: no such file"),
])
def test_bad_values_stop_with_one_line_before_any_step(tmp_path, capsys, args, message):
    assert _run(tmp_path, "--steps", "2", "--name", "r", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff.train: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs" / "r").exists()


def test_out_naming_a_file_and_unusable_fid_stats(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main([*VEC, "--out", str(tmp_path / "file"), "--steps", "1"]) == 2
    assert "is a file; it must be a directory" in capsys.readouterr().err
    assert main([*VEC, "--out", str(tmp_path / "file" / "sub"), "--steps", "1"]) == 2
    assert "cannot create it: Not a directory" in capsys.readouterr().err
    assert _run(tmp_path, "--data", "digits", "--model", "unet", "--resolution", "100000", "--steps", "1") == 2
    assert "--resolution 100000: 1797 images of 100000x100000 need" in capsys.readouterr().err
    np.savez(tmp_path / "stats.npz", mean=np.zeros(3))
    assert _run(tmp_path, "--steps", "1", "--fid-ref", str(tmp_path / "stats.npz"), "--fid-every", "0") == 2
    assert "expected arrays 'mu' and 'sigma'" in capsys.readouterr().err


def test_inception_fid_without_clean_fid_stops_before_the_first_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanfid", None)
    os.makedirs(tmp_path / "ref")
    args = ["--data", "digits", "--model", "unet", "--fid-ref", str(tmp_path / "ref"), "--fid-every", "0"]
    assert main([*VEC, "--out", str(tmp_path / "runs"), "--steps", "1", "--name", "f", *args]) == 2
    assert "needs clean-fid" in capsys.readouterr().err
    assert not ckpt_io.list_checkpoints(str(tmp_path / "runs" / "f"))


# ---------------------------------------------------------------------------- checkpoints: format, damage

def test_checkpoint_is_a_plain_torch_file_with_its_checksum_inside(tmp_path):
    state = {"a": torch.randn(5, dtype=torch.float64), "cfg": {"lr": 1e-3, "name": None, "l": [1, 2]}}
    ckpt_io.save(state, str(tmp_path / "c.pt"))
    _equal(torch.load(tmp_path / "c.pt", weights_only=True), state)
    _equal(ckpt_io.load(str(tmp_path / "c.pt")), state)
    good = (tmp_path / "c.pt").read_bytes()
    for cut in (1, 50, 93, 94, 115, 116, 600, len(good) // 2):            # truncated anywhere, trailer included
        (tmp_path / "t.pt").write_bytes(good[:-cut])
        with pytest.raises(ckpt_io.CheckpointError, match="corrupt"):
            ckpt_io.load(str(tmp_path / "t.pt"))
    for at in (10, len(good) // 2, -100, -5):                           # one bit flipped anywhere
        _damage(tmp_path / "c.pt", at)
        with pytest.raises(ckpt_io.CheckpointError, match="corrupt"):
            ckpt_io.load(str(tmp_path / "c.pt"))
        _damage(tmp_path / "c.pt", at)
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "plain.pt").write_bytes(buf.getvalue())
    with pytest.raises(ckpt_io.CheckpointError, match="not a fastdiff checkpoint .*without fastdiff's checksum"):
        ckpt_io.load(str(tmp_path / "plain.pt"))


def test_format_1_checkpoints_are_still_read(tmp_path):
    import hashlib
    buf = io.BytesIO()
    torch.save({"step": 3}, buf)
    payload = buf.getvalue()
    path = tmp_path / "old.pt"
    path.write_bytes(b"fastdiff-checkpoint 1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    assert ckpt_io.load(str(path)) == {"step": 3}
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt"):
        ckpt_io.load(str(path))


def test_a_trained_checkpoint_loads_with_plain_torch_load_and_exports(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "2", "--name", "e") == 0
    path = tmp_path / "runs" / "e" / "checkpoint-0000002.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 2 and state["config"]["model"] == "mlp"

    from safetensors import safe_open
    from safetensors.torch import load_file
    from fastdiff import export
    from fastdiff.nn import build_net
    out = tmp_path / "ema.safetensors"
    assert export.main(["--ckpt", str(tmp_path / "runs" / "e"), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:                  # the README's snippet
        meta = f.metadata()
    cfg, data = json.loads(meta["config"]), json.loads(meta["data"])
    net = build_net(cfg["model"], cfg["preset"], tuple(data["shape"]), num_classes=data.get("classes", 0))
    net.load_state_dict(load_file(str(out)))
    _equal(net.state_dict(), state["ema"])
    from fastdiff.diffusion import make_objective
    obj = make_objective(cfg["objective"], cfg["process"], cfg["param"], cfg["weighting"], cfg["density"],
                         cfg["sigma_data"])
    assert torch.isfinite(fastdiff.sample(obj.denoiser(net.eval()), (4, *data["shape"]), steps=2)).all()
    assert meta["step"] == "2" and meta["checkpoint"] == "checkpoint-0000002.pt"
    capsys.readouterr()
    for args, message in ((["--ckpt", str(tmp_path / "nope"), "--out", str(out)], "does not exist"),
                          (["--ckpt", str(path), "--out", str(tmp_path / "no" / "x.safetensors")], "does not exist"),
                          (["--ckpt", str(path), "--out", str(tmp_path)], "is a directory")):
        assert export.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastdiff.export: error: ") and message in err, err


# ---------------------------------------------------------------------------- 5. full disk

def _disk_fills_up(monkeypatch, after=1000):
    def write(f, data, midway=None):
        f.write(data[:after])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt_io, "_write", write)


def test_full_disk_leaves_no_partial_file_and_says_how_much_is_needed(tmp_path, monkeypatch):
    ckpt_io.save({"x": torch.zeros(10)}, str(tmp_path / "checkpoint-0000001.pt"))
    _disk_fills_up(monkeypatch)
    with pytest.raises(ckpt_io.CheckpointWriteError) as e:
        ckpt_io.save({"x": torch.zeros(100_000)}, str(tmp_path / "checkpoint-0000002.pt"))
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint-0000002.pt" in msg and "no space left" in msg and "0.4 MB needed" in msg
    assert _names(tmp_path) == ["checkpoint-0000001.pt"]
    assert ckpt_io.verify(str(tmp_path / "checkpoint-0000001.pt")) is None


def test_full_disk_during_training_stops_with_one_line_and_keeps_the_run_resumable(tmp_path, capsys, monkeypatch):
    real = ckpt_io._write

    def write(f, data, midway=None):
        if f.name.split(".pt")[0].endswith("0000004"):
            _disk_fills_up(monkeypatch)
            return ckpt_io._write(f, data)
        return real(f, data, midway)
    monkeypatch.setattr(ckpt_io, "_write", write)
    assert _run(tmp_path, "--steps", "6", "--ckpt-every", "2", "--keep", "1", "--name", "d") == 2
    err = _error_line(capsys.readouterr().err)
    assert "no space left" in err and "checkpoint-0000004.pt" in err, err
    assert "Continue from" in err and "checkpoint-0000002.pt" in err
    run = tmp_path / "runs" / "d"
    assert [n for n in _names(run) if "checkpoint" in n] == ["checkpoint-0000002.pt"]
    monkeypatch.setattr(ckpt_io, "_write", real)
    assert _run(tmp_path, "--resume", str(run)) == 0
    assert ckpt_io.step_of(ckpt_io.list_checkpoints(str(run))[-1]) == 6


def test_full_disk_elsewhere_is_one_line_too(tmp_path, capsys, monkeypatch):
    from fastdiff import train

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.run_dir, "metrics.jsonl"))
    monkeypatch.setattr(train.Run, "append_metrics", full)
    assert _run(tmp_path, "--steps", "2", "--name", "m") == 2
    err = _error_line(capsys.readouterr().err)
    assert "no space left" in err and "metrics.jsonl" in err, err


# ---------------------------------------------------------------------------- 2. pruning

def test_prune_keeps_intact_files_and_never_deletes_damaged_or_newer_ones(tmp_path):
    for step in (1, 2, 3, 5):
        ckpt_io.save({"step": step}, str(tmp_path / f"checkpoint-{step:07d}.pt"))
    _damage(tmp_path / "checkpoint-0000005.pt")          # newest: damaged
    _damage(tmp_path / "checkpoint-0000001.pt")          # oldest: damaged
    removed = ckpt_io.prune(str(tmp_path), keep=1)
    assert [os.path.basename(f) for f in removed] == ["checkpoint-0000002.pt"]
    assert [n for n in _names(tmp_path)] == ["checkpoint-0000001.pt", "checkpoint-0000003.pt",
                                             "checkpoint-0000005.pt"]
    assert ckpt_io.prune(str(tmp_path), keep=1) == []     # the only intact file is never deleted


def test_resuming_past_a_damaged_newest_checkpoint_never_loses_the_good_ones(tmp_path, capsys):
    """Issue 12 item 2: with a damaged checkpoint-4, resuming from checkpoint-2 with --keep 1 --ckpt-every 1
    used to delete every new checkpoint right after writing it (checkpoint-4 sorted last)."""
    assert _run(tmp_path, "--steps", "4", "--ckpt-every", "1", "--keep", "5", "--name", "p") == 0
    run = tmp_path / "runs" / "p"
    os.remove(run / "checkpoint-0000003.pt")
    _damage(run / "checkpoint-0000004.pt")
    capsys.readouterr()
    assert _run(tmp_path, "--resume", str(run), "--keep", "1", "--ckpt-every", "1") == 2
    err = capsys.readouterr().err
    assert "checkpoint-0000004.pt is corrupt" in err and f"--resume {run}/checkpoint-0000002.pt" in err, err
    assert _run(tmp_path, "--resume", str(run / "checkpoint-0000002.pt"), "--keep", "1", "--ckpt-every", "1",
                "--steps", "3") == 0
    assert "moved" in capsys.readouterr().out
    assert [n for n in _names(run) if "checkpoint" in n] == ["checkpoint-0000003.pt", "checkpoint-0000004.pt.damaged"]
    assert _run(tmp_path, "--resume", str(run), "--steps", "5") == 0
    assert [n for n in _names(run) if "checkpoint" in n] == ["checkpoint-0000004.pt.damaged", "checkpoint-0000005.pt"]


def test_resuming_an_older_checkpoint_does_not_overwrite_a_newer_good_one(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "4", "--ckpt-every", "2", "--keep", "5", "--name", "o") == 0
    run = tmp_path / "runs" / "o"
    assert _run(tmp_path, "--resume", str(run / "checkpoint-0000002.pt"), "--steps", "6") == 2
    err = capsys.readouterr().err
    assert "checkpoint-0000004.pt is newer" in err and "would overwrite it" in err, err
    assert [n for n in _names(run) if "checkpoint" in n] == ["checkpoint-0000002.pt", "checkpoint-0000004.pt"]


# ---------------------------------------------------------------------------- 3. the run-directory lock

def test_numbered_run_directories_are_taken_atomically(tmp_path):
    from fastdiff.train import _new_run_dir, parse_config
    cfg, _ = parse_config([*VEC, "--out", str(tmp_path)])
    try:
        a, b = _new_run_dir(cfg), _new_run_dir(cfg)
    finally:
        runlock.release_all()
    assert a != b and os.path.basename(a)[:5] == "00000" and os.path.basename(b)[:5] == "00001"


def test_a_second_process_on_a_run_directory_exits_naming_the_first(tmp_path):
    args = [*VEC, "--steps", "100000", "--ckpt-every", "1", "--keep", "2", "--out", "runs", "--name", "shared"]
    first = subprocess.Popen([sys.executable, "-m", "fastdiff.train", *args], cwd=tmp_path, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "shared"
    try:
        deadline = time.time() + 120
        while not ckpt_io.list_checkpoints(str(run)):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = _train(args, tmp_path)                                    # the same --name, mid-run
        assert second.returncode == 2
        assert f"is in use by process {first.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        again = _train(["--resume", str(run)], tmp_path)                   # resuming it while it runs
        assert again.returncode == 2 and f"process {first.pid}" in again.stderr, again.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 leaves no stale lock: the run continues at once
    step = ckpt_io.step_of(ckpt_io.newest_good(str(run)))
    resumed = _train(["--resume", str(run), "--steps", str(step + 1)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert ckpt_io.step_of(ckpt_io.list_checkpoints(str(run))[-1]) == step + 1


def test_resuming_a_live_run_takes_the_lock_before_reading_its_checkpoints(tmp_path, monkeypatch, capsys):
    # The live run prunes the checkpoints a second --resume would read (CI saw a FileNotFoundError
    # traceback there): the second process must meet the lock first, and read nothing.
    assert _run(tmp_path, "--steps", "2", "--name", "live") == 0
    run = tmp_path / "runs" / "live"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastdiff import runlock; "
                               "runlock.RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(run)], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"locked"
        read = []
        monkeypatch.setattr(ckpt_io, "load", lambda path: read.append(path) or pytest.fail("read before the lock"))
        for target in (run, run / "checkpoint-0000002.pt"):
            assert _run(tmp_path, "--resume", str(target), "--steps", "3") == 2
            assert f"is in use by process {holder.pid}" in _error_line(capsys.readouterr().err)
        assert read == []
    finally:
        holder.kill()
        holder.wait()


def test_a_reader_of_a_live_run_reads_the_newer_checkpoint_when_the_listed_one_is_pruned(tmp_path, monkeypatch):
    assert _run(tmp_path, "--steps", "4", "--ckpt-every", "2", "--keep", "5", "--name", "r") == 0
    run = tmp_path / "runs" / "r"
    real = ckpt_io.list_checkpoints
    calls = []

    def listing_then_pruned(d):          # the first listing is taken just before the run prunes its newest
        files = real(d)
        calls.append(files)
        if len(calls) == 1:
            files = files[:1]
            os.remove(files[0])
        return files
    monkeypatch.setattr(ckpt_io, "list_checkpoints", listing_then_pruned)
    path, state = ckpt_io.load_newest(str(run), "--ckpt")
    assert os.path.basename(path) == "checkpoint-0000004.pt" and state["step"] == 4 and len(calls) == 2
    with pytest.raises(ckpt_io.CheckpointError, match="checkpoint-0000002.pt does not exist"):
        ckpt_io.load_newest(str(run / "checkpoint-0000002.pt"))    # a file named outright: said plainly
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        ckpt_io.load(str(run / "checkpoint-0000002.pt"))


# ---------------------------------------------------------------------------- 4. kill -9 while writing

def test_kill9_during_a_checkpoint_write_leaves_the_run_resumable_bit_for_bit(tmp_path):
    args = [*VEC, "--steps", "6", "--ckpt-every", "2", "--keep", "1", "--out", "runs", "--threads", "1"]
    straight = _train([*args, "--name", "straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = _train([*args, "--name", "killed"], tmp_path, FASTDIFF_FAULT="killwrite@4")
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "runs" / "killed"
    left = [n for n in _names(run) if "checkpoint" in n]
    assert left[0] == "checkpoint-0000002.pt" and left[1].startswith("checkpoint-0000004.pt.tmp-"), left
    resumed = _train(["--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "unfinished checkpoint write" in resumed.stdout
    assert [n for n in _names(run) if "checkpoint" in n] == ["checkpoint-0000006.pt"]
    a = ckpt_io.load(str(tmp_path / "runs" / "straight" / "checkpoint-0000006.pt"))
    b = ckpt_io.load(str(run / "checkpoint-0000006.pt"))
    for key in ("net", "ema", "opt", "obj", "rank_states", "step"):
        _equal(a[key], b[key], key)


# ---------------------------------------------------------------------------- 6. thread count

def test_thread_count_is_saved_and_reused_on_resume(tmp_path):
    before = torch.get_num_threads()
    try:
        assert _run(tmp_path, "--steps", "2", "--threads", "1", "--name", "t") == 0
        run = tmp_path / "runs" / "t"
        assert ckpt_io.load(str(run / "checkpoint-0000002.pt"))["config"]["threads"] == 1
        torch.set_num_threads(2)
        assert _run(tmp_path, "--resume", str(run), "--steps", "3") == 0         # no --threads: the run's
        assert torch.get_num_threads() == 1
        with pytest.warns(UserWarning, match="--threads 2 overrides the run's 1 CPU thread"):
            assert _run(tmp_path, "--resume", str(run), "--steps", "4", "--threads", "2") == 0
        assert ckpt_io.load(str(run / "checkpoint-0000004.pt"))["config"]["threads"] == 2
    finally:
        torch.set_num_threads(before)
