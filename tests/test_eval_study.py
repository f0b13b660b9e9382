"""fastdiff.eval.study: end to end on a tiny budget, the summary's arithmetic, resume, bad arguments."""
import json
import math
import os

import numpy as np
import pytest
import torch

from fastdiff.eval import study as S

def _has_mpl():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


TINY = ["--steps", "6", "--seeds", "2", "--evals", "2", "--eval-rows", "8", "--batch", "16", "--warmup", "2",
        "--preset", "tiny"]
PLOT = [] if _has_mpl() else ["--no-plot"]      # matplotlib is optional


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _main(capsys, *args):
    try:
        code = S.main(list(args))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_gmm_end_to_end_every_arm(tmp_path, capsys):
    arms = "dsm,stf-32,stf-all,sigmoid,adaptive,stf-16+density=adaptive"
    code, out = _main(capsys, "--data", "gmm", "--arms", arms, "--out", str(tmp_path), *TINY, *PLOT)
    assert code == 0, out.err
    study = json.loads((tmp_path / "study.json").read_text())
    assert list(study["results"]) == arms.split(",")
    assert study["settings"]["arm_specs"]["stf-all"]["ref"] == "all"
    assert study["settings"]["arm_specs"]["sigmoid"]["weighting"] == "sigmoid"
    for arm, seeds in study["results"].items():
        assert set(seeds) == {"0", "1"}
        for r in seeds.values():
            assert r["step"][-1] == 6 and len(r["err"]) == len(r["step"]) == len(r["wall"])
            assert all(math.isfinite(e) and e > 0 for e in r["err"] + r["err_emp"])
            assert len(r["err_bands"][-1]) == S.EVAL_BANDS
    # seeds differ, arms share the initial network: at step 0 they would agree; after training they differ
    d0, d1 = study["results"]["dsm"]["0"]["err"], study["results"]["dsm"]["1"]["err"]
    assert d0 != d1
    assert study["results"]["dsm"]["0"]["err"] != study["results"]["stf-all"]["0"]["err"]
    summ = study["summary"]
    assert summ["metric"] == "err" and summ["baseline"] == "dsm" and set(summ["arms"]) == set(arms.split(","))
    if _has_mpl():
        assert (tmp_path / "study.png").stat().st_size > 10_000
    assert "dsm" in out.out and "stf-all" in out.out


def test_rerun_reuses_finished_runs(tmp_path, capsys):
    args = ["--data", "gmm", "--arms", "dsm,stf-all", "--out", str(tmp_path), "--no-plot", *TINY, "--seeds", "1"]
    assert _main(capsys, *args)[0] == 0
    first = json.loads((tmp_path / "study.json").read_text())
    path = tmp_path / "runs" / "dsm__seed0.json"
    stamp = os.stat(path).st_mtime_ns
    assert _main(capsys, *args)[0] == 0
    assert os.stat(path).st_mtime_ns == stamp                      # reused, not retrained
    assert json.loads((tmp_path / "study.json").read_text())["results"] == first["results"]
    # a different budget is a different study: the run is redone
    assert _main(capsys, *args[:-2], "--seeds", "1", "--lr", "2e-3")[0] == 0
    assert os.stat(path).st_mtime_ns != stamp


def test_training_is_deterministic_per_seed(tmp_path):
    cfg = vars(S.build_parser().parse_args(["--out", str(tmp_path), "--arms", "stf-32", *TINY, "--seeds", "1"]))
    a = S.run_study(dict(cfg, out=str(tmp_path / "a")), progress=False)
    b = S.run_study(dict(cfg, out=str(tmp_path / "b")), progress=False)
    assert a["results"]["stf-32"]["0"]["err"] == b["results"]["stf-32"]["0"]["err"]


def test_images_record_proxy_fid(tmp_path, capsys):
    g = np.random.default_rng(0)
    imgs = (g.random((40, 8, 8)) * 255).astype(np.uint8)
    np.savez(tmp_path / "imgs.npz", x=imgs)
    code, out = _main(capsys, "--data", str(tmp_path / "imgs.npz"), "--arms", "dsm,stf-all", "--out",
                      str(tmp_path / "o"), "--steps", "3", "--seeds", "1", "--evals", "1", "--eval-rows", "4",
                      "--batch", "8", "--fid-samples", "16", "--sample-steps", "2", "--proxy-steps", "5", "--no-plot")
    assert code == 0, out.err
    study = json.loads((tmp_path / "o" / "study.json").read_text())
    assert study["summary"]["metric"] == "err_emp" and study["settings"]["model"] == "unet"
    for arm in ("dsm", "stf-all"):
        r = study["results"][arm]["0"]
        assert "err" not in r and r["fid_step"] == [3] and math.isfinite(r["fid"][0])
        assert "final_fid" in study["summary"]["arms"][arm]


def test_steps_to_reach_interpolates_in_log_error():
    assert S.steps_to_reach([10, 20, 40], [1.0, 0.5, 0.1], 1.0) == 10.0
    s = S.steps_to_reach([10, 20, 40], [1.0, 0.4, 0.1], 0.2)          # between 20 (0.4) and 40 (0.1)
    assert s == pytest.approx(20 + 20 * math.log(2) / math.log(4))
    assert S.steps_to_reach([10, 20], [1.0, 0.5], 0.3) is None


def test_summary_ci_and_speedup():
    def run(steps, err):
        return {"step": steps, "err": err, "seconds_per_step": 0.01}
    res = {"dsm": {"0": run([50, 100], [2.0, 1.0]), "1": run([50, 100], [2.0, 1.0])},
           "fast": {"0": run([50, 100], [1.0, 0.5]), "1": run([50, 100], [0.9, 0.5]), "2": run([50, 100], [1.1, 0.5])},
           "slow": {"0": run([50, 100], [3.0, 2.0]), "1": run([50, 100], [3.0, 0.9])}}
    summ = S.summarize(res, "err", 100)
    assert summ["threshold"] == 1.0
    fast = summ["arms"]["fast"]
    per = fast["steps_to_baseline_final"]["per_seed"]
    assert per[0] == 50.0 and per[1] == 50.0 and 50 < per[2] < 100
    lo, hi = fast["steps_to_baseline_final"]["ci95"]
    assert lo < fast["steps_to_baseline_final"]["mean"] < hi
    assert fast["speedup"] == pytest.approx(100 / fast["steps_to_baseline_final"]["mean"])
    slow = summ["arms"]["slow"]
    assert slow["steps_to_baseline_final"]["reached"] == "1/2" and "speedup" not in slow
    assert summ["arms"]["dsm"]["steps_to_baseline_final"]["mean"] == 100.0


@pytest.mark.parametrize("args, match", [
    (["--data", "no-such-data"], "no-such-data"),
    (["--arms", "dsm,foo"], "unknown arm"),
    (["--arms", "stf-8", "--batch", "16"], ">= --batch"),
    (["--arms", "stf-x"], "stf-N"),
    (["--arms", "dsm+weighting=nope"], "weighting"),
    (["--arms", "dsm+color=red"], "modifier"),
    (["--arms", ","], "no arms"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "0"], "--seeds"),
    (["--model", "unet"], "--model unet"),
    (["--steps", "x"], "--steps"),
])
def test_bad_arguments(tmp_path, capsys, args, match):
    code, out = _main(capsys, "--out", str(tmp_path), "--no-plot", *args)
    assert code == 2
    lines = [ln for ln in out.err.strip().splitlines() if "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("fastdiff.eval.study: error:") and match in lines[0], out.err


def test_missing_matplotlib_is_a_clear_error_before_training(tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    code, out = _main(capsys, "--out", str(tmp_path), *TINY)
    assert code == 2 and "matplotlib" in out.err and "--no-plot" in out.err
    assert not (tmp_path / "runs").exists()                  # nothing was trained
