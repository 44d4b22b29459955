"""Make call 3's timing copy of kernels/gluon_step_bwd.py at the repo root (run from the root): lag2.py, STORE_LAG as
a depth. Where the ring has a slot for the loader besides three a mixer (the chain head's row: four slots, one
mixer), a mixer frees a tile's slot two tiles later (its bulk-store wait leaves two tiles' stores in flight);
elsewhere one tile later, as on main. Session 55's call 2 found waiting for the stores sooner cost 1.4-6.5 %."""
s = open("mhc_compile/kernels/gluon_step_bwd.py").read()


def swap(old, new):
    global s
    assert s.count(old) == 1, old
    s = s.replace(old, new)


swap("""                tma.store_wait((1 if COLLAPSE else N) + 1 + (1 if XIN else 0))
                if it >= FIRST + MIXERS:
                    mbarrier.arrive(empty.index((it - MIXERS) % STAGES), count=1)""",
     """                tma.store_wait(STORE_LAG * ((1 if COLLAPSE else N) + 1 + (1 if XIN else 0)))
                if it >= FIRST + STORE_LAG * MIXERS:
                    mbarrier.arrive(empty.index((it - STORE_LAG * MIXERS) % STAGES), count=1)""")
swap("""            if n_tiles > FIRST:
                mbarrier.arrive(empty.index((FIRST + (n_tiles - 1 - FIRST) // MIXERS * MIXERS) % STAGES), count=1)
                if PACE:
                    gl.atomic_add(pace_ptr, 1, sem="relaxed")""",
     """            if n_tiles > FIRST:
                last = FIRST + (n_tiles - 1 - FIRST) // MIXERS * MIXERS
                for k in gl.static_range(STORE_LAG):
                    if last - k * MIXERS >= FIRST:
                        mbarrier.arrive(empty.index((last - k * MIXERS) % STAGES), count=1)
                        if PACE:
                            gl.atomic_add(pace_ptr, 1, sem="relaxed")""")
swap("""    return store_lag and stages >= 2 * mixers + 1""",
     """    return (2 if stages >= 3 * mixers + 1 else 1) if store_lag and stages >= 2 * mixers + 1 else 0""")
open("lag2.py", "w").write(s)
