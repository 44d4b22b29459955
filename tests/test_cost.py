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
