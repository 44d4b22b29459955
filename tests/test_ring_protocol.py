"""The slot-ring protocols of the warp-specialized Gluon kernels, on a model of Hopper's mbarriers.

A TMA loader warp fills a ring of slots; consumer warpgroups wait on each slot's ``ready`` barrier with a phase
*parity* and release it on ``empty``. A parity wait tells only two phases apart: it passes as soon as the phase of
that parity last completed. So a consumer that waits on a slot two phases ahead of the barrier passes at once, on
an older tile's phase, and one that waits on the wrong parity blocks for ever.

The model: barriers with an arrival count, a transaction count and a completed-phase counter; the loader, the
consumers and the in-flight TMA loads are steps that a random scheduler interleaves, loads landing in any order.
A consumer that passes its wait checks that its slot holds the tile it waited for. Random schedules (seeded) of
each kernel's protocol (gluon_proj_bwd, gluon_step_bwd, and gluon_post_res_proj's two rings) must show no early
pass and no deadlock, and the two broken protocols that an H200 run of kernels/gluon_proj_bwd.py hit in session 25
must be caught (so the model can fail):

- consumers taking whole tiles in turn on an odd number of slots (``gluon_step_bwd`` with three slots and two
  mixers; the first build of ``gluon_proj_bwd``, which hung at 512 tiles a program);
- a "fix" that waited for the slot's previous phase first (it deadlocks whenever the loader runs ahead).
"""

import random

import pytest

from mhc_compile.kernels import gluon_post_res_proj as gpr
from mhc_compile.kernels import gluon_proj as gpf
from mhc_compile.kernels import gluon_proj_bwd as gp
from mhc_compile.kernels import gluon_step_bwd as gs


class Barrier:
    """An mbarrier: a phase completes when its arrivals reach ``count`` and its transaction bytes reach zero."""

    def __init__(self, count: int):
        self.count, self.arrived, self.tx, self.phases = count, 0, 0, 0

    def passes(self, parity: int) -> bool:
        return (self.phases & 1) != parity  # the phase of that parity is the last one completed

    def arrive(self, expect_tx: int = 0) -> None:
        self.arrived += 1
        self.tx += expect_tx
        self._complete()

    def landed(self, nbytes: int) -> None:
        self.tx -= nbytes
        self._complete()

    def _complete(self) -> None:
        if self.arrived == self.count and self.tx == 0:
            self.phases += 1
            self.arrived = 0


class Ring:
    """``stages`` slots with ready / empty barriers, what each slot holds, and the errors seen."""

    def __init__(self, stages: int, releases: int):
        self.stages = stages
        self.ready = [Barrier(1) for _ in range(stages)]
        self.empty = [Barrier(releases) for _ in range(stages)]
        self.holds = [None] * stages
        self.in_flight = []  # (slot, tile) loads issued, not landed
        self.errors = []


def loader(ring: Ring, tiles: int):
    for it in range(tiles):
        s = it % ring.stages
        if it >= ring.stages:
            yield ring.empty[s], ((it // ring.stages) & 1) ^ 1
        ring.ready[s].arrive(expect_tx=1)
        ring.in_flight.append((s, it))


def take(ring: Ring, name: str, it: int):
    """Wait on tile ``it``'s slot (``yield from``), then check that the slot holds that tile."""
    s = it % ring.stages
    yield ring.ready[s], (it // ring.stages) & 1
    if ring.holds[s] != it:
        ring.errors.append(f"{name} passed its wait for tile {it} while slot {s} held {ring.holds[s]}")


def consumer(ring: Ring, name: str, mine, tiles: int, release=None, double_wait: bool = False):
    """Waits on ``ready`` for each of its tiles (``mine``), checks the slot, then ``release(ring, s)`` (default:
    arrive on ``empty``). ``double_wait``: first wait for the slot's previous phase (the broken fix)."""
    for it in range(tiles):
        if not mine(it):
            continue
        s = it % ring.stages
        if double_wait and it >= ring.stages:
            yield ring.ready[s], ((it // ring.stages) & 1) ^ 1
        yield ring.ready[s], (it // ring.stages) & 1
        if ring.holds[s] != it:
            ring.errors.append(f"{name} passed its wait for tile {it} while slot {s} held {ring.holds[s]}")
        (release or (lambda r, slot: r.empty[slot].arrive()))(ring, s)


def run(rings, agents, seed: int) -> str:
    """Interleaves the agents and the landing of loads (of any of ``rings``, a Ring or a list) at random; 'ok',
    'early' or 'deadlock'."""
    rings = rings if isinstance(rings, list) else [rings]
    rng = random.Random(seed)
    waiting = {a: next(a, None) for a in agents}  # agent -> (barrier, parity) it waits on
    live = list(agents)
    while True:
        live = [a for a in live if waiting[a] is not None]
        runnable = [a for a in live if waiting[a][0].passes(waiting[a][1])]
        flights = [(r, i) for r in rings for i in range(len(r.in_flight))]
        if not runnable and not flights:
            early = any(r.errors for r in rings)
            return "deadlock" if live else ("early" if early else "ok")
        if flights and (not runnable or rng.random() < 0.5):
            r, i = rng.choice(flights)  # any load may land first
            slot, item = r.in_flight.pop(i)
            r.holds[slot] = item
            r.ready[slot].landed(1)
        else:
            a = rng.choice(runnable)
            waiting[a] = next(a, None)


def proj_bwd_protocol(stages: int, mixers: int, tiles: int) -> tuple[Ring, list]:
    """kernels/gluon_proj_bwd.py: every dx warpgroup and the dphi warpgroup take every tile (empty: mixers + 1)."""
    ring = Ring(stages, mixers + 1)
    agents = [loader(ring, tiles)] + [consumer(ring, f"dx{w}", lambda it: True, tiles) for w in range(mixers)]
    return ring, agents + [consumer(ring, "dphi", lambda it: True, tiles)]


def dphi_agent(ring: Ring, mixed: list, tiles: int):
    """kernels/gluon_step_bwd.py's dphi warpgroup: every tile in order, once its mixer has handed it over on
    ``mixed``; then it frees the slot (its half of ``empty``)."""
    for it in range(tiles):
        s = it % ring.stages
        yield mixed[s], (it // ring.stages) & 1
        ring.empty[s].arrive()


def alternate_protocol(stages: int, mixers: int, tiles: int, double_wait: bool = False) -> tuple[Ring, list]:
    """Consumers taking whole tiles in turn (kernels/gluon_step_bwd.py's mixers), each slot also read by one
    in-order warpgroup after its mixer (the dphi warpgroup, on the ``mixed`` barriers); empty: 2."""
    ring = Ring(stages, 2)
    mixed = [Barrier(1) for _ in range(stages)]

    def hand_over(r, s):
        mixed[s].arrive()
        r.empty[s].arrive()

    agents = [loader(ring, tiles), dphi_agent(ring, mixed, tiles)]
    agents += [consumer(ring, f"mixer{w}", (lambda it, w=w: it % mixers == w), tiles, hand_over, double_wait)
               for w in range(mixers)]
    return ring, agents


def free_held(ring: Ring, held) -> None:
    """STORE_LAG: free the slot of the tile a mixer held (``held``; None: none yet), which its TMA stores read until
    now, so the slot must still hold that tile."""
    if held is not None:
        s = held % ring.stages
        if ring.holds[s] != held:
            ring.errors.append(f"slot {s} held {ring.holds[s]} before tile {held} was freed")
        ring.empty[s].arrive()


def lagged_protocol(stages: int, mixers: int, tiles: int) -> tuple[Ring, list]:
    """``alternate_protocol`` with STORE_LAG (kernels/gluon_step_bwd.py): a mixer hands a tile to the dphi warpgroup
    at once but frees its slot only after it has taken its next tile (its TMA stores read the slot until then, so
    the slot must still hold that tile), and frees its last tile's slot at the end."""
    ring = Ring(stages, 2)
    mixed = [Barrier(1) for _ in range(stages)]

    def mixer(w):
        held = None
        for it in range(w, tiles, mixers):
            s = it % stages
            yield from take(ring, f"mixer{w}", it)
            mixed[s].arrive()
            free_held(ring, held)
            held = it
        free_held(ring, held)

    return ring, [loader(ring, tiles), dphi_agent(ring, mixed, tiles)] + [mixer(w) for w in range(mixers)]


def x_dphi_protocol(stages: int, mixers: int, tiles: int, lag: bool, wait_mixed: bool = True) -> tuple[Ring, list]:
    """X_DPHI (kernels/gluon_step_bwd.py): the dphi warpgroup waits on ``ready`` itself, mixes the tile's X_i into
    slot s of X's own ring and hands them to the tile's mixer on ``mixed``; the mixer waits on ``ready``, then on
    ``mixed``, and reads X_i there (freeing its slot a tile late with ``lag``, STORE_LAG). X's ring must still hold
    the mixer's tile when it reads it. ``wait_mixed`` off: the mixer skips its ``mixed`` wait (a broken build)."""
    ring = Ring(stages, 2)
    mixed = [Barrier(1) for _ in range(stages)]
    x_ring = [None] * stages  # the tile whose X_i slot s of X's ring holds

    def dphi():
        for it in range(tiles):
            s = it % stages
            yield from take(ring, "dphi", it)
            x_ring[s] = it
            mixed[s].arrive()
            ring.empty[s].arrive()  # its wgmmas have read X_i (they were waited on)

    def mixer(w):
        held = None
        for it in range(w, tiles, mixers):
            s = it % stages
            yield ring.ready[s], (it // stages) & 1
            if wait_mixed:
                yield mixed[s], (it // stages) & 1
            if ring.holds[s] != it or x_ring[s] != it:
                ring.errors.append(f"mixer{w} read tile {it} while slot {s} held {ring.holds[s]} and X's slot "
                                   f"{x_ring[s]}")
            if not lag:
                ring.empty[s].arrive()
                continue
            free_held(ring, held)
            held = it
        free_held(ring, held)

    return ring, [loader(ring, tiles), dphi()] + [mixer(w) for w in range(mixers)]


def first_build_protocol(stages: int, mixers: int, tiles: int) -> tuple[Ring, list]:
    """gluon_proj_bwd's first build: dx warpgroups taking whole tiles in turn and the dphi warpgroup every tile, all
    on ``ready``; empty: 2 (the tile's dx warpgroup and the dphi warpgroup)."""
    ring = Ring(stages, 2)
    agents = [loader(ring, tiles), consumer(ring, "dphi", lambda it: True, tiles)]
    return ring, agents + [consumer(ring, f"dx{w}", (lambda it, w=w: it % mixers == w), tiles) for w in range(mixers)]


def post_res_proj_protocol(stages: int, wstages: int, consumers: int, slots: int) -> tuple[list, list]:
    """kernels/gluon_post_res_proj.py's two rings. Stream slots: every compute warpgroup takes its chunks of every
    slot (empty: consumers). phi's slots, one chunk each: chunk g belongs to warpgroup g % consumers (SUBS, the chunks
    a slot, is a multiple of the consumers) and is released by it alone (empty: 1). One loader fills both: a stream
    slot, then its chunks' phi slots."""
    subs = 2 * consumers
    xr, wr = Ring(stages, consumers), Ring(wstages, 1)

    def load():
        for it in range(slots):
            s = it % stages
            if it >= stages:
                yield xr.empty[s], ((it // stages) & 1) ^ 1
            xr.ready[s].arrive(expect_tx=1)
            xr.in_flight.append((s, it))
            for u in range(subs):
                g = it * subs + u
                q = g % wstages
                if g >= wstages:
                    yield wr.empty[q], ((g // wstages) & 1) ^ 1
                wr.ready[q].arrive(expect_tx=1)
                wr.in_flight.append((q, g))

    def compute(w):
        for it in range(slots):
            s = it % stages
            yield xr.ready[s], (it // stages) & 1
            if xr.holds[s] != it:
                xr.errors.append(f"warpgroup {w} passed stream slot {s} for {it} while it held {xr.holds[s]}")
            for v in range(subs // consumers):
                g = it * subs + v * consumers + w
                q = g % wstages
                if v == subs // consumers - 1:
                    xr.empty[s].arrive()
                yield wr.ready[q], (g // wstages) & 1
                if wr.holds[q] != g:
                    wr.errors.append(f"warpgroup {w} passed phi slot {q} for chunk {g} while it held {wr.holds[q]}")
                wr.empty[q].arrive()

    return [xr, wr], [load()] + [compute(w) for w in range(consumers)]


def proj_fwd_protocol(stages: int, tiles: int) -> tuple[Ring, list]:
    """kernels/gluon_proj.py: one compute partition takes every slot, and releases a slot only once it has waited
    for the next one (the slot's wgmmas stay in flight meanwhile); the last slot is never released. A slot must
    still hold its tile when it is released: its wgmmas read it until then."""
    ring = Ring(stages, 1)

    def compute():
        for it in range(tiles):
            yield from take(ring, "compute", it)
            if it > 0:
                prev = (it - 1) % stages
                if ring.holds[prev] != it - 1:
                    ring.errors.append(f"slot {prev} held {ring.holds[prev]} before tile {it - 1} was released")
                ring.empty[prev].arrive()

    return ring, [loader(ring, tiles), compute()]


def outcomes(make, seeds: int = 300) -> set:
    out = set()
    for seed in range(seeds):
        ring, agents = make()
        out.add(run(ring, agents, seed))
    return out


@pytest.mark.parametrize("stages,mixers", [(2, 1), (2, 2), (3, 1), (3, 2), (4, 2), (4, 1)])
def test_proj_bwd_ring_never_passes_early_or_deadlocks(stages, mixers):
    # (2, 1) and (2, 2): the H100's ring (triton_config.PROJ_BWD_BY_DEVICE), without and with acc
    assert outcomes(lambda: proj_bwd_protocol(stages, mixers, 24)) == {"ok"}


def test_proj_bwd_kernel_uses_the_modelled_protocol():
    # the kernel's slot counts: three with dout and acc, four otherwise; its dx warpgroups: 1 or 2 (FusedBwdCfg)
    assert gp.stages_for(True, True) == 3 and gp.stages_for(True, False) == 4 and gp.stages_for(False, False) == 4


def test_tiles_in_turn_on_an_odd_ring_pass_early():
    """The model catches the bug: two consumers taking tiles in turn on three slots read a slot too early."""
    assert "early" in outcomes(lambda: alternate_protocol(3, 2, 24))


def test_the_first_proj_bwd_build_can_hang():
    """What the H200 run showed (a hang at 512 tiles a program): early passes release slots early, and the
    barrier counts then no longer line up."""
    assert {"early", "deadlock"} <= outcomes(lambda: first_build_protocol(3, 2, 64))


def test_waiting_for_the_previous_phase_first_deadlocks():
    assert "deadlock" in outcomes(lambda: alternate_protocol(3, 2, 24, double_wait=True))


@pytest.mark.parametrize("stages", [2, 4])
def test_tiles_in_turn_on_an_even_ring_are_safe(stages):
    assert outcomes(lambda: alternate_protocol(stages, 2, 24)) == {"ok"}


@pytest.mark.parametrize("consumers", [1, 2])
def test_post_res_proj_rings_are_safe(consumers):
    """kernels/gluon_post_res_proj.py's rings as ``plan`` sizes them; with an odd phi ring for two warpgroups the
    model finds early passes (so it can fail here too)."""
    for n, c in ((1, 512), (4, 4096), (4, 7168)):
        subs, stages, wstages = gpr.plan(n, c, 64, 32, 32, 2, 0, 0, consumers)
        assert subs % consumers == 0 and wstages % consumers == 0
        assert outcomes(lambda: post_res_proj_protocol(stages, wstages, consumers, 16), seeds=100) == {"ok"}
    if consumers == 2:
        assert outcomes(lambda: post_res_proj_protocol(2, 3, 2, 16)) - {"ok"}


@pytest.mark.parametrize("n", [1, 2, 4])
def test_step_bwd_rings_are_even_for_two_mixers(n):
    """kernels/gluon_step_bwd.py's mixers take tiles in turn: with two, its ring has an even number of slots."""
    for mixers in (1, 2):
        st = gs.stages_for(n, mixers=mixers)
        assert st is not None and st % mixers == 0
        assert outcomes(lambda: alternate_protocol(st, mixers, 24), seeds=100) == {"ok"}
    with pytest.raises(ValueError, match="even"):
        gs.stages_for(n, 3, mixers=2)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_proj_fwd_ring_with_a_deferred_release_is_safe(stages):
    assert outcomes(lambda: proj_fwd_protocol(stages, 25)) == {"ok"}


def test_proj_fwd_ring_of_one_slot_deadlocks_and_plan_never_gives_one():
    """The deferred release needs two slots: with one, the compute partition waits for a tile the loader cannot
    load until that very slot is released."""
    assert outcomes(lambda: proj_fwd_protocol(1, 5), seeds=20) == {"deadlock"}
    assert gpf.plan(4 * 4096, 128, 32, 2, 1) is None and gpf.plan(4 * 4096, 128, 32, 2, 0)[1] >= 2


@pytest.mark.parametrize("stages,mixers", [(2, 1), (3, 1), (4, 1), (4, 2), (6, 2)])
def test_step_bwd_ring_freeing_slots_a_tile_late_is_safe(stages, mixers):
    """STORE_LAG never lets a wait pass early or deadlock where the ring has more slots than mixers."""
    assert outcomes(lambda: lagged_protocol(stages, mixers, 24), seeds=150) == {"ok"}


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("x_tiles", [None, 1])
def test_step_bwd_ring_with_x_mixed_by_the_dphi_warpgroup_is_safe(n, x_tiles):
    """X_DPHI on the rings ``stages_for`` gives it (one mixer; two, in turn, on an even ring), the slot lag where
    ``stores_lag`` turns it on: no early pass, no deadlock, and X's ring always holds the tile its mixer reads."""
    for mixers in (1, 2):
        st = gs.stages_for(n, mixers=mixers, x_tiles=x_tiles, x_dphi=True)
        assert st is not None and st % mixers == 0
        lag = gs.stores_lag(True, st, mixers)
        assert outcomes(lambda: x_dphi_protocol(st, mixers, 24, lag), seeds=150) == {"ok"}


def test_x_mixed_by_the_dphi_warpgroup_needs_the_mixers_wait_and_orders_the_mixers():
    """The model can fail here too: a mixer that does not wait on ``mixed`` reads X's slot before the dphi
    warpgroup has mixed its tile. And the in-order hand-off orders mixers taking tiles in turn: before a mixer takes
    tile it, the dphi warpgroup has mixed its previous one, it - 2, so tile it - 3 had landed, and a parity wait
    cannot pass on an older phase even on three slots (``stages_for`` keeps the ring even all the same)."""
    assert "early" in outcomes(lambda: x_dphi_protocol(3, 1, 24, True, wait_mixed=False))
    assert outcomes(lambda: x_dphi_protocol(3, 2, 24, False), seeds=300) == {"ok"}


def test_freeing_slots_a_tile_late_deadlocks_with_a_slot_a_mixer_and_is_never_on_there():
    """With as many slots as mixers a mixer's next tile lands in the slot it still holds: a deadlock (so the model
    can fail); ``stores_lag`` turns the lag on only where it leaves the loader a slot to run ahead, which excludes
    that ring (and the boundary's two slots, where the lag ran 22 % slower, session 51)."""
    assert outcomes(lambda: lagged_protocol(2, 2, 24), seeds=50) == {"deadlock"}
    for mixers in (1, 2):
        for stages in range(mixers, 9, mixers):  # rings for mixers in turn: a multiple of theirs (stages_for)
            if gs.stores_lag(True, stages, mixers):
                assert stages > mixers and outcomes(lambda: lagged_protocol(stages, mixers, 16), seeds=30) == {"ok"}
