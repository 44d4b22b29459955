"""One compiled graph, many module instances: each instance trains its own mHC parameters.

Dynamo reuses a graph for every instance whose guards pass (the modules' parameters are graph inputs):
a block's frame compiled after a graph break serves every layer, a block compiled on its own
(``layer.compile``) serves every layer, and a second model of the same class meets the first one's
cache entry. The oracle compiles each block on its own from an empty Dynamo cache, so every graph is
built for, and bound to, the one layer it runs.
"""

from __future__ import annotations

import warnings

import torch

import mhc_compile
from mhc_compile.backend import REPORTS
from models import NanoGPT, perturb_mhc, rel_err

AOT = {"inner_backend": "aot_eager"}


def _idx():
    return torch.randint(0, 64, (2, 8))


def _frame_compiles(name: str) -> int:
    return sum(1 for r in REPORTS if any(s.startswith(name) for s in r.sites))


def _by_name(model):
    return {n: p for n, p in model.named_parameters()}


def _blocks_one_by_one(model, idx, *, fresh_each: bool):
    """NanoGPT.forward with each block compiled on its own (as torchtitan compiles its blocks);
    ``fresh_each`` empties Dynamo's cache before each block, so no graph is reused (the oracle)."""
    x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
    for block in model.h:
        if fresh_each:
            torch._dynamo.reset()
        x = torch.compile(block, backend="mhc", options=AOT)(x)
    return model.lm_head(model.ln_f(x))


def _check_against_oracle(model, run, oracle, idx):
    mhc_compile.prepare(model, idx, **AOT)
    perturb_mhc(model, scale=0.5)  # every layer's mixing differs, so borrowing another layer's shows

    torch._dynamo.reset()
    compiles = len(REPORTS)
    want = oracle(model, idx)
    want.square().mean().backward()
    assert len([r for r in REPORTS[compiles:] if r.sites]) == len(model.h)  # the oracle: a graph per layer
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiles = len(REPORTS)
    out = run(model, idx)
    out.square().mean().backward()
    assert len([r for r in REPORTS[compiles:] if r.sites]) < len(model.h)  # one graph served several layers
    assert rel_err(out, want) <= 1e-5
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want_grads)
    for name, g in want_grads.items():
        assert rel_err(got[name], g) <= 1e-5, name


def test_a_block_frame_shared_by_every_layer_binds_each_layers_sites(quiet):
    model = NanoGPT(layers=3, break_every_block_end=True)
    run = lambda m, i: torch.compile(m, backend="mhc", options=AOT)(i)  # noqa: E731
    _check_against_oracle(model, run, lambda m, i: _blocks_one_by_one(m, i, fresh_each=True), _idx())
    assert {p.rpartition(".")[0] for p in _by_name(model) if ".mhc_" in p} == {
        f"h.{k}.mhc_{s}" for k in range(3) for s in ("attn", "mlp")}


def test_blocks_compiled_one_by_one_bind_each_layers_sites(quiet):
    model = NanoGPT(layers=3)
    _check_against_oracle(model, lambda m, i: _blocks_one_by_one(m, i, fresh_each=False),
                          lambda m, i: _blocks_one_by_one(m, i, fresh_each=True), _idx())


def test_prepare_creates_the_sites_of_every_layer_a_shared_frame_runs_for():
    model = NanoGPT(layers=3, break_every_block_end=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mhc_compile.prepare(model, _idx(), **AOT)
        names = {p.rpartition(".")[0] for p in _by_name(model) if ".mhc_" in p}
        assert names == {f"h.{k}.mhc_{s}" for k in range(3) for s in ("attn", "mlp")}
        torch.compile(model, backend="mhc", options=AOT)(_idx()).sum().backward()
    assert not [w for w in caught if "created" in str(w.message)]  # nothing left to create lazily
    assert all(p.grad is not None for p in mhc_compile.mhc_parameters(model))


def test_two_models_of_one_class_never_share_mhc_parameters(quiet):
    a, b = NanoGPT(layers=2), NanoGPT(layers=2)
    idx = _idx()
    torch.compile(a, backend="mhc", options=AOT)(idx)
    compiled_b = torch.compile(b, backend="mhc", options=AOT)
    before = compiled_b(idx).detach()
    assert len(mhc_compile.mhc_parameters(b)) == len(mhc_compile.mhc_parameters(a)) == 12
    perturb_mhc(a, scale=0.5)
    assert torch.equal(compiled_b(idx), before)  # a's parameters do not reach b
    perturb_mhc(b, scale=0.5)
    assert rel_err(compiled_b(idx), before) > 1e-3  # b's own do


def test_a_shared_frame_is_compiled_once_not_per_layer(quiet):
    model = NanoGPT(layers=4, break_every_block_end=True)
    first = len(REPORTS)
    torch.compile(model, backend="mhc", options=AOT)(_idx())
    graphs_with_sites = [r for r in REPORTS[first:] if r.sites]
    assert len(graphs_with_sites) <= 2, [r.sites for r in graphs_with_sites]  # not one per layer
