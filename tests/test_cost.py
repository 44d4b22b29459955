"""The sympy cost model: its counts match the kernel plan of DESIGN.md and its L_r minimiser the rule."""

import math

import pytest
import sympy

from mhc_compile import cost


def test_byte_counts_match_the_design_table_at_n4():
    at4 = {cost.n: 4}
    assert cost.UNFUSED.forward.subs(at4) == 18 and cost.UNFUSED.backward.subs(at4) == 39  # paper split
    assert cost.FUSED.forward.subs(at4) == 14  # (3n + 2) C: post_res(l) with proj(l+1)
    assert cost.FUSED.backward.subs(at4) == 21  # one owner of each stream's gradient


def test_default_path_counts_match_session37s_profile():
    """DEFAULT, session 37's default path (fuse off, fold_stream_grads and fold_pre_recompute on; fold_boundary_grads
    came in session 41) at n = 4: 18 forward, 32 backward, 10 a recomputed site (post_res's 9
    and the sublayer input its backward writes). Session 37's d = 7168 step (8 sites, 5 of them re-running
    post_res, every one writing its input) moved 53.2 GB in its mHC kernels: 453 elements of C x 8192 tokens x 2
    bytes, between the model's bounds of no site and every site recomputed."""
    at4 = {cost.n: 4}
    d = cost.DEFAULT
    assert (d.forward.subs(at4), d.backward.subs(at4), d.recompute.subs(at4)) == (18, 32, 10)
    units = 8 * (d.forward + d.backward + 1).subs(at4) + 5 * (d.recompute - 1).subs(at4)
    assert units == 453 and units * 7168 * 8192 * 2 / 1e9 == pytest.approx(53.2, abs=0.05)
    assert 8 * d.total(recompute=False).subs(at4) < units < 8 * d.total().subs(at4)


def test_chain_ends_count_what_the_head_and_tail_kernels_move():
    """At n = 4, against DEFAULT's 50 for the head site and post_res's 9 at the tail: the head forward 9 (its stream
    one row a token), backward 14 with collapse_head_grad (post_res 8, pre_backward_dh 2, the collapsed op 4; the
    kernel table's rows 'post_res (head)' and 'head') or 28 without (11 + 2 + 10 and the expand's sum 5), the tail 6
    with collapse_tail or 14 (post_res 9 and the mean 5)."""
    at = lambda e, k=4: int(e.subs({cost.n: k}))  # noqa: E731
    off = dict(fold_boundary_grads=False)
    assert at(cost.chain_ends(**off)) == 9 + 14 - 50 + 6 - 9 == -30
    assert at(cost.chain_ends(collapse_head_grad=False, **off)) == 9 + 28 - 50 + 6 - 9
    assert at(cost.chain_ends(collapse_tail=False, **off)) == 9 + 14 - 50 + 14 - 9
    assert at(cost.chain_ends(**off), k=1) == 0  # one stream: nothing is broadcast or collapsed
    # fold_boundary_grads (the default): the per-site count is 42, and the head's and the last site's post_res
    # backwards, which no boundary folds, move their 8 more: 9 + 14 - 42 + 6 - 9 + 8
    assert at(cost.chain_ends()) == -14
    # a chain of L sites folds L - 2 boundaries: L * 42 - 14 == L * 50 - 30 - (L - 2) * 8
    for sites in (2, 8, 48):
        assert sites * at(cost.traffic(False).forward + cost.traffic(False).backward) + at(cost.chain_ends()) == (
            sites * 50 - 30 - (sites - 2) * 8)


def test_traffic_follows_the_configuration():
    """fuse -> FUSED; unfused with both backward folds (the defaults) -> DEFAULT; with neither -> the paper's split;
    explain's line names the design and its counts (the default path at n = 4, C = 1024, bf16: 60 - 3 = 57 C)."""
    at4 = {cost.n: 4}
    assert cost.traffic(True) == cost.FUSED and cost.traffic(False, fold_boundary_grads=False) == cost.DEFAULT
    assert cost.traffic(False, fold_stream_grads=False, fold_pre_recompute=False) == cost.UNFUSED
    mixed = cost.traffic(False, fold_stream_grads=True, fold_pre_recompute=False, fold_boundary_grads=False)
    assert (mixed.backward.subs(at4), mixed.recompute.subs(at4)) == (32, 14)
    line = cost.summary(4, 1024, 2, fused=False, fold_boundary_grads=False)
    assert line.startswith("bookkeeping traffic per site and token (unfused, fold_stream_grads, fold_pre_recompute,")
    assert "forward 18C, backward 32C, recompute 10C; 114.0 KiB" in line
    # fold_boundary_grads (the default): the boundary's stream gradient (n rows written, read back) gone, 8 C at n = 4
    assert cost.traffic(False).backward.subs(at4) == 24
    assert cost.traffic(False, fold_stream_grads=False, fold_pre_recompute=False) == cost.UNFUSED  # nothing to fold
    line = cost.summary(4, 1024, 2, fused=False)
    assert "fold_pre_recompute, fold_boundary_grads," in line and "backward 24C" in line


def test_site_bytes_is_per_token_linear():
    expr = cost.site_bytes(fused=True, recompute=False)
    assert sympy.expand(expr.subs(cost.T, 2 * cost.T) - 2 * expr) == 0
    assert cost.evaluate(expr, T=1, n=4, C=1, s=2) == 2 * (14 + 21 - 3)


@pytest.mark.parametrize("n, sites", [(4, 8), (4, 48), (1, 9), (16, 3)])
def test_optimal_block_size_is_the_closed_form_minimiser(n, sites):
    got = cost.optimal_block_size(n, sites)
    assert got == pytest.approx(math.sqrt(n * sites / (n + 2)))
    mem = sympy.lambdify(cost.L_r, cost.memory.subs({cost.n: n, cost.L: sites, cost.C: 1}))
    assert mem(got) <= min(mem(got * 0.9), mem(got * 1.1))


def _compositions(total):
    """Every way to cut ``total`` sites into contiguous blocks (sizes in order)."""
    if total == 0:
        yield []
        return
    for first in range(1, total + 1):
        for rest in _compositions(total - first):
            yield [first, *rest]


@pytest.mark.parametrize("sites, n, act, wgrad", [(8, 4, 8.7, 0.0), (8, 4, 8.1, 5.25), (9, 4, 3.0, 1.0),
                                                   (7, 2, 20.0, 0.0), (10, 8, 1.5, 3.0), (6, 16, 0.5, 0.0)])
def test_block_schedule_minimises_the_modelled_peak(sites, n, act, wgrad):
    """The dynamic programmes against every partition of the chain: the same minimal peak; among the partitions
    reaching it, the least summed block moments, then the most blocks."""
    got = cost.block_schedule(sites, n, act, wgrad)
    assert sum(got) == sites and all(size >= 1 for size in got)
    moments = {tuple(c): cost.block_moments(c, n, act, wgrad) for c in _compositions(sites)}
    best = min(max(m) for m in moments.values())
    assert cost.block_peak(got, n, act, wgrad) == pytest.approx(best)
    tied = {c: m for c, m in moments.items() if max(m) <= best * (1 + 1e-9)}
    least = min(sum(m) for m in tied.values())
    assert sum(moments[tuple(got)]) == pytest.approx(least)
    assert len(got) == max(len(c) for c, m in tied.items() if sum(m) <= least * (1 + 1e-9))


def test_block_peak_counts_activations_gradients_checkpoints_and_recomputed_streams():
    # 8 sites, n = 4, 8.7 units a site: uniform blocks of 2 peak at the last block (all activations alive,
    # 3 stored inputs, its inner stream and the recomputed tail) = 69.6 + 4 * (3 + 1 + 1)
    assert cost.block_peak([2, 2, 2, 2], 4, 8.7) == pytest.approx(89.6)
    assert cost.block_peak([8], 4, 8.7) == pytest.approx(69.6 + 4 * 9)  # every stream recomputed at once
    assert cost.block_peak([5, 2, 1], 4, 8.7) == pytest.approx(81.6)
    # d = 7168 on the benchmark stack (8.1 activations, 6 d / T = 5.25 units of weight gradients a site): the
    # first block of 5 is the peak (5 sites' activations, 3 sites' weight gradients, 5 recomputed streams and
    # the gradient entering it), as memory_peak.py saw; [4, 3, 1] peaks lower, as measured
    assert cost.block_moments([5, 2, 1], 4, 8.1, 5.25) == pytest.approx([80.25, 73.95, 76.8])
    assert cost.block_peak([4, 3, 1], 4, 8.1, 5.25) == pytest.approx(77.95)
    assert cost.block_schedule(8, 4, 8.1, 5.25) == [4, 3, 1]
    # d = 2048 (1.5 units of weight gradients a site): [4, 3, 1] as well; session 18 measured the plan that the
    # model without block 1's extra stream would pick, [6, 2], at +22.5 % activation memory against +16.7 %
    assert cost.block_schedule(8, 4, 8.1, 1.5) == [4, 3, 1]
