"""Write call 1's copies of kernels/gluon_step_bwd.py at the repo root (run from the root, on main at 541389c).

Session 57 put the chain head row's gap to 85 % in two places, each about 9 %: the dH partials (lane sums,
reduce-scatter, adds in L2) and the dphi warpgroup's work (dp's hi / lo split, four wgmmas). These copies split each
in two. All but earlysplit are timing-only: their outputs are wrong.
  earlysplit.py  the dphi warpgroup splits dp once the slot lands, before waiting on the mixer's X_i (session 57's
                 earlysplit.patch; the same operations: bit-equal expected)
  noatom.py      the dH partials stored, not added in L2 (the same lane sums and shuffles; plain stores race)
  onesum.py      each group's four lane sums made from G_0 alone (a quarter of the FMAs; the same adds in L2)
  nosplit.py     the dphi warpgroup's wgmmas read hlw as it stands (no split of dp)
  nowgmma.py     the split made, the wgmmas not issued
Candidates (outputs as main's; written at the end of this file, where each says what it changes):
  vred.py        the row's two partials a lane as one 8-byte vector reduction into a token-major plane
  vredall.py     vred, and on a dense X_prev at n = 4 a lane's four dH_res as one 16-byte vector reduction
  spread4.py, spread16.py   the partials added into 4 / 16 planes, channel block cb into plane cb % G
  dbuf.py        the dphi warpgroup splits the next tile's dp into a second buffer while this tile's wgmmas run
"""
import subprocess


def swap(text, old, new, count=1):
    assert text.count(old) == count, old
    return text.replace(old, new)


s = open("mhc_compile/kernels/gluon_step_bwd.py").read()
patch = "benchmarks/results/session57-2026-12-07-h100/earlysplit.patch"
subprocess.run(["git", "apply", "--check", patch], check=True)
open("earlysplit.py", "w").write(subprocess.run(
    ["bash", "-c", f"cp mhc_compile/kernels/gluon_step_bwd.py /tmp/_es.py && patch -s -o - /tmp/_es.py < {patch}"],
    capture_output=True, text=True, check=True).stdout)
open("noatom.py", "w").write(swap(s, 'gl.atomic_add(ptr, val, mask=mask, sem="relaxed")',
                                  "gl.store(ptr, val, mask=mask)"))
o = s
for arg in ("y", "xrow", "xj"):
    o = swap(o, f"_lane_sums(g[i] * {arg})", f"_lane_sums(g[0] * {arg})")
open("onesum.py", "w").write(o)
open("nosplit.py", "w").write(swap(s, "            _split_dp(dps, s, hlw, MP, BT, num_warps)\n", ""))
wg = """            new = ()
            for i in gl.static_range(N):
                xi = xsv.index(i * STAGES + s) if SAVED_X or X_DPHI else dxs[i].index(s)
                new = new + (warpgroup_mma(hlw, xi, acc[i], is_async=True),)
            acc = _waited(warpgroup_mma_wait(num_outstanding=0, deps=new), N)
"""
open("nowgmma.py", "w").write(swap(s, wg, ""))

# vred.py (a candidate, not timing-only): on the row (X_BCAST) with the partials added in L2, a lane's two totals
# (dH_post_i and dH_res[i, 0], i its quad lane) leave as one 8-byte vector reduction (red.global.add.v2.f32) into a
# token-major [T, N, 2] plane, instead of two 4-byte ones into the [NH, T] plane's rows: half the reductions, and a
# quad's four lanes cover 32 contiguous bytes of a token. finish reads that layout (ROW_PAIR).
v = swap(s, '''    @gluon.jit
    def _mixer(''', '''    @gluon.jit
    def _red_v2(ptr, a, b, mask):
        """ptr[0] += a, ptr[1] += b in L2 where mask: one 8-byte vector reduction (sm_90; ptr 8-byte aligned)."""
        return gl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $4, 0; @p red.relaxed.gpu.global.add.v2.f32 [$1], {$2, $3}; "
            "mov.u32 $0, 0; }", "=r,l,r,r,r", [ptr.to(gl.int64, bitcast=True), a, b, mask.to(gl.int32)], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _mixer(''')
v = swap(v, '''            _put_dh(hrow + (N * N + qlane) * T, _quad_totals(v[0], v[1], v[2], v[3], qlane), qmask, DH_ATOMIC)
''', '''            vpost = _quad_totals(v[0], v[1], v[2], v[3], qlane)
            ROW_PAIR: gl.constexpr = X_BCAST and DH_ATOMIC  # [T, N, 2]: (dH_post_i, dH_res[i, 0]) a token
            if not ROW_PAIR:
                _put_dh(hrow + (N * N + qlane) * T, vpost, qmask, DH_ATOMIC)
''')
v = swap(v, '''                _put_dh(hrow + qlane * N * T, _quad_totals(v[0], v[1], v[2], v[3], qlane), qmask, DH_ATOMIC)
''', '''                vres = _quad_totals(v[0], v[1], v[2], v[3], qlane)
                if ROW_PAIR:
                    _red_v2(dh_ptr + (t0 + qrow) * (2 * N) + 2 * qlane, vpost, vres, qmask)
                else:
                    _put_dh(hrow + qlane * N * T, vres, qmask, DH_ATOMIC)
''')
v = swap(v, '''                            ROW_DH: tl.constexpr = False):''', '''                            ROW_DH: tl.constexpr = False, ROW_PAIR: tl.constexpr = False):''')
v = swap(v, '''        src = tl.where(ks < NN, ks - ks % N, ks) if ROW_DH else ks
        acc = tl.load(dh_ptr + src[:, None].to(tl.int64) * T + toks[None, :], mask=mask, other=0.0)''',
         '''        if ROW_PAIR:  # [T, N, 2]: dH_post_i at 2 i, dH_res[i, 0] at 2 i + 1
            src = tl.where(ks < NN, 2 * (ks // N) + 1, 2 * (ks - NN))
            acc = tl.load(dh_ptr + toks[None, :].to(tl.int64) * (2 * N) + src[:, None], mask=mask, other=0.0)
        else:
            src = tl.where(ks < NN, ks - ks % N, ks) if ROW_DH else ks
            acc = tl.load(dh_ptr + src[:, None].to(tl.int64) * T + toks[None, :], mask=mask, other=0.0)''')
v = swap(v, '''           row_dh: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dH_res''', '''           row_dh: bool = False, row_pair: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dH_res''')
v = swap(v, '''           dict(MP=MP, BK=bk, BT=bt, HP=triton.next_power_of_2(nh), ROW_DH=row_dh))''',
         '''           dict(MP=MP, BK=bk, BT=bt, HP=triton.next_power_of_2(nh), ROW_DH=row_dh, ROW_PAIR=row_pair))''')
v = swap(v, '''                     row_dh: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``finish`` in torch ops (what ``_launch`` ran through session 45)."""
    t = dh.shape[-1]
    dphi = dphi_t.view(dphi_t.shape[0], 2, MP, -1).sum((0, 1))[:m].t()
''', '''                     row_dh: bool = False, row_pair: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``finish`` in torch ops (what ``_launch`` ran through session 45)."""
    t = dh.shape[-1]
    dphi = dphi_t.view(dphi_t.shape[0], 2, MP, -1).sum((0, 1))[:m].t()
    if row_pair:
        pair = dh.reshape(-1)[:2 * n * t].view(t, n, 2)
        return (pair[:, :, 1:].expand(t, n, n).contiguous(), pair[:, :, 0].contiguous(),
                dphi.to(dtype).contiguous())
''')
for f in ("finish", "finish_reference"):
    v = swap(v, f"{f}(dphi_t, dh, m, n, phi.dtype, row_dh=bcast)",
             f"{f}(dphi_t, dh, m, n, phi.dtype, row_dh=bcast, row_pair=bcast and dh_atomic)")
open("vred.py", "w").write(v)

# spread4.py / spread16.py (candidates): the partials added in L2 into G planes, channel block cb into plane cb % G,
# summed by finish (its torch sum over planes): the 128 channel blocks of a token tile, which the pacing keeps
# together, no longer add into the same few L2 lines at once (G planes, G times fewer adds a line), for G x 80
# bytes a token of memset and finish's read.
def spread(text, g):
    text = swap(text, '''            if DH_ATOMIC:  # one [NH, T] plane that every channel block adds to
                hrow = dh_ptr + t0 + qrow''', f'''            if DH_ATOMIC:  # {g} [NH, T] planes, channel block cb adding to plane cb % {g}
                hrow = dh_ptr + (cb % {g}).to(gl.int64) * NH * T + t0 + qrow''')
    text = swap(text, '''        zeroed = torch.zeros(nh * t + groups, dtype=torch.float32, device=dev)
        dh = zeroed[:nh * t].view(1, nh, t)
        counters = zeroed[nh * t:].view(torch.int32) if pace else dh.view(torch.int32)''', f'''        zeroed = torch.zeros({g} * nh * t + groups, dtype=torch.float32, device=dev)
        dh = zeroed[:{g} * nh * t].view({g}, nh, t)
        counters = zeroed[{g} * nh * t:].view(torch.int32) if pace else dh.view(torch.int32)''')
    return text


open("spread4.py", "w").write(spread(s, 4))
open("spread16.py", "w").write(spread(s, 16))

# dbuf.py (a candidate, bit-equal expected): the dphi warpgroup (X not mixed there: not X_DPHI) splits the next
# tile's dp into a second hi / lo buffer while this tile's wgmmas run, instead of splitting after the mixer's
# ``mixed`` and before its wgmmas: the split leaves the path from ``mixed`` to the slot's release. 8 KB more shared
# memory (smem_bytes).
d = swap(s, "    return stages * slot + n * BC * MP * 4 + 2 * MP * BT * 2\n",
         "    return stages * slot + n * BC * MP * 4 + 2 * (2 * MP * BT * 2)\n")
d = swap(d, "        hlw = gl.allocate_shared_memory(gl.bfloat16, [2 * MP, BT],\n",
         "        hlw = gl.allocate_shared_memory(gl.bfloat16, [2, 2 * MP, BT],\n")
old_loop = d[d.index("        for it in range(n_tiles):\n            s = it % STAGES\n            if SAVED_X or X_DPHI:"):
             d.index("        prow = gl.arange(0, 2 * MP, gl.SliceLayout(1, LD)).to(gl.int64)\n")]
new_loop = '''        if X_DPHI:
''' + "\n".join(("    " + line if line else line) for line in old_loop.replace(
    "_split_dp(dps, s, hlw,", "_split_dp(dps, s, hlw.index(0),").replace(
    "warpgroup_mma(hlw, xi,", "warpgroup_mma(hlw.index(0), xi,").split("\n")) + '''
        else:  # the next tile's hi / lo rows split into the other buffer while this tile's wgmmas run
            if n_tiles > 0:
                mbarrier.wait(ready.index(0), 0)
                _split_dp(dps, 0, hlw.index(0), MP, BT, num_warps)
                fence_async_shared()
                _warps_barrier()  # every warp's rows, before the wgmmas read them
            for it in range(n_tiles):
                s = it % STAGES
                if not SAVED_X:  # (SAVED_X: X_i landed with dp, waited on before its split)
                    mbarrier.wait(mixed.index(s), (it // STAGES) & 1)
                new = ()
                for i in gl.static_range(N):
                    xi = xsv.index(i * STAGES + s) if SAVED_X else dxs[i].index(s)
                    new = new + (warpgroup_mma(hlw.index(it % 2), xi, acc[i], is_async=True),)
                if it + 1 < n_tiles:  # the buffer the tile before's wgmmas read, waited on by every warp
                    s1 = (it + 1) % STAGES
                    mbarrier.wait(ready.index(s1), ((it + 1) // STAGES) & 1)
                    _split_dp(dps, s1, hlw.index((it + 1) % 2), MP, BT, num_warps)
                    fence_async_shared()
                acc = _waited(warpgroup_mma_wait(num_outstanding=0, deps=new), N)
                _warps_barrier()  # every warp's rows of the next buffer, and every warp's wait on this one's reads
                mbarrier.arrive(empty.index(s), count=1)
'''
d = d.replace(old_loop, new_loop)
open("dbuf.py", "w").write(d)

# vredall.py (a candidate): vred's row, and on a dense X_prev (the dense step, the boundary) with the partials added
# in L2 at n = 4, a token-major [T, NH] plane: a lane's four dH_res[i, j] (j = 0..3, carried through the loop over j
# by selects) leave as one red.global.add.v4.f32 after the loop, and its dH_post_i as one 4-byte add beside its quad's
# (16 contiguous bytes): two reductions a row a lane instead of five. finish reads that layout (TOKEN_MAJOR).
a = swap(v, '''    @gluon.jit
    def _mixer(''', '''    @gluon.jit
    def _red_v4(ptr, a, b, c, d, mask):
        """ptr[0..3] += a, b, c, d in L2 where mask: one 16-byte vector reduction (sm_90; ptr 16-byte aligned)."""
        return gl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $6, 0; @p red.relaxed.gpu.global.add.v4.f32 [$1], {$2, $3, $4, $5}; "
            "mov.u32 $0, 0; }", "=r,l,r,r,r,r,r", [ptr.to(gl.int64, bitcast=True), a, b, c, d, mask.to(gl.int32)],
            dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _mixer(''')
a = swap(a, '''            if not ROW_PAIR:
                _put_dh(hrow + (N * N + qlane) * T, vpost, qmask, DH_ATOMIC)
''', '''            TOK: gl.constexpr = DH_ATOMIC and not X_BCAST and N == 4  # [T, NH]: dH_res (i N + j), then dH_post
            trow = dh_ptr + (t0 + qrow) * NH
            if TOK:
                gl.atomic_add(trow + N * N + qlane, vpost, mask=qmask, sem="relaxed")
            elif not ROW_PAIR:
                _put_dh(hrow + (N * N + qlane) * T, vpost, qmask, DH_ATOMIC)
            r0 = qzero
            r1 = qzero
            r2 = qzero
            r3 = qzero
''')
a = swap(a, '''                    _put_dh(hrow + (qlane * N + j) * T, _quad_totals(v[0], v[1], v[2], v[3], qlane), qmask,
                            DH_ATOMIC)
''', '''                    tot = _quad_totals(v[0], v[1], v[2], v[3], qlane)
                    if TOK:  # lane q's dH_res[q, j], kept until the loop is done
                        r0 = gl.where(j == 0, tot, r0)
                        r1 = gl.where(j == 1, tot, r1)
                        r2 = gl.where(j == 2, tot, r2)
                        r3 = gl.where(j == 3, tot, r3)
                    else:
                        _put_dh(hrow + (qlane * N + j) * T, tot, qmask, DH_ATOMIC)
''')
a = swap(a, '''            # X_prev's tiles are read (above) before any is written over (below)''', '''            if TOK:
                _red_v4(trow + qlane * N, r0, r1, r2, r3, qmask)
            # X_prev's tiles are read (above) before any is written over (below)''')
a = swap(a, '''ROW_PAIR: tl.constexpr = False):''', '''ROW_PAIR: tl.constexpr = False,
                            TOKEN_MAJOR: tl.constexpr = False):''')
a = swap(a, '''        if ROW_PAIR:  # [T, N, 2]''', '''        if TOKEN_MAJOR:  # [T, NH]
            acc = tl.load(dh_ptr + toks[None, :].to(tl.int64) * NH + ks[:, None], mask=mask, other=0.0)
        elif ROW_PAIR:  # [T, N, 2]''')
a = swap(a, '''row_dh: bool = False, row_pair: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dH_res''', '''row_dh: bool = False, row_pair: bool = False,
           token_major: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dH_res''')
a = swap(a, "ROW_DH=row_dh, ROW_PAIR=row_pair))", "ROW_DH=row_dh, ROW_PAIR=row_pair,\n                TOKEN_MAJOR=token_major))")
a = swap(a, '''row_dh: bool = False, row_pair: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``finish`` in torch ops''', '''row_dh: bool = False, row_pair: bool = False,
                     token_major: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``finish`` in torch ops''')
a = swap(a, '''    if row_pair:
        pair =''', '''    if token_major:
        tok = dh.reshape(-1)[:(n * n + n) * t].view(t, n * n + n)
        return tok[:, :n * n].reshape(t, n, n).contiguous(), tok[:, n * n:].contiguous(), dphi.to(dtype).contiguous()
    if row_pair:
        pair =''')
for f in ("finish", "finish_reference"):
    a = swap(a, f"{f}(dphi_t, dh, m, n, phi.dtype, row_dh=bcast, row_pair=bcast and dh_atomic)",
             f"{f}(dphi_t, dh, m, n, phi.dtype, row_dh=bcast, row_pair=bcast and dh_atomic,\n"
             f"                                       token_major=dh_atomic and not bcast and n == 4)")
open("vredall.py", "w").write(a)
