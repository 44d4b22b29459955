"""Convergence: a few optimizer steps on a small GPT over real text (the stdlib's sources).

Checks what the issue asks of training: loss falls, the mHC parameters move, the n streams stop being
identical (symmetry broken by the init), and H_res stays doubly stochastic. Streams and H_res are read
from the hand-written eager mHC model (tests/models.py) with the trained weights; its outputs are
checked to match the compiled model first, so what it shows is what the compiled model computes.
"""

import pytest
import torch
import torch.nn.functional as F

import mhc_compile
from mhc_compile.demo import batches, stdlib_text
from models import NanoGPT, eager_mhc_nanogpt

N = 4


def _train(model, steps=25, lr=3e-3, seed=0):
    data = stdlib_text(300_000)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.zeros(8, 32, dtype=torch.long)
    mhc_compile.prepare(model, x0, n=N)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    step = torch.compile(model, backend="mhc", options={"n": N, "inner_backend": "aot_eager"})
    losses = []
    for _, (x, y) in zip(range(steps), batches(data, 8, 32, gen)):
        loss = F.cross_entropy(step(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, step, x


def _stream_spread(model, x):
    """max_i,j |X_i - X_j| / max |X| over every site's input streams (0 when all streams are equal)."""
    capture = []
    with torch.no_grad():
        eager_mhc_nanogpt(model, x, n=N, capture=capture)
    spreads = []
    for c in capture:
        X = c["X"]
        spreads.append(((X.unsqueeze(-2) - X.unsqueeze(-3)).abs().amax() / X.abs().amax()).item())
    return max(spreads), capture


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = NanoGPT(vocab=256, d=32, layers=2, block=32)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    losses, step, x = _train(model)
    return model, before, losses, step, x


def test_loss_falls(trained):
    _, _, losses, _, _ = trained
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_mhc_parameters_change(trained):
    model, before, *_ = trained
    names = [k for k, _ in model.named_parameters() if ".mhc_" in k]
    assert len(names) == 2 * 2 * 3
    for k, p in model.named_parameters():
        if ".mhc_" in k and k in before:
            assert not torch.equal(p.detach(), before[k]), f"{k} did not train"
    phis = [p for k, p in model.named_parameters() if k.endswith(".phi")]
    assert all(p.abs().max() > 0 for p in phis)


def test_eager_oracle_matches_compiled_after_training(trained):
    model, _, _, step, x = trained
    with torch.no_grad():
        torch.testing.assert_close(step(x), eager_mhc_nanogpt(model, x, n=N), rtol=1e-5, atol=1e-5)


def test_streams_diverge_and_h_res_stays_doubly_stochastic(trained):
    model, _, _, _, x = trained
    spread, capture = _stream_spread(model, x)
    assert spread > 1e-3, "streams stayed identical: symmetry not broken"
    for c in capture:
        h = c["h_res"]
        assert (h >= 0).all()
        assert (h.sum(-1) - 1).abs().max() < 1e-3
        assert (h.sum(-2) - 1).abs().max() < 1e-3


def test_symmetric_init_keeps_streams_identical():
    """Control: with a stream-symmetric init (uniform H_pre, uniform H_res) the streams never separate,
    which is why the default init leans each site on a different stream."""
    torch.manual_seed(0)
    model = NanoGPT(vocab=256, d=32, layers=2, block=32)
    mhc_compile.prepare(model, torch.zeros(8, 32, dtype=torch.long), n=N)
    with torch.no_grad():
        for site in (m for m in model.modules() if isinstance(m, mhc_compile.MHCSite)):
            site.bias[:N] = -torch.log(torch.tensor(N - 1.0))  # sigmoid = 1/N on every stream
            site.bias[2 * N :] = 0.0
    _, _, x = _train(model, steps=8)
    spread, _ = _stream_spread(model, x)
    assert spread < 1e-5
