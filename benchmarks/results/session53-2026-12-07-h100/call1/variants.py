"""Make call 1's three timing-only copies of kernels/gluon_step_bwd.py at the repo root (run from the root); as
session 52's call2/variants.py, on this session's module (the mixing loop now in _mix_x)."""
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
