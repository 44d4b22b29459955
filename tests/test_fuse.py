"""The boundary-fusion pass: which ops it emits, and that fused == unfused (values and gradients, float64)."""

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile.backend import REPORTS
from models import NanoGPT, perturb_mhc

AOT = {"inner_backend": "aot_eager"}


def _mhc_ops(gm) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if getattr(node.target, "namespace", None) == "mhc_compile":
            name = node.target._opname
            counts[name] = counts.get(name, 0) + 1
    return counts


class PostNorm(nn.Module):
    """BERT-style: x = LayerNorm(x + f(x)); the LayerNorm between sites keeps them from fusing into a step."""

    def __init__(self, d=16, layers=2):
        super().__init__()
        self.f = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(layers))
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x):
        for f, ln in zip(self.f, self.ln):
            x = ln(x + f(x))
        return x


def _run(model, x, fuse, **options):
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="mhc", options={"fuse": fuse, **AOT, **options})
    out = compiled(x)
    (out.logsumexp(-1).mean() + 1e-3 * out.square().sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, _mhc_ops([r for r in REPORTS if r.sites][-1].gm)


def _same(model, x, **options):
    mhc_compile.prepare(model, x, **options)
    perturb_mhc(model)
    out_f, grads_f, ops_f = _run(model, x, True, **options)
    out_u, grads_u, ops_u = _run(model, x, False, **options)
    torch.testing.assert_close(out_f, out_u, rtol=1e-10, atol=1e-12)
    assert grads_f.keys() == grads_u.keys() and any("mhc" in k for k in grads_f)
    for k in grads_u:
        torch.testing.assert_close(grads_f[k], grads_u[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")
    return ops_f, ops_u


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_pre_norm_chain_becomes_enter_steps_and_one_post_res(mode, quiet):
    model = NanoGPT(layers=2).double()
    idx = torch.randint(0, 64, (2, 8))
    fused, unfused = _same(model, idx, n=3, mode=mode)
    # 4 sites in one chain: the head enters, the three later sites are steps, the tail stays a post_res.
    assert fused == {"enter": 1, "step": 3, "post_res": 1}, fused
    assert unfused == {"proj": 4, "coeffs": 4, "pre": 4, "post_res": 4}, unfused


def test_parallel_branches_and_transposed_res_convention(quiet):
    model = NanoGPT(layers=3, parallel=True).double()
    idx = torch.randint(0, 64, (2, 8))
    fused, _ = _same(model, idx, n=2, res_convention="transpose")
    assert fused == {"enter": 1, "step": 2, "post_res": 1}, fused


def test_post_norm_sites_enter_separately(quiet):
    model = PostNorm().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    fused, _ = _same(model, x, n=4)
    assert fused == {"enter": 2, "post_res": 2}, fused


def test_fuse_option_is_validated():
    with pytest.raises(ValueError, match="'fuse' must be a bool"):
        mhc_compile.MHCConfig(fuse="yes")


@pytest.mark.parametrize("fuse", [True, False])
def test_triton_kernels_end_to_end_match_reference(fuse, quiet):
    """kernels="triton" (interpreted here) through the whole backend: outputs and every gradient."""
    torch.manual_seed(0)
    model = NanoGPT(layers=1, d=16).double()
    idx = torch.randint(0, 64, (2, 5))
    mhc_compile.prepare(model, idx, n=3)
    perturb_mhc(model)
    want, want_g, _ = _run(model, idx, fuse, n=3, kernels="reference")
    got, got_g, ops = _run(model, idx, fuse, n=3, kernels="triton")
    assert ops == ({"enter": 1, "step": 1, "post_res": 1} if fuse else {"proj": 2, "coeffs": 2, "pre": 2, "post_res": 2})
    assert REPORTS[-1].impl == "triton"
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-8, atol=1e-12, msg=lambda m: f"{k}: {m}")
