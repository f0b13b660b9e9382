"""Reference-set options and class-conditional training end to end on the digits: --ref-size all,
--ref-sampling neighbours, --cond / --label-dropout, exact resume, 2-process gloo DDP, and
sampling with classifier-free guidance; the nets' class embeddings and nn.Guided."""
from __future__ import annotations

import math
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdiff import checkpoint as ckpt_io
from fastdiff.nn import NULL_CLASS, Guided, build_net
from fastdiff.train import main

# --threads 1: results depend on the thread count, and with the default (0) every run of this
# process would pick it afresh from the load average (a busy CI machine: 1, else torch's default).
TINY = ["--preset", "tiny", "--batch", "8", "--fid-every", "-1", "--sample-steps", "2", "--log-every", "1",
        "--warmup", "2", "--device", "cpu", "--no-compile", "--threads", "1"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FASTDIFF_FAULT", None)
    env.update(extra)
    return env


def _ckpt(run, step):
    return ckpt_io.load(str(run / f"checkpoint-{step:07d}.pt"))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------- networks and guidance

@pytest.mark.parametrize("model,shape", [("unet", (1, 8, 8)), ("mlp", (2,))])
def test_class_embedding_and_null_class(model, shape):
    torch.manual_seed(0)
    net = build_net(model, "tiny", shape, num_classes=10)
    for p in net.parameters():                       # the zero-initialized output layers would hide everything
        torch.nn.init.normal_(p, std=0.2)
    x, c = torch.randn(3, *shape), torch.randn(3)
    a, b = net(x, c, torch.tensor([1, 1, 1])), net(x, c, torch.tensor([2, 2, 2]))
    assert not torch.allclose(a, b)                  # the class changes the output
    assert torch.equal(net(x, c), net(x, c, torch.full((3,), NULL_CLASS)))   # no labels: the null class
    with pytest.raises(ValueError, match="class_labels must be an integer tensor of shape"):
        net(x, c, torch.tensor([1.0, 2.0, 3.0]))
    plain = build_net(model, "tiny", shape)
    with pytest.raises(ValueError, match="without classes"):
        plain(x, c, torch.tensor([1, 1, 1]))


def test_guided_combines_conditional_and_unconditional():
    torch.manual_seed(0)
    net = build_net("mlp", "tiny", (2,), num_classes=4)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, c, lab = torch.randn(5, 2), torch.randn(5), torch.tensor([0, 1, 2, 3, 0])
    cond, uncond = net(x, c, lab), net(x, c)
    assert torch.equal(Guided(net, lab, 1.0)(x, c), cond)
    assert torch.allclose(Guided(net, lab, 0.0)(x, c), uncond, atol=1e-6)
    assert torch.allclose(Guided(net, lab, 2.5)(x, c), uncond + 2.5 * (cond - uncond), atol=1e-5)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\)"):
        Guided(net, torch.tensor([4]), 2.0)
    with pytest.raises(ValueError, match="class-conditional network"):
        Guided(build_net("mlp", "tiny", (2,)), lab, 2.0)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        Guided(net, lab, float("nan"))


# ---------------------------------------------------------------------------- training end to end

@pytest.mark.parametrize("opts", [
    ["--ref-size", "all", "--xflip"],
    ["--ref-sampling", "neighbours", "--ref-neighbours", "2", "--ref-size", "40", "--xflip"],
    ["--cond", "--label-dropout", "0.25", "--ref-size", "all"],
    ["--cond", "--label-dropout", "0.25", "--ref-sampling", "neighbours", "--ref-neighbours", "2",
     "--ref-size", "40"],
    ["--cond", "--objective", "dsm"],
], ids=["all", "neighbours", "cond-all", "cond-neighbours", "cond-dsm"])
def test_train_and_resume_exactly(tmp_path, opts):
    out = ["--out", str(tmp_path / "runs")]
    assert main([*TINY, *opts, *out, "--steps", "4", "--ckpt-every", "2", "--name", "straight"]) == 0
    assert main([*TINY, *opts, *out, "--steps", "2", "--ckpt-every", "2", "--name", "halves"]) == 0
    assert main(["--resume", str(tmp_path / "runs" / "halves"), "--steps", "4"]) == 0
    a, b = _ckpt(tmp_path / "runs" / "straight", 4), _ckpt(tmp_path / "runs" / "halves", 4)
    for key in ("net", "ema", "opt", "obj", "rank_states", "step"):
        assert _same(a[key], b[key]), key
    if "--cond" in opts:
        assert a["data"]["classes"] == 10 and "map_label.table.weight" in a["net"]
    if "neighbours" in opts:
        assert (tmp_path / "runs" / "straight" / "knn-2.pt").exists()


def test_bad_reference_options_stop_with_a_message(tmp_path, capsys):
    out = ["--out", str(tmp_path / "runs"), "--steps", "1"]
    with pytest.raises(SystemExit) as e:
        main([*TINY, *out, "--ref-size", "some"])
    assert e.value.code == 2 and "expected a positive integer or 'all'" in capsys.readouterr().err
    for args, message in [
        (["--label-dropout", "0.2"], "needs --cond"),
        (["--ref-size", "all", "--ref-sampling", "neighbours"], "drop --ref-sampling neighbours"),
        (["--ref-sampling", "neighbours", "--ref-neighbours", "4", "--ref-size", "40"], "must exceed --batch"),
    ]:
        assert main([*TINY, *out, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_cond_needs_labels(tmp_path, capsys):
    import numpy as np
    np.savez(tmp_path / "x.npz", x=np.zeros((20, 8, 8), np.uint8))
    assert main([*TINY, "--out", str(tmp_path / "runs"), "--steps", "1", "--cond", "--data",
                 str(tmp_path / "x.npz")]) == 2
    assert "has no class labels" in capsys.readouterr().err


def test_sample_cli_class_and_guidance(tmp_path):
    run = tmp_path / "runs" / "c"
    assert main([*TINY, "--out", str(tmp_path / "runs"), "--name", "c", "--steps", "2", "--cond",
                 "--label-dropout", "0.25", "--objective", "dsm"]) == 0
    env = _env()
    r = subprocess.run([sys.executable, "-m", "fastdiff.sample", "--ckpt", str(run), "--n", "3", "--out",
                        str(tmp_path / "png"), "--steps", "2", "--class", "7", "--guidance", "2.0"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "png")) == ["000000.png", "000001.png", "000002.png"]
    bad = subprocess.run([sys.executable, "-m", "fastdiff.sample", "--ckpt", str(run), "--n", "3", "--out",
                          str(tmp_path / "png2"), "--class", "10"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "fastdiff.sample: error: --class" in bad.stderr and "Traceback" not in bad.stderr
    from fastdiff.train import generate, load_for_sampling
    cfg, ema, obj = load_for_sampling(str(run), torch.device("cpu"))
    gen = lambda w: torch.cat(list(generate(obj, ema, (1, 8, 8), 3, seed=0, steps=2, device=torch.device("cpu"),
                                            class_labels=torch.tensor([7, 7, 7]), guidance=w)))
    assert not torch.equal(gen(1.0), gen(3.0))


@pytest.mark.parametrize("opts", [
    ["--ref-size", "all", "--xflip"],
    ["--cond", "--label-dropout", "0.25", "--ref-sampling", "neighbours", "--ref-neighbours", "2", "--ref-size", "40"],
    ["--cond", "--label-dropout", "0.25", "--ref-size", "all"],
], ids=["all", "cond-neighbours", "cond-all"])
def test_ddp_two_processes(tmp_path, opts):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastdiff.train", *TINY, *opts, "--steps", "2", "--ckpt-every", "2", "--out", "runs",
                        "--name", "ddp"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sums = [x["rank_param_checksums"] for x in lines if "rank_param_checksums" in x]
    assert len(sums) == 1 and sums[0][0] == sums[0][1]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


def test_proxy_fid_per_class(tmp_path):
    run = tmp_path / "runs" / "f"
    assert main([*TINY, "--out", str(tmp_path / "runs"), "--name", "f", "--steps", "1", "--cond", "--objective",
                 "dsm", "--fid-every", "0", "--fid-samples", "40"]) == 0
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "fid_proxy" in x][0]
    per = rec["fid_proxy_per_class"]
    assert sorted(per, key=int) == [str(c) for c in range(10)] and all(v > 0 for v in per.values())
    assert rec["fid_proxy"] > 0
    # the per-class figure is the Frechet distance within the class
    from fastdiff import eval as fd_eval
    from fastdiff.data import load_dataset
    from fastdiff.train import generate, load_for_sampling
    cfg, ema, obj = load_for_sampling(str(run), torch.device("cpu"))
    samples = torch.cat(list(generate(obj, ema, (1, 8, 8), 40, seed=1, steps=2, device=torch.device("cpu"))))
    data = load_dataset("digits")
    real = data.get(torch.arange(len(data)))
    proxy = fd_eval.train_proxy(real, data.labels, steps=200, seed=0)
    again = fd_eval.fid_per_class(samples, torch.arange(40) % 10, real, data.labels, proxy)
    assert again[3] == pytest.approx(per["3"], rel=1e-4)


# ---------------------------------------------------------------------------- labels from the data

def test_labels_from_the_data(tmp_path):
    import pickle
    import zipfile

    import numpy as np
    from PIL import Image

    from fastdiff.data import DataError, load_dataset
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 2), ("ant", 3)):                  # classes in sorted name order: ant 0, cat 1
        os.makedirs(tmp_path / "f" / cls / "deeper", exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                tmp_path / "f" / cls / ("deeper" if i else "") / f"{i}.png")
    ds = load_dataset(str(tmp_path / "f"))
    assert ds.classes == ["ant", "cat"] and ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.num_classes == 2
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as zf:
        for root, _, names in os.walk(tmp_path / "f"):
            for n in names:
                zf.write(os.path.join(root, n), os.path.relpath(os.path.join(root, n), tmp_path / "f"))
    z = load_dataset(str(tmp_path / "f.zip"))
    assert z.classes == ["ant", "cat"] and sorted(z.labels.tolist()) == [0, 0, 0, 1, 1]
    # a file beside the class folders: unlabelled, and --cond says why
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "f" / "stray.png")
    mixed = load_dataset(str(tmp_path / "f"))
    assert mixed.labels is None and len(mixed) == 6
    with pytest.raises(DataError, match="'stray.png' lies outside any class sub-folder"):
        mixed.require_labels()
    # npz: a labels array beside the data
    np.savez(tmp_path / "l.npz", x=rng.integers(0, 256, (4, 6, 6), dtype=np.uint8), labels=np.array([2, 0, 1, 2]))
    n = load_dataset(str(tmp_path / "l.npz"))
    assert n.labels.tolist() == [2, 0, 1, 2] and n.num_classes == 3 and n.shape == (1, 6, 6)
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3), np.float32), labels=np.array([0.5, 1, 2, 3]))
    with pytest.raises(DataError, match="'labels' must be 4 non-negative integers"):
        load_dataset(str(tmp_path / "bad.npz")).require_labels()
    # CIFAR-10's own labels; the digits'; the ring's components
    cifar = tmp_path / "c" / "cifar-10-batches-py"
    os.makedirs(cifar)
    with open(cifar / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [4, 9, 0]}, f)
    assert load_dataset(str(tmp_path / "c")).labels.tolist() == [4, 9, 0]
    from sklearn.datasets import load_digits
    assert torch.equal(load_dataset("digits").labels, torch.from_numpy(load_digits().target).long())
    g = load_dataset("gmm")
    assert g.num_classes == 8 and torch.equal(g.labels, torch.atan2(g.data[:, 1], g.data[:, 0]).mul(4 / math.pi)
                                              .round().remainder(8).long())


@pytest.mark.parametrize("case", ["all", "neighbours", "cond-dropout"])
def test_reference_step_traces_as_one_graph(case):
    """The objective with a whole-set / weighted / class-conditional reference set (label-dropout's
    two op calls included) is one graph for torch.compile, as the plain step is."""
    from fastdiff import refsets
    from fastdiff.data import Sampler, load_dataset
    from fastdiff.diffusion import make_objective
    d = load_dataset("digits")
    cond = case.startswith("cond")
    net = build_net("unet", "tiny", (1, 8, 8), num_classes=10 if cond else 0)
    obj = make_objective("stf", stf_backend="torch")
    idx = torch.arange(8)
    if case == "neighbours":
        r = refsets.make_refset("neighbours", d, Sampler(len(d), 8, 0), batch=8, ref_size=64, neighbours=2)(idx, None)
    else:
        r = refsets.make_refset("uniform", d, None, batch=8, ref_size="all", cond=cond)(idx, None)
    kw = dict(ref=r.ref, ref_logw=r.ref_logw)
    if cond:
        kw.update(labels=d.labels[idx], ref_labels=r.ref_labels, n_uncond=2)
    torch._dynamo.reset()
    e = torch._dynamo.explain(lambda y: obj(net, y, None, **kw))(d.get(idx))
    assert e.graph_break_count == 0 and e.graph_count == 1, e.break_reasons
