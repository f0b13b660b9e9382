"""The training CLI as a newcomer meets it: --help, run names, finished runs, printed commands."""
from __future__ import annotations

import os
import re

import pytest

from fastdiff.diffusion.density import DENSITIES
from fastdiff.diffusion.weighting import WEIGHTINGS
from fastdiff.train import build_parser, main

GMM = ["--data", "gmm", "--model", "mlp", "--preset", "tiny", "--batch", "16", "--ref-size", "32", "--fid-every", "-1",
       "--sample-steps", "2", "--log-every", "1", "--warmup", "1", "--device", "cpu", "--no-compile"]


def test_help_shows_each_default_once_and_lists_choices():
    text = build_parser().format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    assert not re.search(r"\(default: [^)]*\) \(default:", flat)
    for option, names in (("--weighting", WEIGHTINGS), ("--density", DENSITIES)):
        line = next(x for x in text.splitlines() if x.strip().startswith(option))
        assert all(name in line for name in names), line
    assert "uniform" in text and "x0_mse" in text
    assert "total length" in flat           # --steps is the total, not additional steps


def test_unknown_choice_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--weighting", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--weighting" in err and "sigmoid" in err


def test_run_name_tells_weighting_and_density_apart(tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert main([*GMM, "--steps", "1", "--out", out]) == 0
    assert main([*GMM, "--steps", "1", "--out", out, "--weighting", "sigmoid", "--density", "uniform"]) == 0
    names = sorted(os.listdir(out))
    assert names[0].startswith("00000-gmm-stf-edm-lognormal-mlp-tiny"), names
    assert names[1].startswith("00001-gmm-stf-sigmoid-uniform-mlp-tiny"), names


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert main([*GMM, "--steps", "2", "--out", out, "--name", "f"]) == 0
    printed = capsys.readouterr().out
    assert "--steps 4" in printed and "new total" in printed
    run = os.path.join(out, "f")
    before = sorted(os.listdir(run))
    assert main(["--resume", run]) == 0
    printed = capsys.readouterr().out
    assert "is finished" in printed and "step 2 of its total of 2" in printed and f"--resume {run} --steps 4" in printed
    assert sorted(os.listdir(run)) == before            # nothing written
    assert main(["--resume", run, "--steps", "3"]) == 0  # a larger total extends it
    assert os.path.exists(os.path.join(run, "checkpoint-0000003.pt"))


def test_printed_sample_command_suits_the_cpu(tmp_path, capsys):
    assert main([*GMM, "--steps", "1", "--out", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out
    assert "--n 5000 " in printed and "--n 50000" not in printed


def test_readme_gives_a_cpu_only_install():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    quick = readme[readme.index("## Quick start"):readme.index("## The STF target")]
    assert "whl/cpu" in quick and "FASTDIFF_NO_CUDA=1" in quick     # no 5.7 GB CUDA torch, no sm_90 build


def test_no_importance_weighting_reaches_the_objective(tmp_path, capsys):
    from fastdiff.train import load_for_sampling
    out = str(tmp_path / "runs")
    assert main([*GMM, "--steps", "1", "--out", out, "--name", "w", "--no-importance-weighting",
                 "--weighting", "min_snr", "--density", "uniform", "--process", "vp", "--param", "eps"]) == 0
    cfg, _, obj = load_for_sampling(os.path.join(out, "w"), "cpu")
    assert cfg["importance_weighting"] is False and obj.importance_weighted is False
    code = main([*GMM, "--steps", "1", "--out", out, "--no-importance-weighting", "--density", "adaptive"])
    assert code == 2 and "adaptive" in capsys.readouterr().err


def test_printed_sample_command_runs(tmp_path, capsys):
    """The command printed after training works as printed (at a smaller --n): one .npz of uint8 images."""
    import shlex
    import numpy as np
    from fastdiff.sample import main as sample_main
    out = str(tmp_path / "runs")
    assert main(["--preset", "tiny", "--batch", "16", "--ref-size", "32", "--fid-every", "-1", "--sample-steps", "2",
                 "--warmup", "1", "--device", "cpu", "--no-compile", "--steps", "1", "--out", out]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "fastdiff.sample" in x and "sample:" in x)
    argv = shlex.split(line.split("sample:", 1)[1])[3:]          # drop "python -m fastdiff.sample"
    argv[argv.index("--n") + 1] = "3"
    assert sample_main([*argv, "--steps", "2"]) == 0
    path = argv[argv.index("--out") + 1]
    assert path.endswith(".npz")
    arr = np.load(path)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 8, 8, 1)


def test_resume_after_a_kill_logs_each_step_once(tmp_path, capsys):
    """A killed run logged steps past its last checkpoint; the resumed run trains them again and
    metrics.jsonl keeps one record per step (a torn last line goes too)."""
    import json
    out = str(tmp_path / "runs")
    assert main([*GMM, "--steps", "3", "--ckpt-every", "2", "--keep", "5", "--out", out, "--name", "k"]) == 0
    run = os.path.join(out, "k")
    os.remove(os.path.join(run, "checkpoint-0000003.pt"))       # as if killed before step 3's checkpoint
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')                              # and halfway through a line
    assert main(["--resume", run]) == 0
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    steps = [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)]
    assert steps == [1, 2, 3], steps


def test_an_error_in_the_loop_leaves_on_its_own_line(tmp_path, capsys, monkeypatch):
    from fastdiff import checkpoint as ckpt_io
    from fastdiff import train

    def full_disk(run):
        raise ckpt_io.CheckpointError("no space left for the checkpoint (test)")
    monkeypatch.setattr(train, "save_checkpoint", full_disk)
    assert main([*GMM, "--steps", "3", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "no space left" in x)
    assert line.startswith("fastdiff.train: error:"), line          # not glued to the progress bar
