"""End to end through Inductor (slow on the CPU: one compiled model shared by the tests here)."""

import re

import pytest
import torch

import mhc_compile
from models import NanoGPT, eager_mhc_nanogpt, perturb_mhc


def _prepared(layers):
    """A NanoGPT prepared at n=4 with its mHC parameters moved off their init."""
    torch._dynamo.reset()
    model = NanoGPT(layers=layers)
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx, n=4)
    perturb_mhc(model)
    return model, idx


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model, idx = _prepared(layers=2)
    step = torch.compile(model, backend="mhc", options={"n": 4})  # Inductor, recompute="auto"
    return model, step, idx


def _step_matches_eager_oracle(model, step, idx, caplog, code=None) -> str:
    """One compiled forward + backward against the eager mHC oracle (values and every gradient); returns
    what the backend logged while compiling it (and appends the generated code to ``code``)."""
    from torch._inductor.utils import run_and_get_code

    def run():
        out = step(idx)
        out.square().mean().backward()
        return out

    # caches off: a graph another test compiled would come back from the cache without running the passes
    with caplog.at_level("INFO", logger="mhc_compile"), torch._inductor.config.patch(force_disable_caches=True):
        out, sources = run_and_get_code(run)
    if code is not None:
        code.extend(sources)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    want = eager_mhc_nanogpt(model, idx, n=4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    want.square().mean().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    model.zero_grad()
    return caplog.text


def test_inductor_forward_and_gradients_match_eager_oracle(compiled, caplog):
    """Also checks that the backward pass ran Inductor's graph through passes/fold_stream_grads.py."""
    code = []
    log = _step_matches_eager_oracle(*compiled, caplog, code)
    assert "folded the stream-gradient sums of 4 of 4 site(s)" in log
    assert "post_res pass" not in log  # fold_post_res_proj is opt-in
    # forward and backward graphs call the ops' direct twins, not the custom ops (runtime/ops.py, the end)
    assert len(code) == 2 and all("torch.ops.mhc_compile_direct." in c for c in code)
    assert not any(re.search(r"torch\.ops\.mhc_compile\.\w+\.default\(", c) for c in code)
    # passes/fold_pre_recompute.py: recompute="auto" recomputes every site's pre in the backward, and each one comes
    # out of its site's post_res backward
    assert "made the recomputed sublayer input of 4 of 4 site(s) in their post_res backward" in log
    # passes/broadcast_collapse_grad.py: the head's mean-collapse gradient reaches the last site's post_res backward
    # as a stride-0 view of one row a token (no n-wide buffer), so that op writes a buffer of its own ...
    assert "kept 1 collapse gradient(s) as a broadcast view of one row a token" in log
    # passes/collapse_tail.py: the last site's post_res and the mean after it are one op in the forward graph
    assert "collapsed 1 chain tail(s) in the kernel that mixes them" in log
    assert code[0].count("mhc_compile_direct.post_res_collapse.default(") == 1
    backward = code[1]
    # (its dout, the fifth argument, a broadcast [2, 8, 4, 32] view)
    views = re.findall(r"post_res_backward_pre\.default\((?:[\w.]+, ){4}reinterpret_tensor\(\w+, \(2, 8, 4, 32\), "
                       r"\(256, 32, 0, 1\)", backward)
    assert len(views) == 1, views
    # passes/collapse_head_grad.py: the head site's proj backward writes the embedding's gradient summed over the
    # streams (one row a token, not n rows and a sum after), and so does its post_res backward (collapse_dx), whose
    # dx is that op's acc ...
    assert "wrote 1 chain head gradient(s) summed over the streams (1 with the residual path's part" in log
    assert backward.count("mhc_compile_direct.proj_pre_backward_collapsed.default(") == 1
    assert len(re.findall(r"post_res_backward_pre\.default\([^\n]*, True\)", backward)) == 1
    # passes/fold_boundary_grads.py (on by default since session 41): each boundary but the head's runs its proj/pre
    # backward and the post_res backward it feeds as one op, two of the three here ...
    assert "folded 2 of 3 site boundaries' backward into one op each" in log
    # ... and passes/inplace_stream_grads.py makes every other backward op of every site write the stream gradient
    # over the one it reads (the two boundaries and the proj backward of the site after the head); the gradients
    # above still match
    assert "wrote the stream gradient of 3 of 5 backward op(s)" in log
    assert backward.count("mhc_compile_direct.boundary_backward_into.default(") == 2
    assert backward.count("mhc_compile_direct.proj_pre_backward_into.default(") == 1
    assert "post_res_backward_pre_into.default(" not in backward
    assert "post_res_backward.default(" not in backward and "proj_pre_backward.default(" not in backward
    assert "mhc_compile_direct.pre.default(" not in backward


def test_coefficient_capture_sees_every_site_of_an_inductor_graph(compiled):
    """Inductor's code calls the ops' direct twins; they run the same Python as the custom ops, so
    diagnostics' capture still records every site's coefficients."""
    from mhc_compile.runtime.ops import capture_coefficients

    _, step, idx = compiled
    with capture_coefficients() as records:  # with grad: the training graph compiled above, no recompile
        step(idx)
    h_res = {r["site"]: r["h_res"] for r in records if "h_res" in r}
    assert len(h_res) == 4  # 2 layers x (attention, MLP)
    for m in h_res.values():  # Sinkhorn's output: doubly stochastic up to its 20 iterations
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=2e-2, rtol=0)
        torch.testing.assert_close(m.sum(-2), torch.ones_like(m.sum(-2)), atol=2e-2, rtol=0)


def test_opt_in_folds_match_eager_oracle(caplog):
    """The opt-in pass beside the default ones. fold_post_res_proj=True: the forward graph computes the second
    site's projection in the first site's post_res (post_res_proj), while the backward graph still rebuilds that
    stream with post_res. With inplace_stream_grads=False, fold_pre_recompute's op keeps returning its dx.
    Gradients still match the eager oracle."""
    torch.manual_seed(1)
    model, idx = _prepared(layers=1)
    step = torch.compile(model, backend="mhc",
                         options={"n": 4, "fold_post_res_proj": True, "inplace_stream_grads": False})
    code = []
    log = _step_matches_eager_oracle(model, step, idx, caplog, code)
    assert "made the recomputed sublayer input of 2 of 2 site(s) in their post_res backward" in log
    assert "projected 1 of 2 site(s) in the post_res pass that writes their stream" in log
    forward, backward = code
    assert "mhc_compile_direct.post_res_proj.default(" in forward
    assert "post_res_proj" not in backward and "mhc_compile_direct.post_res.default(" in backward
    assert backward.count("mhc_compile_direct.post_res_backward_pre.default(") == 2 and "_into" not in backward


def test_unfolded_stream_grads_still_write_in_place(caplog):
    """fold_stream_grads=False: a site's stream gradient is a sum of partials (aten.add), which the next site's
    post_res backward may write over (a sum's value is a buffer of its own); gradients still match the oracle."""
    torch.manual_seed(2)
    model, idx = _prepared(layers=1)
    step = torch.compile(model, backend="mhc", options={"n": 4, "fold_stream_grads": False})
    code = []
    log = _step_matches_eager_oracle(model, step, idx, caplog, code)
    # the last site's post_res backward reads the head's broadcast gradient (passes/broadcast_collapse_grad.py): the
    # first site's writes over the sum
    assert "wrote the stream gradient of 1 of 2 backward op(s)" in log
    assert code[1].count("mhc_compile_direct.post_res_backward_pre_into.default(") == 1


def test_fused_step_backward_writes_in_place(caplog):
    """fuse=True: the boundary's step_backward reads the stream gradient that the last site's post_res backward
    wrote, a buffer of its own, and writes G and dX_prev over it (step_backward_into); gradients still match. With
    one layer that step's dX_prev is the chain head's acc, which collapse_head_grad has it write as one row instead
    (tests/test_collapse_head_grad.py): off here, so that the step writes its n rows."""
    torch.manual_seed(3)
    model, idx = _prepared(layers=1)
    step = torch.compile(model, backend="mhc", options={"n": 4, "fuse": True, "collapse_head_grad": False})
    code = []
    log = _step_matches_eager_oracle(model, step, idx, caplog, code)
    backward = code[1]
    assert backward.count("mhc_compile_direct.step_backward_into.default(") == 1, backward
    assert "step_backward.default(" not in backward
    # the other: the tail site's post_res backward, which reads the head's broadcast gradient (a view)
    assert "wrote the stream gradient of 1 of 2 backward op(s)" in log


def test_inductor_new_batch_size_does_not_lose_parameters(compiled):
    model, step, _ = compiled
    idx = torch.randint(0, 64, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(step(idx), eager_mhc_nanogpt(model, idx, n=4), rtol=1e-5, atol=1e-5)


def test_max_autotune_mode_compiles_and_matches_eager_oracle():
    model, idx = _prepared(layers=1)
    out = torch.compile(model, backend="mhc", mode="max-autotune")(idx)
    torch.testing.assert_close(out, eager_mhc_nanogpt(model, idx, n=4), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in mhc_compile.mhc_parameters(model))
