"""The training engine: CLI, exact resume, DDP, bad input, checkpoints, NaN stop, data, FID plumbing.

Everything runs on the CPU with the "tiny" presets and a few steps. Subprocesses
get OMP_NUM_THREADS=1: on a shared 2-core machine that is several times faster
than two contending threads.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from fastdiff import checkpoint as ckpt_io
from fastdiff.data import DataError, Sampler, load_dataset
from fastdiff.train import main

TINY = ["--preset", "tiny", "--batch", "16", "--ref-size", "64", "--fid-every", "-1", "--sample-steps", "2",
        "--log-every", "1", "--warmup", "2", "--device", "cpu", "--no-compile"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # stacks on abort
    env.pop("FASTDIFF_FAULT", None)
    env.update(extra)
    return env


def _train(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "fastdiff.train", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def _run(tmp_path, *args, **kw):
    return main([*TINY, "--out", str(tmp_path / "runs"), *args])


# ---------------------------------------------------------------------------- CLI and resume

def test_cli_smoke_and_sample(tmp_path):
    r = _train([*TINY, "--steps", "3", "--out", "runs", "--name", "smoke"], tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "smoke"
    assert "--resume" in r.stdout and "fastdiff.sample --ckpt" in r.stdout
    assert json.loads((run / "config.json").read_text())["objective"] == "stf"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    assert (run / "checkpoint-0000003.pt").exists() and (run / "samples-0000003.png").exists()
    s = subprocess.run([sys.executable, "-m", "fastdiff.sample", "--ckpt", str(run), "--n", "5", "--out",
                        str(tmp_path / "png"), "--steps", "2", "--batch", "3"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    from PIL import Image
    files = sorted(os.listdir(tmp_path / "png"))
    assert files == [f"{i:06d}.png" for i in range(5)]
    with Image.open(tmp_path / "png" / files[0]) as im:
        assert im.size == (8, 8)


def _states(path):
    state = ckpt_io.load(str(path))
    return state


def _assert_bitwise_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("objective", ["stf"])
def test_kill9_resume_is_bit_exact(tmp_path, objective):
    args = [*TINY, "--objective", objective, "--steps", "6", "--ckpt-every", "2", "--out", "runs", "--xflip",
            "--density", "adaptive"]
    straight = _train([*args, "--name", "straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = _train([*args, "--name", "killed"], tmp_path, FASTDIFF_FAULT="kill@5")
    assert killed.returncode == -9, killed.stderr                 # SIGKILL in the middle of the run
    run = tmp_path / "runs" / "killed"
    assert ckpt_io.list_checkpoints(str(run))[-1].endswith("checkpoint-0000004.pt")
    resumed = _train(["--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = _states(tmp_path / "runs" / "straight" / "checkpoint-0000006.pt")
    b = _states(run / "checkpoint-0000006.pt")
    for key in ("net", "ema", "opt", "obj", "rank_states", "step"):
        _assert_bitwise_equal(a[key], b[key], key)


def test_ddp_two_processes_stay_in_sync(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastdiff.train", *TINY, "--steps", "4", "--ckpt-every", "2", "--out", "runs",
                        "--name", "ddp", "--fid-every", "4", "--fid-samples", "41"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sums = [x["rank_param_checksums"] for x in lines if "rank_param_checksums" in x]
    assert len(sums) == 2 and all(len(s) == 2 and s[0] == s[1] for s in sums)
    state = ckpt_io.load(str(run / "checkpoint-0000004.pt"))
    assert len(state["rank_states"]) == 2
    # the ranks drew different noise and different reference rows
    assert not torch.equal(state["rank_states"][0]["torch"], state["rank_states"][1]["torch"])
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["ref_dist"] == "shard"          # the measured default
    # The FID samples: 21 drawn by rank 0 (seed + 1), 20 by rank 1 (seed + 2), gathered on rank 0.
    from fastdiff import eval as fd_eval
    from fastdiff.train import generate, load_for_sampling
    fids = [x["fid_proxy"] for x in lines if "fid_proxy" in x]
    assert len(fids) == 1 and math.isfinite(fids[0]), lines
    cfg, ema, obj = load_for_sampling(str(run / "checkpoint-0000004.pt"), torch.device("cpu"))
    shape = tuple(state["data"]["shape"])
    samples = torch.cat([*generate(obj, ema, shape, 21, seed=cfg["seed"] + 1, steps=2, device=torch.device("cpu")),
                         *generate(obj, ema, shape, 20, seed=cfg["seed"] + 2, steps=2, device=torch.device("cpu"))])
    data = load_dataset(cfg["data"], cfg["resolution"], cfg["xflip"])
    real = data.get(torch.arange(len(data)))
    proxy = fd_eval.train_proxy(real, fd_eval.digits_labels(), steps=200, seed=cfg["seed"])
    assert fd_eval.fid(samples, real, proxy) == pytest.approx(fids[0], rel=1e-3)
    assert fd_eval.fid(samples[:21], real, proxy) != pytest.approx(fids[0], rel=1e-3)   # both shares count


def test_torchrun_worker_exit_code_is_kept(tmp_path):
    """A torchrun worker leaves through os._exit (fastdiff.train._exit_worker) with main()'s code:
    a bad argument still fails the run, with its message."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastdiff.train", *TINY, "--data", "/nonexistent/dir"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "fastdiff.train: error: " in r.stderr and "exitcode  : 2" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/dir"], "no such file or directory"),
    (["--ref-size", "8", "--batch", "16"], "--ref-size 8 is smaller than --batch 16"),
    (["--preset", "huge"], "--preset must be one of"),
    (["--batch", "0"], "--batch must be positive"),
    (["--model", "mlp"], "--model mlp needs vector data"),
    (["--data", "gmm"], "use --model mlp"),
    (["--device", "nonsense"], "--device 'nonsense'"),
])
def test_bad_input_stops_with_a_message(tmp_path, capsys, args, message):
    assert _run(tmp_path, "--steps", "1", *args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list((tmp_path / "runs").glob("*/checkpoint-*.pt")) if (tmp_path / "runs").exists() else True


@pytest.mark.parametrize("option, value", [("--objective", "sft"), ("--process", "bogus"), ("--density", "nope"),
                                           ("--param", "x1"), ("--weighting", "snr2")])
def test_unknown_choice_is_an_argparse_error(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, option, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"invalid choice: '{value}'" in err and option in err


def test_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 2\nref_size: 32\nsigma-data: 0.4\nxflip: true\nname: fromfile\n")
    assert _run(tmp_path, "--config", str(cfg)) == 0
    saved = json.loads((tmp_path / "runs" / "fromfile" / "config.json").read_text())
    assert saved["steps"] == 2 and saved["sigma_data"] == 0.4 and saved["xflip"] is True
    assert saved["ref_size"] == 64                # the command line wins over the file
    bad = tmp_path / "b.json"
    bad.write_text('{"stepz": 3}')
    assert _run(tmp_path, "--config", str(bad)) == 2
    assert "unknown option 'stepz'" in capsys.readouterr().err


def test_resume_from_another_configuration_is_refused(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "2", "--name", "a") == 0
    run = tmp_path / "runs" / "a"
    assert _run(tmp_path, "--resume", str(run), "--batch", "8", "--steps", "4") == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "--batch 8" in err
    assert _run(tmp_path, "--steps", "2", "--name", "a") == 2          # would overwrite a run
    assert "--resume" in capsys.readouterr().err


def test_corrupt_checkpoints_are_refused(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "2", "--name", "c") == 0
    path = tmp_path / "runs" / "c" / "checkpoint-0000002.pt"
    good = path.read_bytes()
    for name, data in [("flipped", good[:-100] + bytes([good[-100] ^ 1]) + good[-99:]),
                       ("truncated", good[: len(good) // 2]),
                       ("foreign", b"PK\x03\x04 not ours")]:
        path.write_bytes(data)
        assert _run(tmp_path, "--resume", str(path), "--steps", "4") == 2, name
        err = capsys.readouterr().err
        assert ("corrupt" in err) if name != "foreign" else ("not a fastdiff checkpoint" in err), err
    assert not (tmp_path / "runs" / "c" / "checkpoint-0000004.pt").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTDIFF_FAULT", "nan@3")
    assert _run(tmp_path, "--steps", "6", "--ckpt-every", "2", "--name", "n") == 3
    err = capsys.readouterr().err
    assert "loss became nan" in err and "checkpoint-0000002.pt" in err
    assert [os.path.basename(p) for p in ckpt_io.list_checkpoints(str(tmp_path / "runs" / "n"))] == \
        ["checkpoint-0000002.pt"]
    ckpt_io.load(str(tmp_path / "runs" / "n" / "checkpoint-0000002.pt"))     # intact


def test_atomic_save_leaves_no_temp_files(tmp_path):
    ckpt_io.save({"a": torch.arange(3)}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.equal(ckpt_io.load(str(tmp_path / "x.pt"))["a"], torch.arange(3))


# ---------------------------------------------------------------------------- data

def _png_dir(root, sizes, mode="RGB"):
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(os.path.join(root, f"{i}.png"))


def test_folder_zip_npz_cifar_loaders(tmp_path):
    _png_dir(tmp_path / "imgs", [(12, 12)] * 5)
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.shape == (3, 12, 12) and len(ds) == 5 and ds.data.dtype == torch.uint8
    x = ds.get(torch.arange(5))
    assert x.min() >= -1 and x.max() <= 1
    assert load_dataset(str(tmp_path / "imgs"), resolution=8).shape == (3, 8, 8)

    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for f in sorted(os.listdir(tmp_path / "imgs")):
            zf.write(tmp_path / "imgs" / f, f"sub/{f}")
    assert torch.equal(load_dataset(str(tmp_path / "imgs.zip")).data, ds.data)

    arr = np.random.default_rng(1).integers(0, 256, (7, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", x=arr)
    d = load_dataset(str(tmp_path / "nhwc.npz"))
    assert d.shape == (3, 6, 6) and torch.equal(d.data, torch.from_numpy(arr).permute(0, 3, 1, 2))
    np.savez(tmp_path / "vec.npz", np.random.default_rng(2).standard_normal((9, 4)).astype(np.float32))
    assert load_dataset(str(tmp_path / "vec.npz")).shape == (4,)

    cifar = tmp_path / "cifar-10-batches-py"
    os.makedirs(cifar)
    raw = np.random.default_rng(3).integers(0, 256, (10, 3072), dtype=np.uint8)
    for i in range(1, 3):
        with open(cifar / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": raw, b"labels": list(range(10))}, f)
    c = load_dataset(str(tmp_path))
    assert c.shape == (3, 32, 32) and len(c) == 20
    assert torch.equal(c.data[0], torch.from_numpy(raw[0].reshape(3, 32, 32)))

    g = load_dataset("gmm")
    assert g.shape == (2,) and not g.is_image


def test_data_errors(tmp_path):
    _png_dir(tmp_path / "mixed", [(8, 8), (9, 8)])
    with pytest.raises(DataError, match="mixed sizes.*8x8.*9x8"):
        load_dataset(str(tmp_path / "mixed"))
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image 'a.png'"):
        load_dataset(str(tmp_path / "bad"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "x.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(str(tmp_path / "x.npz"))
    (tmp_path / "x.zip").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable zip"):
        load_dataset(str(tmp_path / "x.zip"))


def test_sampler_resumes_and_draws_reference_rows_uniformly():
    a = Sampler(100, 32, seed=5, xflip=True)
    for _ in range(5):
        a.next_batch(), a.ref_rows(50)
    state = a.state_dict()
    b = Sampler(100, 32, seed=0, xflip=True)
    b.load_state_dict(state)
    for _ in range(7):                           # across epoch boundaries
        (ia, fa), (ib, fb) = a.next_batch(), b.next_batch()
        assert torch.equal(ia, ib) and torch.equal(fa, fb)
        (ra, _), (rb, _) = a.ref_rows(50), b.ref_rows(50)
        assert torch.equal(ra, rb)
    s = Sampler(10, 4, seed=0)
    seen = torch.cat([s.next_batch()[0] for _ in range(5)])[:10]
    assert sorted(seen.tolist()) == list(range(10))          # one epoch visits every row once
    counts = torch.bincount(s.ref_rows(20000)[0], minlength=10).float()
    assert (counts / 2000 - 1).abs().max() < 0.1


def test_ddp_batches_are_disjoint():
    r0, r1 = Sampler(64, 8, seed=1, rank=0, world=2), Sampler(64, 8, seed=1, rank=1, world=2)
    i0, i1 = r0.next_batch()[0], r1.next_batch()[0]
    assert len(i0) == len(i1) == 8 and not set(i0.tolist()) & set(i1.tolist())


# ---------------------------------------------------------------------------- networks

def test_ddpmpp_preset_matches_edm_size():
    from fastdiff.nn import build_net
    net = build_net("unet", "ddpmpp-cifar", (3, 32, 32))
    assert sum(p.numel() for p in net.parameters()) == 55_732_739      # EDM's DDPM++ CIFAR-10: 55.7M
    tiny = build_net("unet", "tiny", (3, 16, 16))
    assert tiny.img_shape == (3, 16, 16)
    assert tiny(torch.randn(2, 3, 16, 16), torch.randn(2)).shape == (2, 3, 16, 16)
    mlp = build_net("mlp", "tiny", (5,))
    assert mlp(torch.randn(3, 5), torch.randn(3)).shape == (3, 5) and mlp.img_shape == (5,)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_gradients_keep_the_parameters_layout(preset):
    """DDP's buckets copy gradients assuming each has its parameter's strides; one that does
    not (a 1x1 conv fed a channels-last view) costs a warning and a slower copy every step."""
    from fastdiff.nn import build_net
    torch.manual_seed(0)
    net = build_net("unet", preset, (1, 8, 8))
    net(torch.randn(3, 1, 8, 8), torch.rand(3) + 0.5).square().sum().backward()
    odd = [(n, p.stride(), p.grad.stride()) for n, p in net.named_parameters() if p.grad.stride() != p.stride()]
    assert not odd, odd


# ---------------------------------------------------------------------------- FID plumbing

class _Features(torch.nn.Module):
    """A fixed random projection of the pixels: a stand-in for Inception."""

    def __init__(self, d_in, d_out=6):
        super().__init__()
        self.w = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, x):
        return x.flatten(1).double() @ self.w


def test_frechet_distance_closed_form():
    from fastdiff.eval import frechet_distance
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    # tr(S1 + S2 - 2 (S1 S2)^1/2) = 10 - 2 * (2 + 2) = 2
    assert frechet_distance([0, 0], s1, [3, 4], s2) == pytest.approx(25 + 2)


def test_fid_plumbing_with_custom_features(tmp_path):
    from fastdiff.eval import feature_stats, fid, save_stats, write_pngs
    gen = torch.Generator().manual_seed(0)
    real = (torch.rand(400, 1, 4, 4, generator=gen) * 2 - 1).clamp(-1, 1)
    same = (torch.rand(400, 1, 4, 4, generator=gen) * 2 - 1).clamp(-1, 1)
    shifted = (same * 0.5 + 0.4).clamp(-1, 1)
    feats = _Features(16)
    write_pngs(real, str(tmp_path / "ref"))
    from fastdiff.data import load_dataset
    stored = load_dataset(str(tmp_path / "ref")).get(torch.arange(400))
    assert (stored - real).abs().max() <= 1 / 127.5 + 1e-6    # 8-bit round trip
    f_folder = fid(same, str(tmp_path / "ref"), feats)
    save_stats(str(tmp_path / "s.npz"), *feature_stats(feats(stored)))
    assert fid(same, str(tmp_path / "s.npz"), feats) == pytest.approx(f_folder, rel=1e-6)
    assert fid(same, stored, feats) == pytest.approx(f_folder, rel=1e-6)
    assert fid(shifted, stored, feats) > 5 * f_folder


def test_clean_fid_path_needs_clean_fid(monkeypatch):
    from fastdiff.eval import fid
    monkeypatch.setitem(sys.modules, "cleanfid", None)
    with pytest.raises(RuntimeError, match="pip install clean-fid"):
        fid(torch.zeros(2, 3, 8, 8), "stats.npz")


def test_proxy_features_separate_digits_from_noise():
    from fastdiff.eval import digits_labels, fid, train_proxy
    x = load_dataset("digits").get(torch.arange(1797))
    net = train_proxy(x, digits_labels(), steps=60)
    assert fid(x[:800], x[800:], net) * 5 < fid(torch.rand(800, 1, 8, 8) * 2 - 1, x[800:], net)


# ---------------------------------------------------------------------------- the compiled step

def _tiny_setup(objective="stf"):
    from fastdiff.diffusion import make_objective
    from fastdiff.nn import build_net
    torch.manual_seed(0)
    net = build_net("unet", "tiny", (1, 8, 8))
    obj = make_objective(objective=objective)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    y, extra = torch.rand(8, 1, 8, 8) * 2 - 1, torch.rand(24, 1, 8, 8) * 2 - 1
    return net, obj, opt, y, extra


@pytest.mark.parametrize("objective", ["stf", "dsm"])
def test_step_traces_as_one_graph(objective):
    net, obj, _, y, extra = _tiny_setup(objective)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda y, e: obj(net, y, e))(y, extra if objective == "stf" else None)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_unusable_compiler_falls_back_to_eager(monkeypatch):
    from fastdiff.train import make_step

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("InductorError: no working C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    net, obj, opt, y, extra = _tiny_setup()
    step = make_step(net, obj, opt, device=torch.device("cpu"), bf16=False, compile=True, grad_clip=1.0)
    with pytest.warns(UserWarning, match="running the step eagerly"):
        loss, stats = step(y, extra, 1e-3)
    assert torch.isfinite(loss) and stats["per_sample"].shape == (8,)
    step(y, extra, 1e-3)                          # eager from now on, no second warning


def test_bf16_autocast_step_runs_on_cpu():
    from fastdiff.train import make_step
    net, obj, opt, y, extra = _tiny_setup()
    step = make_step(net, obj, opt, device=torch.device("cpu"), bf16=True, compile=False, grad_clip=1.0)
    loss, _ = step(y, extra, 1e-3)
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in net.parameters())


def test_importing_the_sample_cli_keeps_fastdiff_sample_callable():
    import fastdiff
    import fastdiff.sample  # noqa: F401  (the CLI module of the same name)
    from fastdiff.diffusion import GaussianMixture
    gmm = GaussianMixture.ring(dim=2, dtype=torch.float32)
    x = fastdiff.sample(gmm.denoiser, (5, 2), steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 2) and torch.isfinite(x).all()


def test_kimg_sets_the_length(tmp_path):
    assert _run(tmp_path, "--kimg", "0.032", "--name", "k") == 0        # 32 images at batch 16
    saved = json.loads((tmp_path / "runs" / "k" / "config.json").read_text())
    assert saved["total_steps"] == 2
    assert os.path.exists(tmp_path / "runs" / "k" / "checkpoint-0000002.pt")


def test_clean_fid_path_with_a_stand_in_module(tmp_path, monkeypatch):
    """The clean-fid branch (samples -> PNG folder -> clean-fid features -> Frechet distance), with a
    stand-in `cleanfid` module: the real one downloads Inception weights."""
    import types
    from fastdiff.eval import feature_stats, fid, save_stats
    feats = _Features(16)
    calls = []

    def get_folder_features(fdir, model=None, num_workers=12, device=None, mode="clean", **kw):
        calls.append((fdir, mode))
        return feats(load_dataset(fdir).get(torch.arange(len(os.listdir(fdir))))).numpy()

    fake = types.SimpleNamespace(build_feature_extractor=lambda mode, device: "inception",
                                 get_folder_features=get_folder_features,
                                 compute_fid=lambda a, b, mode, device, num_workers: 1.5)
    monkeypatch.setitem(sys.modules, "cleanfid", types.SimpleNamespace(fid=fake))
    monkeypatch.setitem(sys.modules, "cleanfid.fid", fake)
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(300, 1, 4, 4, generator=gen) * 2 - 1
    save_stats(str(tmp_path / "ref.npz"), *feature_stats(feats(real)))
    got = fid(real, str(tmp_path / "ref.npz"))
    assert calls and calls[0][1] == "clean"
    assert got == pytest.approx(0.0, abs=0.05)          # only the 8-bit PNG round trip differs
    os.makedirs(tmp_path / "folder")
    assert fid(real, str(tmp_path / "folder")) == 1.5
