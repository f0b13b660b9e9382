"""Train-step throughput (images/s = batch / step time): DSM vs STF (ref-size 1024, 4096),
eager vs torch.compile, fp32 vs bf16 autocast; the DDPM++ CIFAR-10 network (55.7M params)
at 32x32 and batch 128 on CUDA, the "tiny" preset at 8x8 on CPU.

Targets (H100, batch 128): STF step <= 1.03x the DSM step; compiled >= 1.25x eager; at
ref-size 4096, >= 1.5x faster than the same network trained with the published STF formula
(peer "published": the (B, N, D) difference tensor, softmax, weighted sum).

    pytest benchmarks/test_train_bench.py --benchmark-only
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import pytest
import torch

import fastdiff
from fastdiff.diffusion import make_objective
from fastdiff.nn import build_net
from fastdiff.train import make_step

CUDA = torch.cuda.is_available()
sys.path.insert(0, os.path.dirname(__file__))


def _published_stf_target(x, sigma, ref, **_):
    """fastdiff.stf_target's signature around the published formula (benchmarks/_stf_peers.py)."""
    from _stf_peers import published
    B = x.shape[0]
    s = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(B)
    t = published(x.reshape(B, -1).float(), s, ref.reshape(ref.shape[0], -1).float())
    return t.reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def _published(active: bool):
    if not active:
        yield
        return
    orig = fastdiff.stf_target
    fastdiff.stf_target = _published_stf_target
    try:
        yield
    finally:
        fastdiff.stf_target = orig


def _bench(benchmark, *, device, preset, shape, batch, objective, ref_size, compile, precision, rounds,
           published=False, refs=None):
    torch.manual_seed(0)
    net = build_net("unet", preset, shape).to(device).train()
    obj = make_objective(objective=objective).to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(obj.parameters()), lr=1e-4, fused=device.type == "cuda")
    step = make_step(net, obj, opt, device=device, bf16=precision == "bf16", compile=compile, grad_clip=1.0)
    y = torch.rand(batch, *shape, device=device) * 2 - 1
    extra = torch.rand(ref_size - batch, *shape, device=device) * 2 - 1 if objective == "stf" and not refs else None

    def run():
        step(y, extra, 1e-4, refs=refs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # group and peer before pedantic, which copies the group into the stats it creates
    name = "dsm" if objective == "dsm" else f"stf-{ref_size}" + ("-published" if published else "") + \
        (f" ({len(refs['ref'])} rows)" if refs else "")
    benchmark.group = f"train step {preset} {shape[-1]}x{shape[-1]} b{batch} {precision}"
    benchmark.extra_info["peer"] = f"{name} {'compiled' if compile else 'eager'}"
    with _published(published):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()                               # compile and warm up outside the timing
        fallback = [w for w in caught if "torch.compile failed" in str(w.message)]
        if compile and fallback:                # make_step went eager: not a compiled figure
            pytest.fail(f"the compiled step fell back to eager: {fallback[0].message}")
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats:                         # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.mean


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_step_cuda_published_stf(benchmark, precision):
    _bench(benchmark, device=torch.device("cuda"), preset="ddpmpp-cifar", shape=(3, 32, 32), batch=128,
           objective="stf", ref_size=4096, compile=False, precision=precision, rounds=20, published=True)


CUDA_CASES = [(o, r) for o, r in (("dsm", 1), ("stf", 1024), ("stf", 4096))]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("objective, ref_size", CUDA_CASES, ids=["dsm", "stf1024", "stf4096"])
def test_train_step_cuda(benchmark, objective, ref_size, compile, precision):
    _bench(benchmark, device=torch.device("cuda"), preset="ddpmpp-cifar", shape=(3, 32, 32), batch=128,
           objective=objective, ref_size=ref_size, compile=compile, precision=precision, rounds=20)


@pytest.mark.parametrize("objective, ref_size, published", [("dsm", 1, False), ("stf", 256, False),
                                                            ("stf", 256, True)],
                         ids=["dsm", "stf256", "stf256-published"])
def test_train_step_cpu(benchmark, objective, ref_size, published):
    _bench(benchmark, device=torch.device("cpu"), preset="tiny", shape=(1, 8, 8), batch=32, objective=objective,
           ref_size=ref_size, compile=False, precision="fp32", rounds=3, published=published)


def test_train_step_cpu_whole_set(benchmark):
    """--ref-size all on the digits (N = 1797 reference rows every step), beside the DSM step of
    test_train_step_cpu (same group). Target: <= 1.2x the DSM step."""
    from fastdiff import refsets
    from fastdiff.data import load_dataset
    whole = refsets.make_refset("uniform", load_dataset("digits"), None, batch=32, ref_size="all")(None, None)
    _bench(benchmark, device=torch.device("cpu"), preset="tiny", shape=(1, 8, 8), batch=32, objective="stf",
           ref_size="all", compile=False, precision="fp32", rounds=3, refs={"ref": whole.ref})
