"""The command line, end to end on the CPU with tiny settings."""

import json
import subprocess
import sys

import pytest
import torch

from mhc_compile.cli import main


def test_inspect_preset_writes_report_and_pictures(tmp_path, capsys):
    assert main(["inspect", "tinygpt", "--n", "2", "--out", str(tmp_path)]) == 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {"report.txt", "report.json", "graph_0_before.py", "graph_0_after.py", "graph_0_mhc.svg"} <= files
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["path"] for s in data["sites"]][:2] == ["blocks.0.mhc_qkv", "blocks.0.mhc_up"]
    assert "8 residual site(s)" in capsys.readouterr().out


def test_inspect_import_path_factory(tmp_path):
    assert main(["inspect", "tests.cli_factory:make", "--out", str(tmp_path)]) == 0
    assert "mhc_attn" in (tmp_path / "report.txt").read_text()


def test_inspect_rejects_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        main(["inspect", "nope"])


def test_bench_says_clearly_when_there_is_no_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_hands_the_script_its_own_arguments(capsys, monkeypatch):
    """`mhc-compile bench issue3 --stages kernels` runs benchmarks/issue3.py with `--stages kernels` as its argv
    (it used to see this command's `bench issue3` and stop on them), and returns the script's exit status."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = list(sys.argv)
    assert main(["bench", "issue3", "--help"]) == 0
    assert "--stages" in capsys.readouterr().out
    assert main(["bench", "issue3", "--stages", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert sys.argv == argv


def test_train_runs_end_to_end_quickly():
    out = subprocess.run(
        [sys.executable, "-m", "mhc_compile", "train", "--steps", "3", "--d", "32", "--layers", "1", "--batch", "4",
         "--seq", "16", "--inner-backend", "aot_eager", "--log-every", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rewrote residual site blocks.0.mhc_qkv" in out.stdout
    assert "added 6 mHC parameter tensors" in out.stdout
    assert "residual" in out.stdout and "mhc n=4" in out.stdout


def test_train_compare_writes_losses_and_gain_plots(tmp_path):
    from mhc_compile.cli import main as cli_main

    assert cli_main(["train", "--compare", "--steps", "3", "--d", "32", "--layers", "1", "--batch", "4", "--seq", "16",
                     "--inner-backend", "aot_eager", "--log-every", "1", "--out", str(tmp_path)]) == 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {"losses.csv", "loss_curves.png", "gains_hc.png", "gains_mhc.png", "h_res_mhc.png",
            "divergence_mhc.png", "diagnostics_mhc.txt"} <= files
    header = (tmp_path / "losses.csv").read_text().splitlines()[0]
    assert header == "step,residual,hc n=4,mhc n=4"
