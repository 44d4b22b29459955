"""Make calls 1 and 2's timing-only copies of kernels/gluon_step_bwd.py at the repo root (run from the root); as
session 52's call2/variants.py, on this session's module (the mixing loop now in _mix_x). Runs on main up to 577d978
(session 54); session 55 made main's STORE_LAG release lagend.py's (4ed5d08), so on later mains its lagend transform
fails after norebuild.py, nodphi.py and nodh.py are written (check out 577d978's module to make the rest)."""
s = open("mhc_compile/kernels/gluon_step_bwd.py").read()
rebuild = "        for j in range(NJ):\n            if X_BCAST:\n                xj = xrow\n"
assert s.count(rebuild) == 1
open("norebuild.py", "w").write(s.replace(rebuild, rebuild.replace("range(NJ)", "range(1)")))
start = "            _warps_barrier()  # every warp has waited on the last tile's wgmmas, which read hlw\n"
end = "            acc = _waited(warpgroup_mma_wait(num_outstanding=0, deps=new), N)\n"
assert s.count(start) == 1 and s.count(end) == 1
i, j = s.index(start), s.index(end) + len(end)
open("nodphi.py", "w").write(s[:i] + s[j:])  # X_DPHI's hand-off goes too: run it with x_dphi off only
# nodh.py: no dH partials leave the mixer (no L2 reductions; dH wrong, timing only)
put = """        if DH_ATOMIC:
            gl.atomic_add(ptr, val, mask=mask, sem="relaxed")
        else:
            gl.store(ptr, val, mask=mask)
"""
assert s.count(put) == 1
open("nodh.py", "w").write(s.replace(put, "        pass\n"))
# lagend.py: the tile before's slot freed once this tile's TMA stores are issued, as through session 52 (the release
# this session moved; bit-equal, timing only)
start = s.index("            if STORE_LAG:  # the tile before's stores, issued a tile ago")
mid = "            elif not COLLAPSE:\n                _warps_barrier()\n"
end = s.index(mid, start) + len(mid)
lag = s[:start] + "            if not COLLAPSE:\n                _warps_barrier()\n" + s[end:]
old_end = """            if not STORE_LAG:  # (with STORE_LAG this tile's stores stay in flight: its slot is freed a tile later)
                tma.store_wait(0)  # the stores have read the slot's tiles"""
was_end = """            if STORE_LAG:  # this tile's stores stay in flight; the tile before's have read their slot: free it
                tma.store_wait((1 if COLLAPSE else N) + 1 + (1 if XIN else 0))
                if it >= FIRST + MIXERS:
                    mbarrier.arrive(empty.index((it - MIXERS) % STAGES), count=1)
                    if PACE:
                        gl.atomic_add(pace_ptr, 1, sem="relaxed")
            else:
                tma.store_wait(0)  # the stores have read the slot's tiles"""
assert lag.count(old_end) == 1
open("lagend.py", "w").write(lag.replace(old_end, was_end))
# unrollb.py (session 54): the loop over j that writes dX_prev_j unrolled (gl.static_range(N)): one barrier fewer a
# tile (boundary 8 -> 7, dense step 11 -> 10; 1743 -> 1710 and 2069 -> 2038 instructions a tile, Triton 3.6), but
# 216 more instructions of code in the mixer's loop (instruction fetch: session 23); bit-equal, timing only
loop_b = "                for j in range(NJ):  # dX_prev_j = sum_i h_res[i, j] G_i over X_prev_j\n"
assert s.count(loop_b) == 1
open("unrollb.py", "w").write(s.replace(loop_b, loop_b.replace("range(NJ)", "gl.static_range(N)")))
# dxg.py (session 54): where the mixer reads X_i as stored (SAVED_X: the boundary; X_DPHI) and the tile is not
# collapsed, dX_prev_j goes over dX_j's tile (dxs[j], read into registers by then; the dphi warpgroup reads X_i, not
# dX_i, there), not over X_prev_j's: one allocation a stream, so the n stores take no barrier between them (the
# boundary 8 -> 4 barriers a tile, 1743 -> 1701 instructions; dense X_DPHI 7 -> 4, 1578 -> 1542; Triton 3.6)
def swap(text, old, new):
    assert text.count(old) == 1, old
    return text.replace(old, new)


here = "        MIX_HERE: gl.constexpr = not SAVED_X and not X_DPHI  # X_i mixed by this warpgroup\n"
d = swap(s, here, here + "        DX_OVER_G: gl.constexpr = not MIX_HERE and not COLLAPSE\n")
d = swap(d, "            if not COLLAPSE:\n                for j in range(NJ):  # dX_prev_j",
         """            if DX_OVER_G:
                for j in gl.static_range(N):
                    dxp = _row(coefs, s, j, 0, NG, L) * g[0]
                    for i in gl.static_range(1, N):
                        dxp += _row(coefs, s, j, i, NG, L) * g[i]
                    dxs[j].index(s).store(f32_to_bf16(dxp))
            elif not COLLAPSE:
                for j in range(NJ):  # dX_prev_j""")
d = swap(d, "            else:\n                for j in gl.static_range(N):  # unrolled: a TMA store",
         """            elif DX_OVER_G:
                for j in gl.static_range(N):
                    _tma_store(o_desc, [t0, j * C + c0], dxs[j].index(s))
            else:
                for j in gl.static_range(N):  # unrolled: a TMA store""")
open("dxg.py", "w").write(d)
# base.py: the module before this session's barrier work (commit 96dec17: X_DPHI, the release after the stores, one
# loop over j that reads X_prev_j and writes dX_prev_j over it)
import subprocess
open("base.py", "w").write(subprocess.run(["git", "show", "96dec17:mhc_compile/kernels/gluon_step_bwd.py"],
                                          capture_output=True, text=True, check=True).stdout)
