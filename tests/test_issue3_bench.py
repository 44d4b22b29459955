"""benchmarks/issue3.py, the issue's one-command benchmark, without a GPU: its parsers and target table against
result files that real H200 runs wrote (benchmarks/results/), and the report it assembles from its two stages."""

import os
import re
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import issue3  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
TRAINING = os.path.join(RESULTS, "training-2026-12-03-h200-s18-call1.md")  # d = 4096 / 7168 with every baseline
KERNELS = os.path.join(RESULTS, "kernels-2026-12-03-h200-s15-call2.md")  # proj and post_res_proj rows


def _text(path):
    with open(path) as f:
        return f.read()


def test_training_rows_give_the_rounds_overhead_the_single_pass_memory_and_liger():
    steps = issue3.parse_training(_text(TRAINING))
    assert steps[4096].mhc == 11.5 and steps[4096].mhc_range == "+9.4 .. +12.3"
    assert steps[4096].mhc_act == 17.7 and steps[4096].liger == 83.0
    assert (steps[7168].mhc, steps[7168].mhc_act, steps[7168].liger) == (7.0, 16.8, 47.1)
    assert steps[2048].mhc is None and steps[2048].liger is None  # "skipped: time budget" rows


def test_kernel_rows_at_the_target_shape_only():
    eff = issue3.parse_kernels(_text(KERNELS))
    assert eff == {"proj fwd": 98.5, "proj bwd": 73.4, "post_res_proj fwd": 76.0}  # GB/s over the copy bandwidth


def test_a_kernel_just_under_the_target_is_not_rounded_onto_it():
    """Session 31's table printed proj forward's 84.5 % as "85%": the target row takes the GB/s cell over the copy
    bandwidth, so proj forward and proj_pre_backward (84.6 %) are listed below 85 %, step forward (85.0 %) is not."""
    text = _text(os.path.join(RESULTS, "issue3-2026-12-05-h200-s31", "kernels", "kernels.md"))
    eff = issue3.parse_kernels(text)
    assert (eff["proj fwd"], eff["proj_pre_backward bwd"], eff["step fwd"]) == (84.5, 84.6, 85.0)
    row = issue3.targets(eff, {})[2]
    assert "proj fwd 84.5 %, proj_pre_backward bwd 84.6 %;" in row and "step fwd" not in row.split("; not")[0]


def test_a_copy_bandwidth_printed_as_zero_falls_back_to_the_eff_cells():
    """A smoke run on a loaded CPU printed "copy bandwidth ...: 0 GB/s" (session 35: two test runs at once), and
    the parser divided by it."""
    text = ("- copy bandwidth (2 GiB bf16 device-to-device, read + write): 0 GB/s\n"
            "| proj | fwd | 37 | 24 | 20354.2 | 0.0 | 0 | 12.5% | 319.5 |  |\n")
    assert issue3.parse_kernels(text, t=37, c=24) == {"proj fwd": 12.5}


def test_targets_say_met_and_missed_with_the_numbers():
    rows = issue3.targets(issue3.parse_kernels(_text(KERNELS)), issue3.parse_training(_text(TRAINING)))
    text = "\n".join(rows)
    assert "| training step <= 15 %, d = 4096 | +11.5 % (+9.4 .. +12.3) | yes |" in text
    assert "| training step <= 8 %, d = 7168 | +7.0 % (+6.1 .. +7.8) | yes |" in text
    assert "| activation memory <= 20 % | +17.7 % (d = 4096), +16.8 % (d = 7168) | yes |" in text
    assert "| < 1/5 of LigerMHC's overhead, same run | 0.139 (d = 4096), 0.149 (d = 7168) | yes |" in text
    assert "below: proj bwd 73.4 %, post_res_proj fwd 76.0 % | no |" in text
    over = issue3.parse_training(_text(TRAINING))
    over[7168].mhc = 8.4
    assert "| training step <= 8 %, d = 7168 | +8.4 % (+6.1 .. +7.8) | no |" in "\n".join(issue3.targets({}, over))


def test_report_assembles_both_stages(monkeypatch, tmp_path):
    """The stages as the scripts would leave them (here: copies of real outputs); the report holds the versions,
    the targets and both tables, and a failed stage makes the exit status 1."""
    calls = []

    def fake_stage(script, args, out_dir, log):
        calls.append((script, args))
        os.makedirs(out_dir, exist_ok=True)
        if script == "bench_kernels.py":
            shutil.copy(KERNELS, os.path.join(out_dir, "kernels.md"))
            return 0
        shutil.copy(TRAINING, os.path.join(out_dir, "training.md"))
        return 3

    monkeypatch.setattr(issue3, "run_stage", fake_stage)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda: "NVIDIA H200")
    assert issue3.main(["--out", str(tmp_path), "--rounds", "2", "--d", "4096", "7168"]) == 1
    assert calls[0] == ("bench_kernels.py", ["--tokens", "8192", "32768", "--channels", "2048", "4096", "7168",
                                             "--budget-s", "900"])
    assert calls[1][0] == "bench_training.py"
    assert calls[1][1][:7] == ["--d", "4096", "7168", "--variants", "naive", "liger", "--rounds"]
    (report,) = tmp_path.glob("issue3-*.md")
    text = report.read_text()
    assert "- device: NVIDIA H200" in text and "- torch " in text
    assert "bench_kernels.py exit 0, bench_training.py d=4096,7168 exit 3" in text
    assert "| training step <= 15 %, d = 4096 | +11.5 %" in text
    assert "| proj | bwd | 32768 | 4096 |" in text and "| 7168 | LigerMHC (rounds: 3) |" in text


def test_without_a_gpu_it_says_so(capsys, tmp_path):
    assert issue3.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_compute_bound_and_reference_rows_are_not_counted():
    """The H200 run of this script (session 18 call 5): coeffs (tiny bytes, Sinkhorn-bound) and the unfused reference
    design are listed apart, not as misses."""
    text = _text(os.path.join(RESULTS, "issue3-2026-12-03-h200-s18-call5", "kernels.md"))
    row = issue3.targets(issue3.parse_kernels(text), {})[2]
    assert row.startswith("| every kernel >= 85 % of copy bandwidth, 32768 x 4096 | 14 rows; below: step bwd 51.8 %, ")
    assert "not counted: coeffs bwd, coeffs fwd, unfused step bwd, unfused step fwd | no |" in row
    assert "coeffs" not in row.split("; not counted")[0]


def test_stages_run_apart_into_one_folder(monkeypatch, tmp_path):
    """The device tool's calls last 10 minutes: kernels in one call, each set of widths in another, the folder
    handed on. The report holds every stage's table and exit status; each call's exit status is its own."""
    def fake_stage(script, args, out_dir, log):
        os.makedirs(out_dir, exist_ok=True)
        if script == "bench_kernels.py":
            shutil.copy(KERNELS, os.path.join(out_dir, "kernels.md"))
            return 0
        widths = args[args.index("--d") + 1:args.index("--variants")]
        with open(os.path.join(out_dir, "training.md"), "w") as f:  # the real table's rows for these widths
            f.write("\n".join(line for line in _text(TRAINING).splitlines()
                              if not line.startswith("| ") or line.split("|")[1].strip() in widths))
        return 0 if widths == ["7168"] else 5

    monkeypatch.setattr(issue3, "run_stage", fake_stage)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda: "NVIDIA H200")
    out = str(tmp_path)
    assert issue3.main(["--out", out, "--stages", "kernels"]) == 0
    assert issue3.main(["--out", out, "--stages", "training", "--d", "4096"]) == 1
    assert issue3.main(["--out", out, "--stages", "training", "--d", "7168"]) == 0
    assert sorted(p.name for p in tmp_path.glob("training-*")) == ["training-d4096", "training-d7168"]
    (report,) = tmp_path.glob("issue3-*.md")
    text = report.read_text()
    assert "bench_kernels.py exit 0, bench_training.py d=4096 exit 5, bench_training.py d=7168 exit 0" in text
    assert "| training step <= 15 %, d = 4096 | +11.5 % (+9.4 .. +12.3) | yes |" in text
    assert "| training step <= 8 %, d = 7168 | +7.0 % (+6.1 .. +7.8) | yes |" in text
    assert "0.139 (d = 4096), 0.149 (d = 7168)" in text
    assert "### training-d4096" in text and "### training-d7168" in text and "| proj | bwd | 32768 | 4096 |" in text
    log = (tmp_path / "issue3.log").read_text()
    assert log.count("# issue3.py") == 3


def test_a_stage_cut_short_is_on_record(monkeypatch, tmp_path):
    def killed(script, args, out_dir, log):
        raise KeyboardInterrupt  # what the device tool's time limit does to the call

    monkeypatch.setattr(issue3, "run_stage", killed)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    try:
        issue3.main(["--out", str(tmp_path), "--stages", "training", "--d", "2048"])
    except KeyboardInterrupt:
        pass
    assert issue3._load_status(str(tmp_path)) == {"bench_training.py d=2048": "cut short"}


def test_the_full_size_folder_rebuilds_the_report_the_gpu_wrote(monkeypatch, tmp_path):
    """Session 19's full-size run (three device calls into one folder): the report rebuilt from the folder's
    files has the targets table the H200 run wrote."""
    src = os.path.join(RESULTS, "issue3-2026-12-03-h200-s19")
    shutil.copytree(src, tmp_path / "run")
    out = str(tmp_path / "run")
    written = _text(os.path.join(src, "issue3-2026-12-03.md"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rebuilt = _text(issue3.write_report(out, issue3._load_status(out), os.path.join(out, "issue3.log")))

    def table(text):
        return text.split("## Targets", 1)[1].split("\n## ", 1)[0].strip().splitlines()

    def below(row):  # the kernels under the target, without their numbers (printed rounded to 1 % in session 19)
        return re.findall(r"([a-z_ ()]+?) \d+(?:\.\d)? %", row.split("below: ", 1)[1].split(";")[0])

    old, new = table(written), table(rebuilt)
    assert len(old) == len(new) and [o == n for o, n in zip(old, new)] == [True] * 2 + [False] + [True] * (len(old) - 3)
    assert below(new[2]) == below(old[2]) and "step bwd 51.9 %, proj bwd 73.0 %" in new[2]
    assert "| training step <= 8 %, d = 7168 | +7.8 % (+7.1 .. +7.8) | yes |" in rebuilt
    assert "0.141 (d = 2048), 0.158 (d = 4096), 0.170 (d = 7168)" in rebuilt
    assert rebuilt.count("### training-d") == 2


def test_the_byte_floor_says_which_step_targets_bandwidth_alone_rules_out(monkeypatch, tmp_path):
    """Session 37's H100 folder: the default path's bytes over the residual adds (with fold_boundary_grads, the default
    since session 41: 39 to 49 elements of C a token and site at n = 4, 8 sites, less the chain's two ends' 14 once:
    cost.chain_ends; 8192 tokens, bf16) at the table's 3023 GB/s, against each residual step; d = 7168's 8 % and
    d = 4096's 15 % are above that range (without the fold, 47 to 57 and 30: d = 7168's target sat inside it)."""
    src = os.path.join(RESULTS, "session37-2026-12-05-h100", "issue3")
    shutil.copytree(src, tmp_path / "run")
    out = str(tmp_path / "run")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    report = _text(issue3.write_report(out, issue3._load_status(out), os.path.join(out, "issue3.log")))
    floor = report.split("## The byte floor of the training step", 1)[1].split("\n## ", 1)[0]
    gb = [(units * 8 - 14) * 8192 * 7168 * 2 / 1e9 for units in (39, 49)]
    ms = [g / 3023 * 1e3 for g in gb]
    want = (f"| 7168 | 193.23 | {gb[0]:.1f} .. {gb[1]:.1f} | {ms[0]:.2f} .. {ms[1]:.2f} | "
            f"{100 * ms[0] / 193.23:.1f} .. {100 * ms[1] / 193.23:.1f} % | 8 % target: above the floor with every "
            "site recomputed |")
    assert want in floor, floor
    assert "| 4096 | 68.82 |" in floor and "15 % target: above the floor with every site recomputed" in floor
    # no kernel table, no bandwidth: no floor section
    steps = issue3.merge_training([_text(os.path.join(src, "training-d7168", "training.md"))])
    assert issue3.byte_floor(steps, None) == [] and steps[7168].shape == issue3.StackShape(4, 8192, 2, 4)
    tight = issue3.byte_floor(steps, 1000.0)  # a third of the bandwidth: even no recompute is over 8 %
    assert "8 % target: below the floor even with no site recomputed" in tight[-1]


def test_parsers_read_what_bench_kernels_writes_today(tmp_path):
    """bench_kernels.py's smoke run (CPU, interpreter, tiny shapes) writes the table format the kernel parser
    reads, SM-clock column included (empty without nvidia-smi)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_kernels.py"), "--smoke",
                           "--tokens", "37", "--channels", "24", "--budget-s", "5"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "kernels.md").read_text()
    assert "| SM clock (triton) |" in text
    eff = issue3.parse_kernels(text, t=37, c=24)
    assert {"proj fwd", "post_res_proj fwd", "proj_pre_backward bwd", "step bwd", "post_res_proj (Triton) fwd",
            "step (Triton) fwd", "step (three-pass) bwd", "proj_pre_backward (Triton) bwd", "folded step (Triton) bwd",
            "enter (Triton) bwd", "enter (Gluon) bwd", "enter (broadcast) fwd", "enter (broadcast) bwd", "head bwd", "head (uncollapsed) bwd", "enter (collapsed) bwd", "proj (Triton) bwd", "proj_pre_backward (dx_hl) bwd",
            "folded step (dx_hl) bwd", "step (head, row) fwd", "step (head, row) bwd"} <= set(eff), sorted(eff)


def _rows(d, mhc_time, act="+17.7%", rounds=None):
    """bench_training.py's rows for one width: the baseline and backend=mhc (single pass, then rounds if given)."""
    rows = [f"| {d} | residual (Inductor) | 66.00 | +0.0% | 13.9 | 4.30 | +0.0% | |",
            f"| {d} | backend=mhc | 74.00 | {mhc_time} | 14.7 | 5.06 | {act} | |"]
    if rounds:
        rows.append(f"| {d} | backend=mhc (rounds: 3) | 74.60 | {rounds} | | | | |")
    return "\n".join(rows) + "\n"


def test_a_width_measured_twice_comes_whole_from_the_newest_run_that_measured_it(tmp_path):
    """Runs are ordered by when they last started (stages.json), not by folder name; a newer run replaces a
    width's time, range and memory together, and a newer failed row does not hide an older measurement."""
    out = str(tmp_path)
    for name, text in [("training-d4096-7168", _rows(4096, "+12.0%", rounds="+11.5% (+9.4 .. +12.3)")
                        + _rows(7168, "+7.0%", act="+16.8%")),
                       ("training-d4096", _rows(4096, "+13.0%", act="+12.0%")),
                       ("training-d7168", _rows(7168, "failed: OutOfMemoryError", act=""))]:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "training.md").write_text(text)
    rcs = {"bench_training.py d=4096,7168": 0, "bench_training.py d=4096": 0, "bench_training.py d=7168": 1}
    runs = issue3.training_runs(out, rcs)
    assert [name for name, _ in runs] == ["training-d4096-7168", "training-d4096", "training-d7168"]
    steps = issue3.merge_training([text for _, text in runs])
    assert (steps[4096].mhc, steps[4096].mhc_range, steps[4096].mhc_act) == (13.0, "", 12.0)  # all the newest run's
    assert (steps[7168].mhc, steps[7168].mhc_act) == (7.0, 16.8)  # the newest run failed at 7168
    # the same runs started in the other order: the older wins
    rcs = {"bench_training.py d=4096": 0, "bench_training.py d=4096,7168": 0}
    steps = issue3.merge_training([text for _, text in issue3.training_runs(out, rcs)])
    assert (steps[4096].mhc, steps[4096].mhc_range, steps[4096].mhc_act) == (11.5, "+9.4 .. +12.3", 17.7)


def test_a_rerun_clears_the_stage_it_replaces(monkeypatch, tmp_path):
    """A stage run again starts from an empty folder, so a call killed before its first row leaves no table from
    the run before it beside the new status; the re-run moves last in stages.json."""
    stale = tmp_path / "training-d2048"
    os.makedirs(stale)
    (stale / "training.md").write_text(_rows(2048, "+25.0%"))
    issue3._save_status(str(tmp_path), {"bench_training.py d=2048": 0, "bench_kernels.py": 0})
    seen = []

    def killed(script, args, out_dir, log):
        seen.append(os.path.exists(os.path.join(out_dir, "training.md")))
        raise KeyboardInterrupt

    monkeypatch.setattr(issue3, "run_stage", killed)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(KeyboardInterrupt):
        issue3.main(["--out", str(tmp_path), "--stages", "training", "--d", "2048"])
    assert seen == [False]
    assert list(issue3._load_status(str(tmp_path)).items()) == [("bench_kernels.py", 0),
                                                               ("bench_training.py d=2048", "cut short")]


def test_the_report_names_the_liger_kernel_the_training_runs_had(monkeypatch, tmp_path):
    """Rebuilt later by a process without liger-kernel on its path, the report still names the version the
    training run imported (session 19's first report said 'not installed' beside LigerMHC rows)."""
    def fake_stage(script, args, out_dir, log):
        os.makedirs(out_dir, exist_ok=True)
        shutil.copy(TRAINING, os.path.join(out_dir, "training.md"))
        return 0

    monkeypatch.setattr(issue3, "run_stage", fake_stage)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(issue3, "_liger_version", lambda: "0.8.5")
    assert issue3.main(["--out", str(tmp_path), "--stages", "training", "--d", "4096"]) == 0
    monkeypatch.setattr(issue3, "_liger_version", lambda: None)
    path = issue3.write_report(str(tmp_path), issue3._load_status(str(tmp_path)), str(tmp_path / "issue3.log"))
    text = open(path).read()
    assert "- liger-kernel in the training runs: 0.8.5" in text and "not installed" not in text
    os.remove(tmp_path / "training-d4096" / issue3.LIGER_FILE)  # a folder from before: this process's answer
    path = issue3.write_report(str(tmp_path), issue3._load_status(str(tmp_path)), str(tmp_path / "issue3.log"))
    assert "- liger-kernel: not installed" in open(path).read()


def test_a_report_rebuilt_without_a_gpu_names_the_device_the_stages_ran_on(tmp_path):
    """Folders of two device calls merged and the report rebuilt on a machine without a GPU (session 27): the
    device and version lines come from what the stages wrote, not from the rebuilding process."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "env.md").write_text("- device: NVIDIA H200\n- torch 2.11.0+cu130, triton 3.6.0\n"
                                                 "- n = 4, bf16 stream\n")
    (tmp_path / "training-d4096").mkdir()
    (tmp_path / "training-d4096" / "training.md").write_text(
        "# Training step\n\n- device: NVIDIA H200; torch 2.11.0+cu130; triton 3.6.0\n" + _rows(4096, "+11.2%"))
    lines = issue3._versions(str(tmp_path))
    assert lines[:2] == ["- device: NVIDIA H200", "- torch 2.11.0+cu130, triton 3.6.0"]
    (tmp_path / "training-d4096" / "training.md").write_text(
        "- device: NVIDIA H100 80GB HBM3; torch 2.12.0; triton 3.6.0\n" + _rows(4096, "+11.2%"))
    assert issue3._versions(str(tmp_path))[:2] == ["- device: NVIDIA H200 / NVIDIA H100 80GB HBM3",
                                                   "- torch 2.11.0+cu130, triton 3.6.0 / torch 2.12.0, triton 3.6.0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    import torch
    assert issue3._versions(str(empty))[1] == f"- torch {torch.__version__}, triton {__import__('triton').__version__}"


def test_side_by_side_triton_rows_are_not_counted():
    """A "(Triton)" row times the Triton kernel that a default Gluon kernel replaced (proj's backward without acc on
    sm_90): listed apart, while the row of the kernel that runs by default is counted."""
    kernels = {"proj bwd": 84.0, "proj (Triton) bwd": 72.0, "enter (Triton) bwd": 70.0, "pre fwd": 99.0,
               "proj_pre_backward (dx_hl) bwd": 80.0}
    row = issue3.targets(kernels, {})[2]
    assert "| 2 rows; below: proj bwd 84.0 %" in row
    assert "not counted: enter (Triton) bwd, proj (Triton) bwd, proj_pre_backward (dx_hl) bwd" in row
