"""The warp-specialized Gluon post_res_proj (kernels/gluon_post_res_proj.py, DotCfg.ws).

Gluon kernels do not run under TRITON_INTERPRET=1, so on this machine the kernel is built for sm_90a (a
subprocess without the interpreter, like the other build tests) and its host-side choices are checked; its
values are compared with the reference on an sm_90 GPU by benchmarks/gluon_check.py, which the last test runs
where such a GPU is present.
"""

import pytest
import torch

from mhc_compile.kernels import gluon_post_res_proj as gp
from gluon_scripts import GPU_ONLY, failing_build, on_sm90_gpu, run_check, serialized


def _run(*args, **kw):
    return run_check("gluon_check.py", *args, **kw)


@pytest.mark.skipif(not gp.AVAILABLE, reason="the installed Triton has no Gluon")
def test_gluon_post_res_proj_builds_for_sm90_within_shared_memory_without_spills():
    proc = _run("--build", "--configs", "ws", "ws-sub1", "ws-join", "--bcast", ptxas_log=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not serialized(proc), serialized(proc)
    names = [f"{c}{b}" for c in ("ws", "ws-sub1", "ws-join") for b in ("", "+bcast")]
    rows = [line for line in proc.stdout.splitlines() if line.split(":")[0] in names]
    assert len(rows) == 6 and all(row.endswith(" ok") and "'HGMMA': 0," not in row for row in rows), proc.stdout
    hgmma = {row.split(":")[0]: int(row.split("'HGMMA': ")[1].split(",")[0]) for row in rows}
    assert hgmma["ws-join"] * 2 == hgmma["ws"]  # one wgmma a stream instead of a hi and a lo one
    # a broadcast X (a chain head's embedding under fuse=True) changes the loads, not the projection
    assert all(hgmma[f"{c}+bcast"] == hgmma[c] for c in ("ws", "ws-sub1", "ws-join"))


def test_plan_fills_the_shared_memory_budget_with_whole_slots():
    # n = 4, 64 tokens x 32 channels, MP = 32: a chunk is 5 stream tiles (20 KB), its phi 8 tiles (16 KB)
    assert gp.smem_bytes(4, 64, 32, 32, subs=2, stages=2, wstages=3) == 2 * 20480 * 2 + 3 * 16384 + 16384
    assert gp.plan(4, 4096, 64, 32, 32, subs=2, stages=0, wstages=0) == (2, 2, 3)
    # four chunks a slot: two stream slots (160 KB), three phi slots (48 KB) and the X' tiles (16 KB) still fit
    assert gp.plan(4, 4096, 64, 32, 32, subs=4, stages=0, wstages=0) == (4, 2, 3)
    assert gp.smem_bytes(4, 64, 32, 32, 4, 2, 3) <= gp._SMEM < gp.smem_bytes(4, 64, 32, 32, 4, 3, 2)
    assert gp.plan(4, 96, 64, 32, 32, subs=2, stages=0, wstages=0)[0] == 1  # 3 chunks: one a slot
    assert gp.plan(16, 4096, 64, 32, 256, subs=2, stages=0, wstages=0) is None  # n = 16: two slots do not fit
    # two compute warpgroups: a slot's chunks split between them, two phi slots each, two sets of X' tiles
    assert gp.plan(4, 4096, 64, 32, 32, subs=2, stages=0, wstages=0, consumers=2) == (2, 2, 4)
    assert gp.smem_bytes(4, 64, 32, 32, 2, 2, 4, consumers=2) == 2 * 20480 * 2 + 4 * 16384 + 2 * 16384
    assert gp.plan(4, 96, 64, 32, 32, subs=2, stages=0, wstages=0, consumers=2) is None  # 3 chunks: no even split
    # ws_join: phi's [hi | lo] tiles take the same bytes; each warpgroup adds p's [BT, MP] fp32 epilogue tile (the
    # sm_90a build of gluon_check.py --build --configs ws-join takes 196712 bytes against 180552 without)
    assert gp.smem_bytes(4, 64, 32, 32, 2, 2, 4, 2, join=True) == gp.smem_bytes(4, 64, 32, 32, 2, 2, 4, 2) + 16384
    assert gp.plan(4, 4096, 64, 32, 32, subs=2, stages=0, wstages=0, consumers=2, join=True) == (2, 2, 4)
    assert gp.plan(4, 4096, 64, 32, 32, subs=2, stages=0, wstages=3, consumers=2) is None  # a phi slot each


def test_choose_takes_one_warpgroup_where_the_chunks_do_not_split_evenly():
    assert gp.choose(4, 4096, 32, 32, num_warps=4, subs=2, stages=0, wstages=0, consumers=2) == (64, (2, 2, 4), 2)
    assert gp.choose(4, 96, 32, 32, num_warps=4, subs=2, stages=0, wstages=0, consumers=2) == (64, (1, 2, 3), 1)
    assert gp.choose(4, 4096, 32, 32, num_warps=4, subs=2, stages=0, wstages=0, consumers=1) == (64, (2, 2, 3), 1)
    assert gp.choose(16, 4096, 32, 256, num_warps=4, subs=2, stages=0, wstages=0, consumers=2) is None


def test_supported_needs_a_cuda_bf16_stream_whose_chunks_stay_in_one_stream():
    x = torch.zeros(4, 4, 64, dtype=torch.bfloat16)
    assert not gp.supported(x, 4, 64, 32, 32)  # a CPU tensor: the Triton kernel runs instead


def test_ws_consumers_outside_one_or_two_is_an_error_on_any_device():
    from mhc_compile.kernels import triton_ops as tk
    from mhc_compile.kernels import triton_config as tcfg

    with pytest.raises(ValueError, match="ws_consumers=3"), tk.tuning("post_res_proj", ws=True, ws_consumers=3):
        pass
    with pytest.raises(ValueError, match="ws_consumers=0"):
        tk.configure("post_res_proj", ws_consumers=0)
    assert tcfg.cfg_of("post_res_proj") == tcfg.DEFAULTS["post_res_proj"]  # the bad config was not kept


@pytest.mark.skipif(not (on_sm90_gpu() and gp.AVAILABLE), reason=GPU_ONLY)
def test_gluon_post_res_proj_matches_the_reference_on_sm90(tmp_path):
    proc = _run("--out", str(tmp_path), "--shapes")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _cpu_inputs(t, n, c, seed):
    """post_res_proj's operands on the CPU: bf16 x [T, n, C] and y [T, C], fp32 h_res, h_post and phi."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, c, generator=g).bfloat16()
    y = torch.randn(t, c, generator=g).bfloat16()
    h_res, h_post = torch.rand(t, n, n, generator=g), 2 * torch.rand(t, n, generator=g)
    phi = torch.randn(n * c, n * n + 2 * n, generator=g) * (n * c) ** -0.5
    return x, h_res, h_post, y, phi


def test_the_gluon_kernel_is_the_default_and_off_sm90_the_triton_kernel_runs():
    """DotCfg.ws is on by default (session 27); on CPU tensors the Triton kernel runs, bit-equal to ws off."""
    from mhc_compile.kernels import triton_ops as tk
    from mhc_compile.kernels import triton_config as tcfg

    assert tcfg.DEFAULTS["post_res_proj"].ws
    x, h_res, h_post, y, phi = _cpu_inputs(37, 4, 128, seed=4)
    before = gp.LAUNCHES
    got = tk.post_res_proj(x, h_res, h_post, y, phi)
    with tk.tuning("post_res_proj", ws=False):
        want = tk.post_res_proj(x, h_res, h_post, y, phi)
    assert gp.LAUNCHES == before
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_gluon_build_error_falls_back_to_the_triton_kernel_with_a_warning(monkeypatch):
    """The Gluon kernel is the default: if it does not build (another Triton's Gluon, shared memory, ptxas), the
    call runs the Triton kernel with a warning and the device's later calls go straight there."""
    from mhc_compile.kernels import triton_ops as tk
    from mhc_compile.kernels import triton_post_res_proj as tprp

    x, h_res, h_post, y, phi = _cpu_inputs(37, 4, 128, seed=5)
    with tk.tuning("post_res_proj", ws=False):
        want = tk.post_res_proj(x, h_res, h_post, y, phi)
    tries = []

    monkeypatch.setattr(gp, "supported", lambda *args: True)  # as on an sm_90 GPU
    monkeypatch.setattr(gp, "launch", failing_build(tries))
    monkeypatch.setattr(tprp, "_NO_GLUON_PRP", set())
    with pytest.warns(UserWarning, match="post_res_proj: the Gluon kernel does not build here.*OutOfResources"):
        got = tk.post_res_proj(x, h_res, h_post, y, phi)
    again = tk.post_res_proj(x, h_res, h_post, y, phi)
    assert len(tries) == 1 and tprp._NO_GLUON_PRP == {x.device}
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(again, want))


def test_a_broadcast_stream_reaches_the_gluon_kernel_as_rows_only_where_turned_on(monkeypatch):
    """A stream broadcast over n (under fuse=True the step after a chain head gets the embedding so) reaches the
    Gluon kernel as its rows, told ``x_bcast``, where its broadcast reads are on (``triton_common.GLUON_BCAST``, the
    default since session 50's GPU check), and made dense where they are off. The kernel itself is stubbed (it runs
    only on an sm_90 GPU)."""
    from mhc_compile.kernels import triton_common as tcom
    from mhc_compile.kernels import triton_ops as tk

    assert tcom.GLUON_BCAST  # the default

    x, h_res, h_post, y, phi = _cpu_inputs(37, 4, 128, seed=6)
    xb = x[:, 0].contiguous().unsqueeze(1).expand(x.shape)
    seen = []
    monkeypatch.setattr(gp, "supported", lambda *args: True)
    monkeypatch.setattr(gp, "launch", lambda x, *args, x_bcast=False, **kw: seen.append((x.stride(1), x_bcast)))
    for on, want in ((False, (128, False)), (True, (0, True))):
        monkeypatch.setattr(tcom, "GLUON_BCAST", on)
        seen.clear()
        tk.post_res_proj(xb, h_res, h_post, y, phi)
        assert seen == [want]
