"""proj's one-pass backward as a warp-specialized Gluon kernel (kernels/gluon_proj_bwd.py, FusedBwdCfg.ws).

Gluon kernels do not run under TRITON_INTERPRET=1, so here: the host-side packing the kernel reads, its slot
budget, its sm_90a builds (a subprocess without the interpreter), the argument and config checks, and the fallback
to the Triton kernel off sm_90. Its slot-ring protocol is checked on a model of the barriers in
tests/test_ring_protocol.py. On an sm_90 GPU the last test runs benchmarks/gluon_proj_bwd_check.py, which compares
the kernel's dx and dphi with the float64 reference at eight shapes (n = 1 to 4, ragged T, C up to 7168, with and
without dout and acc, x broadcast over its streams, dx written over acc).
"""

import pytest
import torch

from mhc_compile.kernels import gluon_proj_bwd as gp
from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_ops as tk
from mhc_compile.kernels import triton_config as tcfg
from mhc_compile.kernels import triton_proj as tproj
from gluon_scripts import GPU_ONLY, failing_build, on_sm90_gpu, run_check, serialized


def test_pack_coefs_puts_h_pre_and_dsq_in_their_columns():
    t, n = 7, 3
    g = torch.Generator().manual_seed(0)
    h_pre, dsq = torch.randn(t, n, generator=g), torch.randn(t, generator=g)
    packed = gp.pack_coefs(dsq, h_pre)
    assert packed.shape == (t, gp.CW) == (t, 8) and packed.dtype == torch.float32  # 32-byte rows for TMA
    assert torch.equal(packed[:, :n], h_pre) and torch.equal(packed[:, gp.DSQ], dsq)
    assert not packed[:, n:gp.DSQ].any() and not packed[:, gp.DSQ + 1:].any()
    alone = gp.pack_coefs(dsq, None)  # proj_backward: no pre term
    assert torch.equal(alone[:, gp.DSQ], dsq) and not alone[:, :gp.DSQ].any()
    assert gp.DSQ >= 4  # room for h_pre of n <= 4 streams before it


@pytest.mark.parametrize("t, n, pre", [(1, 1, True), (37, 3, True), (130, 4, True), (129, 4, False), (45, 2, False)])
def test_pack_tokens_matches_split_dp_t_and_pack_coefs(t, n, pre):
    """The one-launch Triton packing (under the interpreter here) against the reference packing it replaced:
    dp^T's hi / lo rows as triton_proj_bwd.split_dp_t writes them, in hl_order, and pack_coefs' columns, bit for
    bit."""
    from mhc_compile.kernels.triton_proj_bwd import split_dp_t

    g = torch.Generator().manual_seed(t + n)
    dp = torch.randn(t, ref.num_coeffs(n), generator=g) * 10.0 ** torch.randint(-3, 3, (t, 1), generator=g)
    dsq, h_pre = torch.randn(t, generator=g), torch.sigmoid(torch.randn(t, n, generator=g)) if pre else None
    hl, coefs = gp.pack_tokens(dp, dsq, h_pre)
    want = split_dp_t(dp, gp.MP)
    assert hl.shape == want.shape and torch.equal(hl[:, :t], want[gp.hl_order(gp.MP), :t])  # columns past T: unread
    m = ref.num_coeffs(n)
    assert not want[m:gp.MP, :t].any() and not want[gp.MP + m:, :t].any()  # the coefficients past M: zero rows
    assert torch.equal(coefs, gp.pack_coefs(dsq, h_pre))


def test_hl_order_pairs_a_coefficients_hi_and_lo_rows_eight_apart_within_sixteen():
    order = gp.hl_order(gp.MP).tolist()
    assert sorted(order) == list(range(2 * gp.MP))  # a permutation of split_dp_t's rows
    for r in range(2 * gp.MP):
        if (r // 8) % 2 == 0:  # a hi row: coefficient c's; its lo row is r + 8, in the same 16-row warp block
            c = order[r]
            assert c < gp.MP and order[r + 8] == gp.MP + c and c == (r // 16) * 8 + r % 8


def test_pad_cols_keeps_tma_ready_rows_and_pads_the_others():
    g = torch.Generator().manual_seed(1)
    dp4 = torch.randn(5, ref.num_coeffs(4), generator=g)  # 24 floats: 96-byte rows, a multiple of 16
    assert gp.pad_cols(dp4, gp.MP).data_ptr() == dp4.data_ptr()  # read in place: its boxes read columns past M as 0
    dp3 = torch.randn(5, ref.num_coeffs(3), generator=g)  # 15 floats: 60-byte rows, TMA cannot stride them
    out = gp.pad_cols(dp3, gp.MP)
    assert out.shape == (5, gp.MP) and torch.equal(out[:, :15], dp3) and not out[:, 15:].any()


def test_slots_fit_shared_memory():
    # with dout and acc a slot is three [64, 128] bf16 tiles (48 KB) + dp, its hi / lo rows, the coefficients
    slot = 3 * 64 * 128 * 2 + 64 * 32 * 4 + 64 * 64 * 2 + 64 * 8 * 4
    assert gp.smem_bytes(3, True, True) == 3 * slot + 128 * 32 * 4 <= gp._SMEM
    assert gp.stages_for(True, True) == 3 and gp.stages_for(True, False) == 4 and gp.stages_for(False, False) == 4
    assert gp.stages_for(True, True, stages=4) is None  # four slots with acc do not fit


def test_dx_hl_slots_drop_dp_and_fit_three():
    """dx_hl: a slot without dp's fp32 [64, 32] tile (8 KB), phi as two bf16 planes [128, 64] (32 KB, not 16)."""
    slot = 3 * 64 * 128 * 2 + 64 * 64 * 2 + 64 * 8 * 4
    assert gp.smem_bytes(3, True, True, dx_hl=True) == 3 * slot + 2 * 128 * 64 * 2 <= gp._SMEM
    assert gp.smem_bytes(3, True, True, dx_hl=True) < gp.smem_bytes(3, True, True)
    assert gp.stages_for(True, True, dx_hl=True) == 3 and gp.stages_for(False, False, dx_hl=True) == 4


@pytest.mark.parametrize("k, n", [(1, 1), (77, 2), (130, 3), (256, 4)])
def test_phi_rows_kernel_matches_its_reference(k, n):
    """The one-launch packing of phi's planes (interpreter) against the plain-PyTorch reference, bit for bit."""
    g = torch.Generator().manual_seed(k + n)
    phi = torch.randn(k, ref.num_coeffs(n), generator=g) * 10.0 ** torch.randint(-4, 2, (k, 1), generator=g)
    got = gp.phi_rows(phi)
    want = gp.phi_rows_reference(phi)
    assert got.shape == (k, 4 * gp.MP) and got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("t, n", [(50, 4), (33, 2), (17, 1)])
def test_dx_hl_planes_against_dp_hi_lo_give_dp_phi(t, n):
    """What the DX_HL build's two wgmmas compute, in float64 here: hl^T plane0 + hl^T plane1, hl being dp^T's
    hi / lo rows in the kernel's order (pack_tokens), is dp phi^T to ~2^-16 of its scale: 30x closer than tf32's
    2^-11 (the default build's dot), and no coefficient in the wrong place."""
    g = torch.Generator().manual_seed(t)
    m = ref.num_coeffs(n)
    dp, phi = torch.randn(t, m, generator=g), torch.randn(64, m, generator=g)
    hl, _ = gp.pack_tokens(dp, torch.zeros(t), None)
    planes = gp.phi_rows_reference(phi).double()
    a = hl[:, :t].double().T  # [T, 2 MP]
    got = a @ planes[:, :2 * gp.MP].T + a @ planes[:, 2 * gp.MP:].T
    want = dp.double() @ phi.double().T
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2.0 ** -14, err
    drop_lo = a @ planes[:, :2 * gp.MP].T  # without phi's lo plane: only bf16's 2^-8 or so
    assert ((drop_lo - want).abs().max() / want.abs().max()).item() > 2.0 ** -12


def test_argument_checks_name_the_problem():
    x = torch.zeros(64, 4, 100, dtype=torch.bfloat16)  # C = 100: no multiple of the 128-column block
    phi, dp, dsq = torch.zeros(400, 24), torch.zeros(64, 24), torch.zeros(64)
    with pytest.raises(ValueError, match="multiple of 128"):
        gp.proj_grads(x, phi, dp, dsq, None, None, None)
    with pytest.raises(ValueError, match="at most 32 columns"):  # a chain head's row call at n = 8: 80 coefficients
        gp.proj_grads(torch.zeros(64, 1, 128, dtype=torch.bfloat16), torch.zeros(128, 80), torch.zeros(64, 80), dsq,
                      None, None, None)
    with pytest.raises(ValueError, match="mixers = 3"):
        gp.proj_grads(torch.zeros(64, 4, 128, dtype=torch.bfloat16), torch.zeros(512, 24), dp, dsq, None, None,
                      None, mixers=3)
    with pytest.raises(ValueError, match="ws_mixers=3"):
        tk.configure("proj_dx_dphi", ws_mixers=3)


def test_the_config_picks_the_kernel_and_its_warpgroups_by_acc():
    """Default (session 27): the Gluon kernel for every call, one dx warpgroup without acc and two with; ws off
    keeps it for the calls without acc only; ws and ws_no_acc off keep the Triton kernel everywhere."""
    cfg = tk.FusedBwdCfg()
    assert (cfg.gluon_for(has_acc=False), cfg.gluon_for(has_acc=True)) == (1, 2)
    assert tk.FusedBwdCfg(ws_mixers=2).gluon_for(has_acc=False) == 2
    assert tk.FusedBwdCfg(ws_mixers=1).gluon_for(has_acc=True) == 1
    no_acc_only = tk.FusedBwdCfg(ws=False)
    assert (no_acc_only.gluon_for(has_acc=False), no_acc_only.gluon_for(has_acc=True)) == (1, 0)
    off = tk.FusedBwdCfg(ws=False, ws_no_acc=False)
    assert (off.gluon_for(has_acc=False), off.gluon_for(has_acc=True)) == (0, 0)
    assert tcfg.DEFAULTS["proj_dx_dphi"] == cfg


def test_ring_slots_by_device():
    """On an H100 two slots for the calls with dout and three without (sessions 36-38), as many as fit elsewhere, a
    given count wherever it is set."""
    cfg, h100 = tk.FusedBwdCfg(), "NVIDIA H100 80GB HBM3"
    assert (cfg.stages_on(h100, has_dout=True), cfg.stages_on(h100, has_dout=False)) == (2, 3)
    assert (cfg.stages_on("NVIDIA H200", True), cfg.stages_on("NVIDIA H200", False)) == (0, 0)
    assert tk.FusedBwdCfg(ws_stages=0).stages_on(h100, True) == 0
    assert tk.FusedBwdCfg(ws_stages=3).stages_on("NVIDIA H200", False) == 3
    with pytest.raises(ValueError, match="ws_stages=5"):
        tk.FusedBwdCfg(ws_stages=5)


def test_enter_calls_keep_the_triton_kernel_on_an_h100():
    """enter's call (dout, no acc) takes the Triton kernel on an H100 (sessions 36-38), the Gluon one elsewhere;
    ws_enter forces either; the calls with acc or without dout are untouched."""
    cfg, h100, h200 = tk.FusedBwdCfg(), "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    assert cfg.gluon_for(has_acc=False, has_dout=True, device_name=h100) == 0
    assert cfg.gluon_for(has_acc=False, has_dout=True, device_name=h200) == 1
    assert cfg.gluon_for(has_acc=False, has_dout=False, device_name=h100) == 1
    assert cfg.gluon_for(has_acc=True, has_dout=True, device_name=h100) == 2
    assert tk.FusedBwdCfg(ws_enter=True).gluon_for(False, True, h100) == 1
    assert tk.FusedBwdCfg(ws_enter=False).gluon_for(False, True, h200) == 0


def test_the_op_passes_the_devices_ring_slots_and_dx_hl_to_the_gluon_kernel(monkeypatch):
    """triton_proj_bwd's entry hands the Gluon kernel the slot count of the device it runs on for the call at hand
    and the dx_hl flag, and on an "H100" keeps enter's call (dout, no acc; x dense or broadcast over its streams) on
    the Triton kernel (the Gluon kernel itself runs only on an sm_90 GPU: here it is stood in for, its arguments
    recorded)."""
    from mhc_compile.kernels import triton_common as tcom
    from mhc_compile.kernels import triton_proj_bwd as tpb

    seen = []
    x, phi, dp, dsq, h_pre, dout, acc = _cpu_inputs(16, 4, 128, seed=3)
    wide = x[:, 0].contiguous().unsqueeze(1).expand(x.shape)  # a chain head's stream: one row a token for all n
    assert tcom.is_broadcast(wide) and not tcom.is_broadcast(x)
    coeffs = []  # what the op tells supported: phi's columns, which bound the Gluon kernel (a chain head's row call)
    monkeypatch.setattr(gp, "supported", lambda *a, **kw: coeffs.append(kw["coeffs"]) or True)
    monkeypatch.setattr(gp, "proj_grads", lambda *a, **kw: seen.append((tcom.is_broadcast(a[0]), kw)) or (a[0], a[1]))
    monkeypatch.setattr(tpb, "_NO_GLUON", set())
    for name, dout_slots, alone_slots in (("NVIDIA H100 80GB HBM3", 2, 3), ("NVIDIA H200", 0, 0)):
        monkeypatch.setattr(tcom, "device_name", lambda device, name=name: name)
        tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc)
        assert seen[-1][1]["stages"] == dout_slots and seen[-1][1]["dx_hl"] is False and seen[-1][1]["mixers"] == 2
        tk.proj_backward(wide, phi, dp, dsq)  # without dout: the Gluon kernel on both, with that call's slots
        assert seen[-1][0] and seen[-1][1]["stages"] == alone_slots and seen[-1][1]["mixers"] == 1
        seen.clear()
        for v in (wide, x):  # enter's call, broadcast and dense
            tk.proj_pre_backward(v, phi, dp, dsq, h_pre, dout)
        assert [(bc, kw["stages"]) for bc, kw in seen] == ([] if "H100" in name else [(True, 0), (False, 0)])
    with tk.tuning("proj_dx_dphi", ws_stages=3, ws_dx_hl=True, ws_enter=True):
        tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout)
    assert seen[-1][1]["stages"] == 3 and seen[-1][1]["dx_hl"] is True and seen[-1][1]["mixers"] == 1
    assert coeffs and set(coeffs) == {phi.shape[1]}


@pytest.mark.parametrize("options, head_call", [
    ({}, (False, 1, True, True)),                               # the embedding's row (passes/collapse_head_grad.py)
    ({"collapse_head_grad": False}, (True, 4, True, True)),     # the broadcast stream, acc from the folded gradients
    ({"fuse": True}, (False, 1, True, True)),                   # enter's, on the row, the next step's dx_prev as acc
    ({"fuse": True, "collapse_head_grad": False}, (True, 4, True, False)),  # enter's backward
])
def test_which_proj_backward_calls_a_compiled_model_makes(monkeypatch, options, head_call):
    """The call shapes the per-device plan keys on, as a compiled model makes them: every site's call has dout, and
    all but the chain head's are dense n-stream calls with acc. The head's is a one-row call with acc
    (passes/collapse_head_grad.py: in the default path the folded stream gradient, under fuse=True the next step's
    dx_prev). With that pass off it runs on the broadcast stream, with acc in the default path and without under
    fuse=True (enter's backward): the one call ``triton_for_enter`` moves, with enter's on a carried (dense) stream."""
    from mhc_compile.kernels import triton_common as tcom
    from models import NanoGPT

    seen = []
    real = tproj._proj_grads

    def spy(x, phi, dp, dsq, h_pre, dout, acc, out=None):
        seen.append((tcom.is_broadcast(x), x.shape[-2], dout is not None, acc is not None))
        return real(x, phi, dp, dsq, h_pre, dout, acc, out)

    monkeypatch.setattr(tproj, "_proj_grads", spy)
    torch.manual_seed(0)
    model = NanoGPT(d=32, layers=2).to(torch.bfloat16)
    compiled = torch.compile(model, backend="mhc", options={"n": 4, "kernels": "triton", **options})
    compiled(torch.randint(0, 64, (2, 16))).float().sum().backward()
    assert sorted(seen) == sorted([(False, 4, True, True)] * 3 + [head_call])


def _cpu_inputs(t, n, c, seed):
    """A proj backward call's operands on the CPU: bf16 x, dout, acc; fp32 phi, dp, dsq, h_pre."""
    g = torch.Generator().manual_seed(seed)
    m = ref.num_coeffs(n)
    x = torch.randn(t, n, c, generator=g).to(torch.bfloat16)
    phi, dp, dsq = 0.1 * torch.randn(n * c, m, generator=g), torch.randn(t, m, generator=g), torch.randn(t, generator=g)
    h_pre, dout = torch.rand(t, n, generator=g), torch.randn(t, c, generator=g).to(torch.bfloat16)
    return x, phi, dp, dsq, h_pre, dout, torch.randn(t, n, c, generator=g).to(torch.bfloat16)


def test_off_sm90_ws_runs_the_triton_kernel():
    """The default (FusedBwdCfg.ws) on CPU tensors (the interpreter): the Triton kernel runs, with the values it
    gives with the Gluon kernel configured off, with and without acc."""
    t, n, c = 37, 4, 128
    x, phi, dp, dsq, h_pre, dout, acc = _cpu_inputs(t, n, c, seed=2)
    assert not gp.supported(x, n, c)
    before = gp.LAUNCHES
    got = tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc)
    no_acc = tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout)
    with tk.tuning("proj_dx_dphi", ws=False, ws_no_acc=False):
        want = tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc)
        want_no_acc = tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout)
    assert gp.LAUNCHES == before
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(no_acc, want_no_acc))


def test_a_gluon_build_error_falls_back_to_the_triton_kernel_with_a_warning(monkeypatch):
    """The Gluon kernel is the default: if it does not build (another Triton's Gluon, shared
    memory, ptxas), the call runs the Triton kernel with a warning, later calls go straight there, and the Triton
    kernel's own fallbacks (triton_proj._NO_ONE_PASS, for its OutOfResources) stay untouched."""
    from mhc_compile.kernels import triton_proj_bwd as tpb

    x, phi, dp, dsq, h_pre, dout, _ = _cpu_inputs(21, 2, 128, seed=3)
    with tk.tuning("proj_dx_dphi", ws=False, ws_no_acc=False):
        want = tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout)
    tries = []

    monkeypatch.setattr(gp, "supported", lambda *args, **kwargs: True)  # as on an sm_90 GPU
    monkeypatch.setattr(gp, "proj_grads", failing_build(tries))
    monkeypatch.setattr(tpb, "_NO_GLUON", set())
    monkeypatch.setattr(tproj, "_NO_ONE_PASS", set())
    monkeypatch.setattr(tproj, "_NO_PIPELINE_ALL", set())
    with pytest.warns(UserWarning, match="Gluon kernel does not build here.*OutOfResources"):
        got = tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout)
    again = tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout)
    assert [kw["mixers"] for _, kw in tries] == [1] and tpb._NO_GLUON == {x.device}
    assert not tproj._NO_ONE_PASS and not tproj._NO_PIPELINE_ALL
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(again, want))


def _run(*args, **kw):
    return run_check("gluon_proj_bwd_check.py", *args, **kw)


def _check_module():
    """benchmarks/gluon_proj_bwd_check.py as a module (it imports its siblings by bare name)."""
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        return importlib.import_module("gluon_proj_bwd_check")
    finally:
        sys.path.pop(0)


def test_the_check_script_loads_another_build_beside_this_one(tmp_path):
    """--against FILE: another build of the module (say main's, beside a branch's) loads as a module of its own, so
    both run in one process; here the file is this build's own source, copied."""
    check = _check_module()
    copy = tmp_path / "against.py"
    copy.write_text(open(gp.__file__).read())
    other = check.load_module(str(copy))
    assert other is not gp and other.proj_grads is not gp.proj_grads
    assert other._proj_bwd_ws_kernel is not gp._proj_bwd_ws_kernel and other.BK == gp.BK


@pytest.mark.skipif(not gp.AVAILABLE, reason="the installed Triton has no Gluon")
def test_builds_for_sm90_within_shared_memory_without_spills():
    proc = _run("--build", ptxas_log=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not serialized(proc), serialized(proc)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("pre=")]
    assert len(rows) == 11 and all(row.endswith(" ok") and "'HGMMA': 0," not in row for row in rows), proc.stdout
    # paced (FusedBwdCfg.ws_pace): the loader waits on a counter, the dx warpgroup's loop is the unpaced build's
    unpaced, paced = (row for row in rows if row.startswith("pre=True acc=True mixers=2 dx_hl=False") and "stages=2"
                      in row)
    assert "pace=3" in paced and paced.split("loop=")[1] == unpaced.split("loop=")[1]


def test_pace_applies_where_the_programs_are_one_wave_of_long_walks():
    """plan_pace: the programs of a paced launch wait on the others of their token split, so only a plan whose
    programs are all resident at once (one an SM) is paced, and only where they walk at least min_walk tiles; with
    more programs, shorter walks, or pace 0, it runs unpaced."""
    from mhc_compile.kernels import triton_common as tcom

    cpu = torch.device("cpu")
    sms, walk = tcom.num_sms(cpu), 512 * gp.BT
    assert gp.plan_pace(sms, 1, walk, cpu, 3, 512) == 3 and gp.plan_pace(sms // 2, 2, walk, cpu, 3, 512) == 3
    assert gp.plan_pace(sms + 1, 1, walk, cpu, 3, 512) == 0 and gp.plan_pace(sms, 2, walk, cpu, 3, 512) == 0
    assert gp.plan_pace(sms, 1, walk - gp.BT, cpu, 3, 512) == 0 and gp.plan_pace(sms, 1, gp.BT, cpu, 3) == 3
    assert gp.plan_pace(sms, 1, walk, cpu, 0, 512) == 0


def test_pace_is_a_config_field_passed_to_the_gluon_kernel_for_calls_with_dout_and_acc(monkeypatch):
    """FusedBwdCfg.ws_pace (2 by default since session 50) reaches gluon_proj_bwd.proj_grads for the calls with dout
    and acc on several streams (proj_pre_backward, the one measured faster paced), 0 for the others; a negative one
    is named."""
    assert tcfg.DEFAULTS["proj_dx_dphi"].ws_pace == 2
    with pytest.raises(ValueError, match="ws_pace=-1"):
        tk.configure("proj_dx_dphi", ws_pace=-1)
    with pytest.raises(ValueError, match="ws_pace_walk=-1"):
        tk.configure("proj_dx_dphi", ws_pace_walk=-1)
    seen = []
    monkeypatch.setattr(gp, "supported", lambda *a, **kw: True)
    monkeypatch.setattr(gp, "proj_grads", lambda *a, **kw: seen.append(kw["pace"]) or (a[0], a[1]))
    assert tcfg.DEFAULTS["proj_dx_dphi"].ws_pace_walk == 512  # walks measured paced (32768 tokens)
    x, phi = torch.zeros(8, 4, 128, dtype=torch.bfloat16), torch.zeros(512, 24)
    dp, dsq, h_pre, dout = torch.zeros(8, 24), torch.zeros(8), torch.zeros(8, 4), torch.zeros(8, 128)
    with tk.tuning("proj_dx_dphi", ws_pace=3):
        tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, torch.zeros_like(x))
    tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout, torch.zeros_like(x))
    tk.proj_pre_backward(x, phi, dp, dsq, h_pre, dout)  # no acc (enter's backward)
    tk.proj_backward(x, phi, dp, dsq)  # no dout
    one = x[:, :1]  # one stream (a chain head's row, triton_proj.proj_pre_backward_collapsed)
    tk.proj_pre_backward(one, phi[:128], dp[:, :3], dsq, h_pre[:, :1], dout, torch.zeros_like(one))
    assert seen == [3, 2, 0, 0, 0]


@pytest.mark.skipif(not (on_sm90_gpu() and gp.AVAILABLE), reason=GPU_ONLY)
def test_matches_the_reference_on_an_sm90_gpu():
    proc = _run("--no-times")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]


def test_the_pace_table_times_each_op_beside_the_triton_kernel(monkeypatch):
    """gluon_proj_bwd_check --pace (GPU only) on stubs: a row a round for each of proj_pre_backward, proj_backward and
    enter's backward (dout without acc), each with the Triton kernel's time and one a pace, as the header says."""
    import triton.testing

    check = _check_module()
    from benchmarks import bench_kernels
    from mhc_compile.kernels import triton_common as tcom

    seen = []
    monkeypatch.setattr(check, "_inputs", lambda t, n, c, has_pre, has_acc, bcast, seed: (
        seen.append((has_pre, has_acc)) or {"x": torch.zeros(t, n, c)}))
    monkeypatch.setattr(check, "_triton", lambda v: None)
    monkeypatch.setattr(check, "_gluon", lambda v, **kw: None)
    monkeypatch.setattr(bench_kernels, "copy_bandwidth", lambda device: 1e12)
    monkeypatch.setattr(tcom, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, rep: (fn(), 1.0)[1])
    lines = []
    check.pace_times([(128, 4, 256)], lines, paces=(0, 2), rounds=2)
    assert seen == [(True, True), (False, False), (True, False)]
    header, rows = lines[1], lines[3:]
    assert "Triton us (eff)" in header and "pace 2 us (eff)" in header
    assert [row.split(" | ")[1] for row in rows] == ["proj_pre_backward"] * 2 + ["proj_backward"] * 2 + \
        ["enter backward"] * 2
    assert all(row.count("|") == header.count("|") for row in rows), lines
