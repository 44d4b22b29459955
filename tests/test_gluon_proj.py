"""proj's forward as a warp-specialized Gluon kernel (kernels/gluon_proj.py, DotCfg.ws for "proj", the default).

Gluon kernels do not run under TRITON_INTERPRET=1, so here: its slot plan, its sm_90a builds (a subprocess without
the interpreter), the wrapper's fallback to the Triton kernel where it cannot run, and the argument checks. Its
ring's protocol (the previous slot released after the next one is waited on) is checked on the mbarrier model of
tests/test_ring_protocol.py. On an sm_90 GPU one test runs benchmarks/proj_fwd_check.py with the kernel beside the
Triton one, against the reference at n = 1 to 16 and ragged token counts, and asserts that it ran.
"""

import pytest
import torch

from gluon_scripts import GPU_ONLY, failing_build, on_sm90_gpu, run_check, serialized
from mhc_compile.kernels import gluon_proj as gp
from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_config as tcfg
from mhc_compile.kernels import triton_proj as tproj
from mhc_compile.kernels.gluon_common import SMEM


def test_plan_fills_shared_memory_with_whole_slots():
    # n = 4, C = 4096, 8 warps (BT = 128), MP = 32: four slots of two boxes, 192 KB, and p's 16 KB epilogue tile
    # (the sm_90a build of proj_fwd_check.py --build takes 213060 bytes: these and the barriers)
    assert gp.plan(4 * 4096, 128, 32, 2, 0) == (2, 4) and gp.smem_bytes(128, 32, 2, 4) == 212992 <= SMEM
    assert gp.plan(7 * 512, 128, 64, 2, 0) == (2, 3)  # MP = 64: the fourth slot does not fit
    assert gp.plan(3 * 64, 128, 32, 2, 0) == (1, 4)  # three boxes do not split into slots of two
    assert gp.plan(4 * 4096, 128, 32, 2, 2) == (2, 2)  # stages as asked
    assert gp.plan(4 * 4096, 128, 32, 2, 1) is None  # one slot: the deferred release would deadlock (test below)
    assert gp.plan(4 * 4096, 128, 32, 4, 4) is None  # 384 KB


def test_warps_for_keeps_four_slots_at_mp_64():
    assert gp.warps_for(16, 8) == gp.warps_for(32, 8) == 8  # n <= 4
    assert gp.warps_for(64, 8) == 4 and gp.warps_for(64, 2) == 2  # n = 5 to 7


def test_supported_only_on_sm90_bf16_whole_boxes():
    x = torch.zeros(8, 4, 64, dtype=torch.bfloat16)
    assert not gp.supported(x, 256, 32)  # a CPU tensor
    if on_sm90_gpu():
        xg = x.cuda()
        assert gp.supported(xg, 256, 32) and not gp.supported(xg.float(), 256, 32)
        assert not gp.supported(xg, 4 * 60, 32) and not gp.supported(xg, 256, 128)


def test_launch_refuses_shapes_it_cannot_split():
    x, w = torch.zeros(4, 96, dtype=torch.bfloat16), torch.zeros(2, 96, 32, dtype=torch.bfloat16)
    p, sq = torch.zeros(1, 4, 24), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="K = 96 and its split 96 must be whole slots of 64-column boxes"):
        gp.launch(x, w, p, sq, 96)
    with pytest.raises(ValueError, match=r"phi's halves have shape \(2, 96, 32\), expected \[K, 2, MP\]"):
        gp.launch(x, w, p, sq, 96, join=True)  # join takes split_hi_lo's interleaved [K, 2, MP]
    x, w = torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(256, 2, 32, dtype=torch.bfloat16)
    p, sq = torch.zeros(3, 4, 24), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="3 K splits of 128 columns for K = 256; expected 2"):
        gp.launch(x, w, p, sq, 128, join=True)  # a third program would have no slot to take


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ws_off_sm90_runs_the_triton_kernel(dtype):
    """DotCfg.ws on a machine where the Gluon kernel cannot run: the Triton kernel's result, bit for bit, and no
    Gluon launch."""
    g = torch.Generator().manual_seed(5)
    t, n, c = 37, 4, 64
    x = torch.randn(t, n, c, generator=g).to(dtype)
    phi = torch.randn(n * c, ref.num_coeffs(n), generator=g) * 0.05
    before = gp.LAUNCHES
    want = tproj.proj(x, phi)
    with tcfg.tuning("proj", ws=True):
        got = tproj.proj(x, phi)
    assert gp.LAUNCHES == before
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert tcfg.DEFAULTS["proj"].ws  # the default since session 32 (95 % of copy bandwidth on an H200)


def test_builds_for_sm90a_without_spills():
    proc = run_check("proj_fwd_check.py", "--build", ptxas_log=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not serialized(proc), serialized(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("n=")]
    assert len(lines) == 8 and all(line.endswith(" ok") and "spill=0" in line for line in lines), proc.stdout
    assert {"join=True" in line for line in lines} == {True, False}  # both wgmma shapes built
    # each slot waits for the previous slot's wgmmas only (join: SUBS of them in flight, else 2 SUBS; the first
    # slot's wait, the loop's), then all; and ptxas keeps them in flight (DEPBAR.LE of that count)
    assert all("waits=['2', '2', '0'] depbar=[0, 2]" in line for line in lines if "join=True subs=2" in line)
    assert all("waits=['4', '4', '0'] depbar=[0, 4]" in line for line in lines if "join=False subs=2" in line)
    assert any("subs=1" in line and "MP=16" in line for line in lines)  # K an odd number of boxes: one a slot
    assert "token counts 256, 257, 333, 40013: one build ok" in proc.stdout  # no recompile per token count
    assert all("waits=['1', '1', '0'] depbar=[0, 1]" in line for line in lines if "join=True subs=1" in line)


@pytest.mark.skipif(not on_sm90_gpu(), reason=GPU_ONLY)
def test_gluon_proj_matches_the_reference_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    proc = run_check("proj_fwd_check.py", "--tune", "ws=false", "--no-times")  # the default (Gluon) and Triton
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    text = (tmp_path / "proj_fwd_check.md").read_text()
    assert "| this build (ws=false) |" in text and "Gluon proj kernel launches in the checks: 0" not in text


def test_a_gluon_build_error_falls_back_to_the_triton_kernel_with_a_warning(monkeypatch):
    """With DotCfg.ws, a Gluon kernel that does not build (another Triton's Gluon, shared memory, ptxas) leaves the
    call to the Triton kernel with a warning, and the device's later calls go straight there."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(37, 4, 64, generator=g).bfloat16()
    phi = torch.randn(4 * 64, ref.num_coeffs(4), generator=g) * 0.05
    want = tproj.proj(x, phi)
    tries = []

    monkeypatch.setattr(gp, "supported", lambda *args: True)  # as on an sm_90 GPU
    monkeypatch.setattr(tproj, "tma_ok", lambda *args: True)
    monkeypatch.setattr(gp, "launch", failing_build(tries))
    monkeypatch.setattr(tproj, "_NO_GLUON_PROJ", set())
    with tcfg.tuning("proj", ws=True):
        with pytest.warns(UserWarning, match="mhc proj: the Gluon kernel does not build here.*OutOfResources"):
            got = tproj.proj(x, phi)
        again = tproj.proj(x, phi)
    assert len(tries) == 1 and tproj._NO_GLUON_PROJ == {x.device}
    assert all(torch.equal(a, b) for a, b in zip(got + again, want + want))


@pytest.mark.skipif(not gp.AVAILABLE, reason="the installed Triton has no Gluon")
def test_descriptors_share_one_layout_a_tile_shape():
    """gluon_common.shared_layout: the layout get_default_for gives, built once a (tile, dtype): descriptors of a
    launch reuse it (it cost ~7 us of host time a descriptor, up to eight a launch)."""
    from mhc_compile.kernels import gluon_common as gc

    fresh = gc.gl.NVMMASharedLayout.get_default_for([64, 128], gc.gl.bfloat16)
    assert gc.shared_layout((64, 128), gc.gl.bfloat16) == fresh
    assert gc.shared_layout((64, 128), gc.gl.bfloat16) is gc.shared_layout((64, 128), gc.gl.bfloat16)
    assert gc.shared_layout((64, 32), gc.gl.float32) != fresh
    x = torch.zeros(100, 256, dtype=torch.bfloat16)
    a, b = gc.desc(x, (100, 256), (256, 1), (64, 64), gc.gl.bfloat16), gc.desc(x, (100, 256), (256, 1), [64, 64],
                                                                              gc.gl.bfloat16)
    assert a.layout is b.layout and a.layout == gc.gl.NVMMASharedLayout.get_default_for([64, 64], gc.gl.bfloat16)
