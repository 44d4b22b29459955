"""The two-pass step backward (kernels/gluon_step_bwd.py, StepBwdCfg.ws).

Gluon kernels do not run under TRITON_INTERPRET=1, so here: the two-pass decomposition that the kernel implements
(``reference.step_grads`` after dH_pre and coeffs_backward) against ``reference.step_backward`` in float64; the
host-side packing the kernel reads; its sm_90a build (a subprocess without the interpreter); the config checks and
the fallback to the three passes off sm_90. On an sm_90 GPU the last test runs benchmarks/gluon_step_bwd_check.py,
which compares the kernel's outputs with the float64 reference at six shapes (n = 1, 2, 4, ragged T, C up to 7168).
"""

import pytest
import torch

from mhc_compile.kernels import gluon_step_bwd as gs
from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_fused as tf
from gluon_scripts import GPU_ONLY, failing_build, on_sm90_gpu, run_check, serialized


def _inputs(t, n, c, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = ref.num_coeffs(n)
    v = dict(x_prev=torch.randn(t, n, c, generator=g, dtype=dtype),
             h_res_prev=ref.sinkhorn(torch.randn(t, n, n, generator=g, dtype=dtype), 20),
             h_post_prev=2 * torch.sigmoid(torch.randn(t, n, generator=g, dtype=dtype)),
             y_prev=torch.randn(t, c, generator=g, dtype=dtype),
             phi=0.05 * torch.randn(n * c, m, generator=g, dtype=dtype),
             bias=0.5 * torch.randn(m, generator=g, dtype=dtype), alpha=torch.tensor([0.7, 0.9, 1.1], dtype=dtype))
    grads = dict(dx=torch.randn(t, n, c, generator=g, dtype=dtype), dx_in=torch.randn(t, c, generator=g, dtype=dtype),
                 dh_post=torch.randn(t, n, generator=g, dtype=dtype),
                 dh_res=torch.randn(t, n, n, generator=g, dtype=dtype))
    return v, grads


@pytest.mark.parametrize("t,n,c", [(7, 4, 5), (3, 1, 9), (5, 2, 6), (4, 3, 8)])
def test_two_pass_decomposition_matches_step_backward(t, n, c):
    v, gr = _inputs(t, n, c, seed=t * 100 + n * 10 + c)
    args = (n, n * c, 1e-6, 20, "mhc")
    _, _, h_pre, _, _, p, sq = ref.step(*v.values(), *args)
    want = ref.step_backward(*v.values(), h_pre, p, sq, gr["dx"], gr["dx_in"], gr["dh_post"], gr["dh_res"], *args)
    # pass 1: dH_pre from the rebuilt X; then coeffs_backward; pass 2: everything else
    x = ref.post_res(v["x_prev"], v["h_res_prev"], v["h_post_prev"], v["y_prev"])
    dh_pre = ref.pre_backward_dh(x, h_pre, gr["dx_in"])
    dp, dsq, dbias, dalpha = ref.coeffs_backward(p, sq, v["bias"], v["alpha"], dh_pre, gr["dh_post"], gr["dh_res"],
                                                 *args)
    got = ref.step_grads(v["x_prev"], v["h_res_prev"], v["h_post_prev"], v["y_prev"], v["phi"], h_pre, dp, dsq,
                         gr["dx"], gr["dx_in"]) + (dbias, dalpha)
    for a, b in zip(got, want):  # dx_prev, dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass_one_without_its_x_store_gives_the_same_dh_pre(dtype):
    """K2 with STORE_X off (the two-pass backward's first pass) only reads: the same dH_pre as with the store."""
    v, gr = _inputs(9, 4, 40, seed=5, dtype=torch.float32)
    xp, y, dx_in = v["x_prev"].to(dtype), v["y_prev"].to(dtype), gr["dx_in"].to(dtype)
    x, dh = tf._recompute_dh_pre(xp, v["h_res_prev"], v["h_post_prev"], y, dx_in, torch.float32)
    none, dh_only = tf._recompute_dh_pre(xp, v["h_res_prev"], v["h_post_prev"], y, dx_in, torch.float32,
                                         store_x=False)
    assert none is None and x is not None and torch.equal(dh_only, dh)  # K2's X: test_triton_fused.py


def test_pack_coefs_puts_each_coefficient_in_its_group_and_column():
    """The kernel reads coefficient i of group g at row g * T + t: h_res[:, i, g] for g < n (what X_prev_g adds to
    X_i, and G_i to dX_prev_g), then h_post, h_pre and dsq (column 0)."""
    t, n = 5, 3
    g = torch.Generator().manual_seed(0)
    h_post, h_res = torch.randn(t, n, generator=g), torch.randn(t, n, n, generator=g)
    h_pre, dsq = torch.randn(t, n, generator=g), torch.randn(t, generator=g)
    packed = gs.pack_coefs(h_post, h_res, h_pre, dsq)
    assert packed.shape == (gs.coef_groups(n) * t, gs.CW) == (6 * t, 4) and packed.dtype == torch.float32
    group = packed.view(gs.coef_groups(n), t, gs.CW)
    for i in range(n):
        for j in range(n):
            assert torch.equal(group[j, :, i], h_res[:, i, j])
        assert torch.equal(group[n, :, i], h_post[:, i])
        assert torch.equal(group[n + 1, :, i], h_pre[:, i])
    assert torch.equal(group[n + 2, :, 0], dsq)
    assert not group[:n + 2, :, n:].any() and not group[n + 2, :, 1:].any()
    # X_i = h_post_i y + sum_j h_res[i, j] X_prev_j and dX_prev_j = sum_i h_res[i, j] G_i, read as the kernel does
    x_prev, y, gg = torch.randn(t, n, 7, generator=g), torch.randn(t, 7, generator=g), torch.randn(t, n, 7, generator=g)
    x = torch.stack([group[n, :, i, None] * y + sum(group[j, :, i, None] * x_prev[:, j] for j in range(n))
                     for i in range(n)], 1)
    torch.testing.assert_close(x, ref.post_res(x_prev, h_res, h_post, y))
    dx_prev = torch.stack([sum(group[j, :, i, None] * gg[:, i] for i in range(n)) for j in range(n)], 1)
    torch.testing.assert_close(dx_prev, torch.einsum("tij,tic->tjc", h_res, gg))


def test_slots_fit_shared_memory():
    # n = 4: a slot is 10 stream tiles (40 KB) + coefficients (7 groups of 16-byte rows) and dp (15 KB); once: phi
    # (16 KB) and the dphi warpgroup's tile of dp^T's hi / lo rows (8 KB)
    assert gs.smem_bytes(4, 3) == 3 * (10 * 4096 + 7 * 1024 + 8192) + 16384 + 8192 <= gs._SMEM
    assert gs.stages_for(4) == 3 and gs.stages_for(1) == 3
    assert gs.stages_for(4, mixers=2) == 2  # mixers taking tiles in turn: an even ring (tests/test_ring_protocol.py)
    assert gs.stages_for(4, stages=4) is None  # four slots do not fit


def test_pack_coefs_puts_h_pre_prev_in_one_group():
    """boundary_grads' x_in: h_pre_prev[:, j] in column j of group n + 3 (the mixer's loop over j picks column j
    by its run-time j), after the groups step's backward packs."""
    t, n = 5, 3
    g = torch.Generator().manual_seed(2)
    h_post, h_res, h_pre, dsq, hpp = (torch.rand(t, n, generator=g), torch.rand(t, n, n, generator=g),
                                      torch.rand(t, n, generator=g), torch.rand(t, generator=g),
                                      torch.rand(t, n, generator=g))
    packed = gs.pack_coefs(h_post, h_res, h_pre, dsq, hpp).view(gs.coef_groups(n, True), t, gs.CW)
    assert gs.coef_groups(n, True) == n + 4
    assert torch.equal(packed[:n + 3], gs.pack_coefs(h_post, h_res, h_pre, dsq).view(n + 3, t, gs.CW))
    assert torch.equal(packed[n + 3, :, :n], hpp) and not packed[n + 3, :, n:].any()
    # x_in = sum_j h_pre_prev[j] X_prev_j, read as the kernel does
    x_prev = torch.randn(t, n, 7, generator=g)
    x_in = sum(packed[n + 3, :, j, None] * x_prev[:, j] for j in range(n))
    torch.testing.assert_close(x_in, ref.pre(x_prev, hpp))


@pytest.mark.parametrize("t, n, xin", [(1, 1, False), (37, 3, True), (130, 4, True), (129, 4, False), (45, 2, True)])
def test_pack_tokens_matches_pack_coefs_and_pad_cols(t, n, xin):
    """The one-launch Triton packing (under the interpreter here) against the plain-PyTorch packing, bit for bit:
    the coefficient groups and dp padded to MP fp32 columns, from bf16 / fp32 inputs as the ops hand them over."""
    g = torch.Generator().manual_seed(t + n)
    m = ref.num_coeffs(n)
    h_post, h_pre, hpp = (torch.rand(t, n, generator=g) for _ in range(3))
    h_res, dsq = torch.rand(t, n, n, generator=g).to(torch.bfloat16), torch.randn(t, 1, generator=g)
    dp = torch.randn(t, m, generator=g) * 10.0 ** torch.randint(-3, 3, (t, 1), generator=g)
    coefs, dp_pad = gs.pack_tokens(h_post, h_res, h_pre, dsq, dp, hpp if xin else None)
    want = gs.pack_coefs(h_post, h_res.float(), h_pre, dsq.reshape(t), hpp if xin else None)
    assert coefs.shape == want.shape and torch.equal(coefs, want)
    assert torch.equal(dp_pad, gs.pad_cols(dp, gs.MP))


def test_boundary_slots_fit_two_at_n4():
    # X's ring beside the step's: 3n + 2 stream tiles a slot, and h_pre_prev's group with x_in
    assert gs.smem_bytes(4, 2, saved_x=True, xin=True) == 2 * (14 * 4096 + 8 * 1024 + 8192) + 16384 + 8192
    assert gs.stages_for(4, saved_x=True, xin=True) == 2 == gs.stages_for(4, saved_x=True)
    assert gs.stages_for(4, stages=3, saved_x=True) is None


def test_dh_in_l2_is_off_under_deterministic_algorithms(monkeypatch):
    """dh_atomic (the default since session 41) adds the dH partials in L2 in whatever order the channel blocks
    come: never where torch is asked for deterministic algorithms (the partials a plane a block, summed by torch,
    run instead), for the boundary's pass and step's alike."""
    seen = []
    monkeypatch.setattr(gs, "_launch", lambda *args, **kw: seen.append(args[18]) or (None,) * 6)  # dh_atomic
    operands = (None,) * 11
    before = torch.are_deterministic_algorithms_enabled()
    for call, ops in ((gs.boundary_grads, operands), (gs.step_grads, operands[1:])):
        seen.clear()
        call(*ops)
        call(*ops, dh_atomic=False)
        torch.use_deterministic_algorithms(True)
        try:
            call(*ops)
        finally:
            torch.use_deterministic_algorithms(before)
        assert seen == [True, False, False], call.__name__
    from mhc_compile.kernels.triton_config import BoundaryBwdCfg

    assert tf.StepBwdCfg().dh_atomic and BoundaryBwdCfg().dh_atomic


def test_pad_cols_zero_fills():
    v = torch.arange(6.0).reshape(2, 3)
    out = gs.pad_cols(v, 8)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], v) and not out[:, 3:].any()


def test_config_checks_and_cpu_fallback():
    with pytest.raises(ValueError, match="mixers=3"):
        tf.configure("step_bwd", mixers=3)
    with pytest.raises(ValueError, match="stages=3 for mixers=2"):  # an odd ring for two mixers: a parity race
        tf.configure("step_bwd", stages=3, mixers=2)
    with pytest.raises(ValueError, match="unknown kernel"):
        with tf.tuning("step_backward", ws=True):
            pass
    # off sm_90 (here: CPU tensors) ws=True runs the three passes: the same values as without it
    v, gr = _inputs(6, 4, 16, seed=3, dtype=torch.float32)
    args = (4, 64, 1e-6, 20, "mhc")
    _, _, h_pre, _, _, p, sq = ref.step(*v.values(), *args)
    call = (*v.values(), h_pre, p, sq, gr["dx"], gr["dx_in"], gr["dh_post"], gr["dh_res"], *args)
    assert not gs.supported(v["x_prev"], 4, 16)
    with tf.tuning("step_bwd", ws=False):
        want = tf.step_backward(*call)
    before = gs.LAUNCHES
    got = tf.step_backward(*call)  # ws is the default
    assert tf._cfg("step_bwd").ws and gs.LAUNCHES == before
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_gluon_build_error_falls_back_to_the_three_passes_with_a_warning(monkeypatch):
    """The two-pass backward is the default on sm_90: if its Gluon kernel does not build (another Triton's Gluon,
    shared memory, ptxas), the call runs the three passes with a warning (the same values as they give), and later
    calls go straight there."""
    v, gr = _inputs(6, 4, 16, seed=5, dtype=torch.float32)
    args = (4, 64, 1e-6, 20, "mhc")
    _, _, h_pre, _, _, p, sq = ref.step(*v.values(), *args)
    call = (*v.values(), h_pre, p, sq, gr["dx"], gr["dx_in"], gr["dh_post"], gr["dh_res"], *args)
    with tf.tuning("step_bwd", ws=False):
        want = tf.step_backward(*call)
    tries = []

    monkeypatch.setattr(gs, "supported", lambda *args: True)  # as on an sm_90 GPU
    monkeypatch.setattr(gs, "step_grads", failing_build(tries))
    monkeypatch.setattr(tf, "_NO_GLUON", set())
    with pytest.warns(UserWarning, match="Gluon kernel does not build here.*OutOfResources"):
        got = tf.step_backward(*call)
    again = tf.step_backward(*call)
    assert [kw["stages"] for _, kw in tries] == [0] and tf._NO_GLUON == {v["x_prev"].device}
    assert [(kw["walk_tiles"], kw["long_walk"], kw["pace"]) for _, kw in tries] == [(0, 0, 0)]  # StepBwdCfg's plan
    assert [kw["store_lag"] for _, kw in tries] == [tf.StepBwdCfg.store_lag]  # the kernel says where it applies
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(again, want))


def _run(*args, **kw):
    return run_check("gluon_step_bwd_check.py", *args, **kw)


@pytest.mark.skipif(not gs.AVAILABLE, reason="the installed Triton has no Gluon")
def test_builds_for_sm90_within_shared_memory():
    proc = _run("--build", ptxas_log=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not serialized(proc), serialized(proc)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("mixers=", "boundary ("))]
    # step's second pass with two and one mixers, then boundary_grads (X read) with and without x_in, two mixers,
    # then step's pass with its dH added in L2, and with dX_prev summed over the streams too, the boundary paced, and
    # the chain head's call on its broadcast X_prev, that call freeing its slots a tile late (STORE_LAG), and the
    # same on four slots (its one X_prev tile a slot lets them fit); then that call and step's pass on a dense X_prev
    # with X mixed by the dphi warpgroup (X_DPHI)
    assert len(rows) == 13 and all(row.endswith(" ok") and "'HGMMA': 0," not in row for row in rows), proc.stdout
    tile = {row.split(": triton")[0]: int(row.split("a tile: ")[1].split()[0]) for row in rows}
    # a broadcast X_prev: its row read and widened once a tile, and dH_res's sums made once for all n columns
    # (1810 -> 1661 instructions a tile with Triton 3.6, session 51), and stored once (1621 -> 1314, session 52)
    head = "mixers=1 dH in L2 dX_prev summed X_prev broadcast"
    assert tile[head] < 0.95 * tile["mixers=1 dH in L2 dX_prev summed"]
    # X mixed by the dphi warpgroup: the mixer's tile sheds the mixing's FMAs and the X_i stores (1306 -> 930 on the
    # row, 2048 -> 1555 on a dense X_prev, Triton 3.6; session 53)
    assert tile[head + " slots freed late X mixed by dphi"] < 0.8 * tile[head + " slots freed late"]
    assert tile["mixers=1 dH in L2 X mixed by dphi"] < 0.8 * tile["mixers=1 dH in L2"]
    # the mixer's barriers a tile (bars=): X_prev's tiles all read before dX_prev is written over any, in two loops
    # over j (session 53), so the boundary (the default path's kernel: 8 with Triton 3.6, 7 with 3.9) takes fewer
    # than step's dense pass (11 / 10), which also rebuilds X_i and stores them over dX_i
    bars = {row.split(": triton")[0]: int(row.split(" bars=")[1].split()[0]) for row in rows}
    assert all(bars[row] < bars["mixers=1 dH in L2"] for row in bars if row.startswith("boundary")), bars


def test_the_chain_heads_call_holds_one_x_prev_tile_a_slot():
    """Broadcast X_prev with dX_prev summed (X_TILES = 1): its slots are n - 1 tiles smaller, so four fit at n = 4
    where three did; asked for none, that call takes four (session 52, H100: 0.3-1.2 % faster) and every other call
    at most three, as before."""
    tile = gs.BT * gs.BC * 2
    assert gs.smem_bytes(4, 3) - gs.smem_bytes(4, 3, x_tiles=1) == 3 * 3 * tile
    assert gs.stages_for(4, 4) is None and gs.stages_for(4, 4, x_tiles=1) == 4
    assert gs.stages_for(4, x_tiles=1) == 4 and gs.stages_for(4) == 3  # the broadcast row's call: four slots


def test_x_mixed_by_the_dphi_warpgroup_takes_a_ring_of_its_own():
    """X_DPHI: X's n tiles a slot besides dX's (the mixer still reads dX_i after the dphi warpgroup has written X_i),
    so the broadcast row's call fits three slots instead of four, and step's pass on a dense X_prev two instead of
    three; boundary_grads, which reads X, ignores it (its ring holds X already)."""
    tile = gs.BT * gs.BC * 2
    assert gs.smem_bytes(4, 3, x_dphi=True) - gs.smem_bytes(4, 3) == 3 * 4 * tile
    assert gs.smem_bytes(4, 2, saved_x=True, x_dphi=True) == gs.smem_bytes(4, 2, saved_x=True)
    assert gs.stages_for(4, x_tiles=1, x_dphi=True) == 3 and gs.stages_for(4, x_dphi=True) == 2
    assert gs.X_DPHI_REGS <= 208  # the mixer's 256 and the loader's group's 40 fit beside it (gluon_step_bwd)


def test_a_slot_is_freed_a_tile_late_only_where_the_loader_keeps_one():
    """STORE_LAG: each mixer then holds two slots; the loader needs one more to run ahead (session 51: the boundary's
    two-slot ring ran 22 % slower with it)."""
    assert gs.stores_lag(True, 3, 1) and gs.stores_lag(True, 6, 2)
    assert not gs.stores_lag(True, 2, 1) and not gs.stores_lag(True, 4, 2) and not gs.stores_lag(False, 3, 1)


@pytest.mark.skipif(not (on_sm90_gpu() and gs.AVAILABLE), reason=GPU_ONLY)
def test_matches_the_reference_on_an_sm90_gpu():
    proc = _run("--no-times")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]


def test_walk_tiles_caps_a_programs_token_walk():
    """plan_splits: whole waves of programs by default; with walk_tiles at least enough token splits that no program
    walks more tiles (GluonStepCfg.walk_tiles), ragged token counts included; with long_walk only where the plan's
    walks are longer than that (the boundary's default: over 128 tiles, capped at 64)."""
    cpu = torch.device("cpu")  # 4 SMs stand-in
    assert gs.plan_splits(32768, 4096, cpu) == (1, 32768)
    assert gs.plan_splits(32768, 4096, cpu, walk_tiles=32) == (16, 2048)
    assert gs.plan_splits(32768, 4096, cpu, walk_tiles=1000) == (1, 32768)
    splits, t_split = gs.plan_splits(1000, 512, cpu, walk_tiles=4)
    assert t_split % gs.BT == 0 and t_split // gs.BT <= 4 and splits * t_split >= 1000 > (splits - 1) * t_split
    assert gs.plan_splits(8192, 4096, cpu, walk_tiles=64) == (2, 4096)  # 128 tiles > 64: capped
    assert gs.plan_splits(8192, 4096, cpu, walk_tiles=64, long_walk=128) == (1, 8192)  # 128 tiles: left alone
    assert gs.plan_splits(8256, 4096, cpu, walk_tiles=64, long_walk=128) == (3, 2752)  # 129 tiles: 3 walks of 43
    assert gs.plan_splits(32768, 4096, cpu, walk_tiles=64, long_walk=128) == (8, 4096)


@pytest.mark.parametrize("parts, planes, n, c, t, dtype", [(1, 1, 4, 64, 300, torch.float32),
                                                             (3, 2, 2, 96, 129, torch.bfloat16),
                                                             (2, 5, 1, 32, 7, torch.float64)])
def test_finish_matches_its_torch_twin(parts, planes, n, c, t, dtype):
    """finish (one Triton launch, under the interpreter here) against finish_reference, the torch ops it replaced:
    dphi summed over token splits and hi / lo rows, rows past m dropped, transposed; dH summed over its planes and
    made token-major. fp32 and fp64 outputs equal; bf16 within one unit in the last place (the interpreter rounds a
    bf16 store toward zero, the GPU to nearest), sums of several partials within fp32's rounding of another order of
    adds, on fresh random partials, ragged token counts."""
    g = torch.Generator().manual_seed(parts * 7 + planes)
    m = n * n + 2 * n
    dphi_t = torch.randn(parts, 2 * gs.MP, n * c, generator=g)
    dh = torch.randn(planes, n * n + n, t, generator=g)
    got = gs.finish(dphi_t, dh, m, n, dtype)
    want = gs.finish_reference(dphi_t, dh, m, n, dtype)
    for a, w in zip(got, want):
        assert a.shape == w.shape and a.dtype == w.dtype and a.is_contiguous()
    assert [a.shape for a in got] == [(t, n, n), (t, n), (n * c, m)]
    for a, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, w, rtol=0 if planes == 1 else 1e-6, atol=0)
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0 if parts == 1 else 1e-6
    torch.testing.assert_close(got[2].double(), want[2].double(), rtol=tol, atol=1e-6 if tol else 0)


@pytest.mark.parametrize("planes, n, t", [(1, 4, 300), (3, 2, 129), (1, 1, 7)])
def test_finish_reads_a_broadcast_rows_dh_res_column_for_every_column(planes, n, t):
    """row_dh (X_prev broadcast: the kernel stores dH_res[:, 0] once, as rows i n of dh): finish and its torch twin
    give dH_res[t, i, j] = the summed row i n for every j, never reading the rows the kernel left unwritten (NaN
    here), and dH_post and dphi as without row_dh."""
    g = torch.Generator().manual_seed(planes * 11 + n)
    m, c = n * n + 2 * n, 32
    dphi_t = torch.randn(1, 2 * gs.MP, n * c, generator=g)
    dh = torch.randn(planes, n * n + n, t, generator=g)
    written = dh.clone()
    for i in range(n):
        dh[:, i * n + 1:(i + 1) * n] = float("nan")  # columns j > 0: unwritten by the kernel
    want_res = written.sum(0)[:n * n].t().reshape(t, n, n)[:, :, :1].expand(t, n, n)
    plain = gs.finish_reference(dphi_t, written, m, n, torch.float32)
    for fn in (gs.finish, gs.finish_reference):
        dh_res, dh_post, dphi = fn(dphi_t, dh, m, n, torch.float32, row_dh=True)
        assert dh_res.is_contiguous() and not dh_res.isnan().any()
        torch.testing.assert_close(dh_res, want_res, rtol=0 if planes == 1 else 1e-6, atol=0)
        torch.testing.assert_close(dh_post, plain[1], rtol=0 if planes == 1 else 1e-6, atol=0)
        torch.testing.assert_close(dphi, plain[2], rtol=0, atol=0)


def test_phi_operand_pads_only_rows_tma_cannot_read():
    """phi is read as it is where its fp32 rows are whole 16-byte units (n = 2, 4: m = 8, 24), padded with zero
    columns to MP otherwise (n = 1, 3: m = 3, 15), or cast (bf16) and then judged the same way."""
    phi = torch.randn(64, 24)
    assert gs.phi_operand(phi) is phi
    odd = torch.randn(64, 15)
    padded = gs.phi_operand(odd)
    assert padded.shape == (64, gs.MP) and torch.equal(padded[:, :15], odd) and not padded[:, 15:].any()
    half = torch.randn(64, 8).bfloat16()
    assert gs.phi_operand(half).dtype == torch.float32 and torch.equal(gs.phi_operand(half), half.float())
    strided = torch.randn(24, 64).t()
    assert gs.phi_operand(strided).shape == (64, gs.MP)


def test_pace_only_where_the_plan_is_one_wave():
    """plan_walks: with pace, a plan whose programs all fit the SMs at once is paced and its walks left whole, caps
    or not; a plan of more programs than SMs is capped as plan_splits caps it and not paced (its programs do not run
    together), unless its walks are at least pace_waves tiles and its last split whole: then a wave of num_SMs
    programs shares a counter; with pace_walk, a one-wave plan whose walks are shorter is capped and not paced (by
    wave neither);
    without pace, plan_splits' plan."""
    cpu = torch.device("cpu")  # 4 SMs stand-in
    assert gs.plan_walks(4096, 4 * gs.BC, cpu, walk_tiles=8, pace=3) == (1, 4096, 3, 4)  # 4 programs, 64-tile walks
    assert gs.plan_walks(4096, 2 * gs.BC, cpu, walk_tiles=8, pace=3) == (2, 2048, 3, 2)  # 2 blocks x 2 splits
    assert gs.plan_walks(4096, 4 * gs.BC, cpu, walk_tiles=8) == (8, 512, 0, 4)  # not paced: capped
    assert gs.plan_walks(4096, 4 * gs.BC, cpu, walk_tiles=8, pace=3, pace_walk=64) == (1, 4096, 3, 4)  # long enough
    assert gs.plan_walks(4096, 4 * gs.BC, cpu, walk_tiles=8, pace=3, pace_walk=65) == (8, 512, 0, 4)  # too short
    assert gs.plan_walks(4096, 4 * gs.BC, cpu, walk_tiles=8, pace=3, pace_waves=8, pace_walk=65) == (8, 512, 0, 4)
    eight = 8 * gs.BC  # 8 blocks, 4 SMs: two waves, so no pacing, and the cap as plan_splits
    assert gs.plan_walks(4096, eight, cpu, walk_tiles=8, pace=3) == (*gs.plan_splits(4096, eight, cpu, 8), 0, 8)
    assert gs.plan_walks(4096, eight, cpu, walk_tiles=8, pace=3, pace_waves=8) == (
        *gs.plan_splits(4096, eight, cpu, 8), 3, 4)  # walks of 8 tiles: a wave of 4 programs a counter
    assert gs.plan_walks(4096, eight, cpu, walk_tiles=8, pace=3, pace_waves=9) == (
        *gs.plan_splits(4096, eight, cpu, 8), 0, 8)  # walks shorter than pace_waves: not paced
    assert gs.plan_splits(4032, eight, cpu, 8) == (8, 512)  # 63 tiles: the last split walks 7
    assert gs.plan_walks(4032, eight, cpu, walk_tiles=8, pace=3, pace_waves=8) == (8, 512, 0, 8)  # not paced
    assert gs.plan_walks(32768, 4096, cpu, walk_tiles=64, long_walk=128, pace=3) == (8, 4096, 0, 128)


def test_walk_tiles_reaches_the_launch(monkeypatch):
    """Both ops' configs hand walk_tiles, pace, pace_waves and pace_walk to the kernel's launch; a negative one is a
    config error."""
    from mhc_compile.kernels.triton_config import BoundaryBwdCfg

    seen = []
    monkeypatch.setattr(gs, "_launch", lambda *args, **kw: seen.append((kw.get("walk_tiles"), kw.get("long_walk"),
                                                                        kw.get("pace"), kw.get("pace_waves"),
                                                                        kw.get("pace_walk")))
                        or (None,) * 6)
    operands = (None,) * 11
    gs.boundary_grads(*operands, walk_tiles=32, pace=5, pace_waves=16, pace_walk=7)
    gs.step_grads(*operands[1:], walk_tiles=16, long_walk=64, pace_walk=9)
    assert seen == [(32, 0, 5, 16, 7), (16, 64, 0, 0, 9)]
    b, s = BoundaryBwdCfg(), tf.StepBwdCfg()
    assert (b.walk_tiles, b.long_walk, b.pace, b.pace_waves, b.pace_walk) == (64, 128, 3, 64, 0)
    assert (s.walk_tiles, s.long_walk, s.pace, s.pace_waves, s.pace_walk) == (0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="pace_walk=-1"):
        tf.StepBwdCfg(pace_walk=-1)
    with pytest.raises(ValueError, match="pace=-1"):
        BoundaryBwdCfg(pace=-1)
    with pytest.raises(ValueError, match="pace_waves=-1"):
        BoundaryBwdCfg(pace_waves=-1)
    with pytest.raises(ValueError, match="walk_tiles=-1"):
        BoundaryBwdCfg(walk_tiles=-1)
    with pytest.raises(ValueError, match="long_walk=-1"):
        BoundaryBwdCfg(long_walk=-1)
    with pytest.raises(ValueError, match="walk_tiles=-2"):
        tf.configure("step_bwd", walk_tiles=-2)


def test_a_broadcast_x_prev_reaches_the_gluon_pass_as_rows_only_where_turned_on(monkeypatch):
    """As post_res_proj's (test_gluon_post_res_proj.py): X_prev broadcast over n reaches the Gluon pass as its rows
    where its broadcast reads are on (the default), dense where they are off; K2 before it reads the rows either way.
    The pass is stubbed (it runs only on an sm_90 GPU)."""
    from mhc_compile.kernels import triton_common as tcom

    v, gr = _inputs(6, 4, 16, seed=7, dtype=torch.float32)
    v["x_prev"] = v["x_prev"][:, 0].contiguous().unsqueeze(1).expand(6, 4, 16)
    args = (4, 64, 1e-6, 20, "mhc")
    _, _, h_pre, _, _, p, sq = ref.step(*v.values(), *args)
    seen = []

    def pass_two(x_prev, *rest, **kw):
        seen.append(x_prev.stride(1))
        return (torch.zeros(6, 4, 16), torch.zeros(6, 4, 4), torch.zeros(6, 4), torch.zeros(6, 16),
                torch.zeros(64, 24))

    monkeypatch.setattr(gs, "supported", lambda *args: True)
    monkeypatch.setattr(gs, "step_grads", pass_two)
    for on, stride in ((False, 16), (True, 0)):
        monkeypatch.setattr(tcom, "GLUON_BCAST", on)
        seen.clear()
        tf.step_backward(*v.values(), h_pre, p, sq, gr["dx"], gr["dx_in"], gr["dh_post"], gr["dh_res"], *args)
        assert seen == [stride]
