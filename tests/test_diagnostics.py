"""Signal-gain diagnostics (paper Fig. 3, 7, 8): gains of known matrices, HC vs mHC on a NanoGPT,
``collect`` against the hand-written eager oracle, and the plots."""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET

import pytest
import torch

import mhc_compile
from mhc_compile.diagnostics import (
    Diagnostics,
    amax_gain,
    collect,
    composite,
    composite_gains,
    plot_divergence,
    plot_gains,
    plot_h_res_heatmaps,
    stream_divergence,
)
from models import NanoGPT, eager_mhc_nanogpt

AOT = {"inner_backend": "aot_eager"}
D = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
SWAP = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- pure functions on known matrices ----------------------------------------------------------------


def test_amax_gain_of_known_matrices():
    fwd, bwd = amax_gain(D)
    assert (fwd.item(), bwd.item()) == (2.0, 2.0)
    # rows sum to [3, 1] -> forward 3; columns sum to [2, 2] -> backward 2
    fwd, bwd = amax_gain(_t([[2.0, 1.0], [0.0, 1.0]]))
    assert (fwd.item(), bwd.item()) == (3.0, 2.0)
    # absolute values: -2 counts as 2 (rows [3, 1], columns [1, 3])
    fwd, bwd = amax_gain(_t([[1.0, -2.0], [0.0, 1.0]]))
    assert (fwd.item(), bwd.item()) == (3.0, 3.0)
    # a column-heavy matrix: rows [1, 1, 1], columns [3, 0, 0]
    fwd, bwd = amax_gain(_t([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]]))
    assert (fwd.item(), bwd.item()) == (1.0, 3.0)
    # every permutation matrix has gain 1 both ways
    for perm in itertools.permutations(range(4)):
        fwd, bwd = amax_gain(torch.eye(4)[list(perm)])
        assert fwd.item() == bwd.item() == 1.0
    # leading dims are kept
    stacked = torch.stack([D, 3 * D, SWAP]).reshape(3, 1, 2, 2)
    fwd, bwd = amax_gain(stacked)
    assert fwd.shape == bwd.shape == (3, 1)
    assert fwd.flatten().tolist() == [2.0, 6.0, 1.0]
    with pytest.raises(ValueError, match="square"):
        amax_gain(torch.ones(2, 3))


def test_composite_order_and_gain_curves():
    a, b = _t([[1.0, 2.0], [0.0, 1.0]]), _t([[0.0, 1.0], [3.0, 0.0]])
    torch.testing.assert_close(composite([a, b]), b @ a)  # X_2 = H_1 H_0 X_0
    assert not torch.equal(b @ a, a @ b)
    # diag(2, 1) three times: gains double per site
    fwd, bwd = composite_gains([D, D, D])
    assert fwd.tolist() == bwd.tolist() == [2.0, 4.0, 8.0]
    # a swap between them makes the stretch land on the other stream: D P D = [[0, 2], [2, 0]]
    fwd, bwd = composite_gains([D, SWAP, D])
    assert fwd.tolist() == bwd.tolist() == [2.0, 2.0, 2.0]
    # permutations compose to a permutation: gain 1 at every depth
    perms = [torch.eye(3, dtype=torch.float64)[list(p)] for p in itertools.permutations(range(3))]
    fwd, bwd = composite_gains(perms)
    assert fwd.tolist() == bwd.tolist() == [1.0] * 6
    # per token, reduced with max over tokens (or mean, or kept)
    tokens = [torch.stack([torch.eye(2, dtype=torch.float64), D]) for _ in range(2)]  # token 1 grows
    fwd, _ = composite_gains(tokens)
    assert fwd.tolist() == [2.0, 4.0]
    fwd, _ = composite_gains(tokens, reduce="mean")
    assert fwd.tolist() == [1.5, 2.5]
    fwd, _ = composite_gains(tokens, reduce=None)
    assert fwd.tolist() == [[1.0, 2.0], [1.0, 4.0]]
    with pytest.raises(ValueError, match="same token shape"):
        composite([D, torch.stack([D, D])])


def _birkhoff(n, k, gen):
    """A random doubly stochastic matrix: a convex combination of k permutation matrices."""
    w = torch.rand(k, generator=gen, dtype=torch.float64)
    w = w / w.sum()
    perms = [torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)] for _ in range(k)]
    return sum(wi * p for wi, p in zip(w, perms))


def test_doubly_stochastic_matrices_and_their_products_have_gain_one():
    gen = torch.Generator().manual_seed(0)
    hs = [torch.stack([_birkhoff(4, 5, gen) for _ in range(3)]) for _ in range(12)]  # 12 sites, 3 tokens
    fwd, bwd = amax_gain(torch.stack(hs))
    torch.testing.assert_close(fwd, torch.ones_like(fwd), rtol=0, atol=1e-12)
    torch.testing.assert_close(bwd, torch.ones_like(bwd), rtol=0, atol=1e-12)
    fwd, bwd = composite_gains(hs)
    torch.testing.assert_close(fwd, torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(bwd, torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
    # and a non-stochastic perturbation of one site shows up from that depth on
    hs[5] = hs[5] * 1.5
    fwd, _ = composite_gains(hs)
    assert fwd[:5].max() < 1 + 1e-12 and fwd[5:].min() > 1.49


def test_stream_divergence_of_known_streams():
    a = torch.randn(2, 5, 1, 16)
    assert stream_divergence(torch.cat([a, a, a], dim=-2)).item() == 0.0
    # X = [a, -a]: ||2a|| / ||X||_F = 2|a| / (sqrt(2)|a|) = sqrt(2), for every token
    assert stream_divergence(torch.cat([a, -a], dim=-2)).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    # X = [a, 0]: |a| / |a| = 1
    assert stream_divergence(torch.cat([a, torch.zeros_like(a)], dim=-2)).item() == pytest.approx(1.0, rel=1e-6)


# --- collect on compiled NanoGPTs ---------------------------------------------------------------------


def _sites(model):
    return [name for name, m in model.named_modules() if isinstance(m, mhc_compile.MHCSite)]


def _perturb(model, bias_scale, phi_scale, alpha=None, seed=1):
    """Big random maps: bias ~ N(0, bias_scale), phi ~ N(0, phi_scale^2 / (nC)) so z ~ N(0, phi_scale^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in _sites(model):
            site = model.get_submodule(name)
            site.bias.add_(bias_scale * torch.randn(site.bias.shape, generator=gen, dtype=site.bias.dtype))
            site.phi.add_(phi_scale * torch.randn(site.phi.shape, generator=gen, dtype=site.phi.dtype)
                          / site.phi.shape[0] ** 0.5)
            if alpha is not None:
                site.alpha.fill_(alpha)


def _compiled(mode, layers=4, n=4, perturb=(3.0, 3.0, 1.0), **kw):
    model = NanoGPT(layers=layers, **kw)
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx, n=n, mode=mode)
    _perturb(model, *perturb)
    return model, idx, torch.compile(model, backend="mhc", options={"n": n, "mode": mode, **AOT})


def test_hc_composite_gain_explodes_while_mhc_stays_at_one(quiet):
    """The paper's Fig. 3 vs Fig. 7: the same big random maps, 8 sites, HC vs mHC."""
    hc = collect(_compiled("hc")[2], torch.randint(0, 64, (2, 8)))
    assert hc.depth == 8
    assert hc.composite_fwd[-1] > 10 and hc.composite_bwd[-1] > 10
    assert hc.site_fwd.min() > 1.5
    assert (hc.composite_fwd[1:] > hc.composite_fwd[:-1]).sum() >= 5  # grows with depth

    torch.manual_seed(0)
    mhc = collect(_compiled("mhc")[2], torch.randint(0, 64, (2, 8)))
    assert mhc.depth == 8
    # Sinkhorn ends on the row normalisation: row sums are 1 to rounding, so forward gain is 1 ...
    for g in (mhc.site_fwd, mhc.composite_fwd):
        torch.testing.assert_close(g, torch.ones_like(g), rtol=0, atol=1e-5)
    # ... while the columns are as close to 1 as 20 Sinkhorn iterations get on these large logits
    # (a few percent here; the paper's Fig. 7 shows the same small backward deviation). Column sums
    # average 1, so the max is >= 1, and a product of such matrices stays close too.
    for g in (mhc.site_bwd, mhc.composite_bwd):
        assert g.min() >= 1 - 1e-5 and g.max() < 1.1
    assert hc.composite_bwd[-1] > 100 * mhc.composite_bwd[-1]


def test_collect_matches_eager_oracle_and_names_the_sites(quiet):
    model, idx, compiled = _compiled("mhc", layers=3, n=3, perturb=(0.5, 0.5, None))
    diag = collect(compiled, idx)
    assert isinstance(diag, Diagnostics)
    assert diag.sites == _sites(model) == [f"h.{i}.mhc_{s}" for i in range(3) for s in ("attn", "mlp")]
    assert diag.n == 3 and diag.depth == 6 and diag.res_convention == "paper"

    oracle: list[dict] = []
    with torch.no_grad():
        eager_mhc_nanogpt(model, idx, n=3, capture=oracle)
    assert len(oracle) == diag.depth
    for k, want in enumerate(oracle):
        for key in ("h_pre", "h_post", "h_res"):
            torch.testing.assert_close(getattr(diag, key)[k], want[key], rtol=1e-5, atol=1e-6)
        assert diag.divergence[k].item() == pytest.approx(stream_divergence(want["X"]).item(), rel=1e-4, abs=1e-7)
    # the streams are equal at the head of the chain and apart afterwards (the per-site H_pre lean)
    assert diag.divergence[0].item() == 0.0 and diag.divergence[1:].min() > 0
    fwd, bwd = composite_gains([o["h_res"] for o in oracle])
    torch.testing.assert_close(diag.composite_fwd, fwd)
    torch.testing.assert_close(diag.composite_bwd, bwd)
    assert "h.2.mhc_mlp" in diag.summary()

    # A plain (prepared) module is traced instead; n and mode come from its sites. Same numbers.
    traced = collect(model, idx)
    assert traced.sites == diag.sites
    torch.testing.assert_close(traced.composite_bwd, diag.composite_bwd)
    # The transpose convention: the applied matrices are the transposes, fwd and bwd swap per site.
    transposed = collect(model, idx, options={"res_convention": "transpose"}, keep_streams=True)
    assert transposed.res_convention == "transpose"
    torch.testing.assert_close(transposed.h_res[2], diag.h_res[2].transpose(-1, -2))
    torch.testing.assert_close(transposed.site_fwd, diag.site_bwd)
    assert len(transposed.streams) == 6 and transposed.streams[0].shape == (2, 8, 3, 32)


def test_collect_follows_sites_across_a_graph_break(quiet):
    model, idx, compiled = _compiled("hc", layers=2, break_at=0)
    diag = collect(compiled, idx)
    assert diag.sites == _sites(model) == ["h.0.mhc_attn", "h.0.mhc_mlp", "h.1.mhc_attn", "h.1.mhc_mlp"]
    # the n streams cross the break (runtime/carry.py): what the same model records in one graph
    whole = NanoGPT(layers=2)
    mhc_compile.prepare(whole, idx, n=4, mode="hc")
    whole.load_state_dict(model.state_dict())
    one_graph = collect(torch.compile(whole, backend="mhc", options={"n": 4, "mode": "hc", **AOT}), idx)
    assert diag.divergence[1].item() > 0.1
    torch.testing.assert_close(diag.divergence, one_graph.divergence)
    torch.testing.assert_close(diag.composite_fwd, one_graph.composite_fwd)


def test_collect_without_mhc_sites_raises():
    with pytest.raises(RuntimeError, match="no mHC site ran"):
        collect(lambda x: x + 1, torch.ones(3))


# --- plots --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_plots_write_files_matplotlib_reads_back(mode, tmp_path, quiet):
    import matplotlib.image

    diag = collect(_compiled(mode, layers=2)[2], torch.randint(0, 64, (2, 8)))
    for fn in (plot_gains, plot_h_res_heatmaps, plot_divergence):
        png = fn(diag, tmp_path / f"{fn.__name__}.png")
        assert png == tmp_path / f"{fn.__name__}.png" and png.stat().st_size > 1000
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something was drawn
        svg = fn(diag, tmp_path / "sub" / f"{fn.__name__}.svg")
        assert ET.parse(svg).getroot().tag.endswith("svg")
    with pytest.raises(ValueError, match="must end in"):
        plot_gains(diag, tmp_path / "gains.txt")
