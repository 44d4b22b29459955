"""explain(), dump_dir files, the pass log under TORCH_LOGS and the structured-trace artifact."""

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import torch

import mhc_compile
from models import NanoGPT


def test_explain_reports_sites_parameters_breaks_and_leaves_the_model_alone(capsys):
    model = NanoGPT(layers=2, break_at=1)
    before = [k for k, _ in model.named_parameters()]
    report = mhc_compile.explain(model, torch.randint(0, 64, (2, 8)), n=4, fuse=True)
    assert [k for k, _ in model.named_parameters()] == before  # explain works on a copy
    assert [s.path for s in report.sites] == ["h.0.mhc_attn", "h.0.mhc_mlp", "h.1.mhc_attn", "h.1.mhc_mlp"]
    assert {s.kind for s in report.sites} == {"pre-norm"}
    assert all(s.width == 32 and s.owner_type == "Block" for s in report.sites)
    assert report.sites[0].parameters == {"phi": (128, 24), "bias": (24,), "alpha": (3,)}
    assert report.parameters_added == 4 * (128 * 24 + 24 + 3)
    assert report.graph_count == 3 and len(report.graph_breaks) == 1
    assert "graph_break" in report.graph_breaks[0] and "models.py" in report.graph_breaks[0]
    # graph 0 holds block 0 (head enters, the next site is a fused step, the tail a post_res); Dynamo splits
    # block 1 at the break, so each of its sites is a one-site chain
    assert [s.kernels for s in report.sites] == ["reference: enter", "reference: step + post_res",
                                                 "reference: enter + post_res", "reference: enter + post_res"]
    assert all(s.recompute_block is not None for s in report.sites)
    # the cost model's line for C = 32, fp32: (14 + 21 + 14 - 3) C = 46 * 32 * 4 bytes = 5.75 KiB a token
    assert report.traffic == ["bookkeeping traffic per site and token (fused, n=4, C=32, 4-byte stream): "
                              "forward 14C, backward 21C, recompute 14C; 5.8 KiB over a plain residual add at a site "
                              "its recompute schedule recomputes"]
    # Dynamo compiles each block's frame alone, so every graph's chain may take and hand on n streams
    # (runtime/carry.py); block 0's input, from the embeddings, will carry none
    takes, hands = "starts from the n streams its input carries from a graph before, if it carries any", \
        "hands its n streams to the next graph"
    assert report.carried == [f"h.0.mhc_attn {takes}", f"h.0.mhc_mlp {hands}", f"h.1.mhc_attn {takes}",
                              f"h.1.mhc_attn {hands}", f"h.1.mhc_mlp {takes}", f"h.1.mhc_mlp {hands}"]
    out = capsys.readouterr().out
    assert "h.1.mhc_mlp" in out and "graph break" in out and f"carried: h.1.mhc_mlp {takes}" in out


def test_explain_lists_unconverted_structures():
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            x += self.lin(x)
            return x

    report = mhc_compile.explain(InPlace(), torch.randn(2, 8), print_summary=False)
    assert report.sites == []
    assert any("in-place residual add" in u for u in report.unconverted)


def test_dump_dir_writes_graphs_and_a_picture(tmp_path):
    model = NanoGPT(layers=1)
    torch.compile(model, backend="mhc", options={"dump_dir": str(tmp_path), "inner_backend": "aot_eager", "fuse": True})(
        torch.randint(0, 64, (2, 8)))
    files = sorted(os.listdir(tmp_path))
    assert all(any(f.endswith(s) for f in files) for s in ("_after.py", "_before.py", "_mhc.svg")), files
    after = (tmp_path / [f for f in files if f.endswith("_after.py")][0]).read_text()
    assert all(f"mhc_compile.{op}" in after for op in ("enter", "step", "post_res"))
    assert "# File:" in after  # source lines of the user's code
    ast.parse(after)  # the dump is readable Python
    svg = ET.parse(tmp_path / [f for f in files if f.endswith(".svg")][0]).getroot()
    texts = " ".join(t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text"))
    assert "post_res" in texts and "enter" in texts and "step" in texts


SCRIPT = r"""
import warnings, torch, sys
warnings.simplefilter("ignore")
sys.path.insert(0, {tests!r})
from models import NanoGPT
torch.compile(NanoGPT(layers=1), backend="mhc", options={{"inner_backend": "aot_eager"}})(torch.randint(0, 64, (2, 8)))
"""


def _run(env_extra, tmp_path):
    env = {**os.environ, **env_extra}
    script = SCRIPT.format(tests=os.path.dirname(__file__))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_torch_logs_shows_the_pass_log(tmp_path):
    out = _run({"TORCH_LOGS": "+mhc_compile"}, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "site x_1 = x + linear_1" in out.stderr or "mhc: graph 0: site" in out.stderr
    assert "after the rewrite" in out.stderr


def test_structured_trace_gets_the_rewritten_graph(tmp_path):
    out = _run({"TORCH_TRACE": str(tmp_path)}, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert "mhc_rewritten_graph_0" in logs
    assert "mhc_compile.post_res" in logs
