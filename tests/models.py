"""Small models written in the tests (no downloads): a nanoGPT-style GPT and a hand-written eager mHC."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, parallel: bool = False, graph_break: bool | str = False,
                 flat_mlp: bool = False):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = CausalSelfAttention(d, heads), MLP(d)
        self.parallel, self.graph_break, self.flat_mlp = parallel, graph_break, flat_mlp

    def forward(self, x):
        if self.parallel:
            return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x))
        if self.graph_break is True:
            torch._dynamo.graph_break()
        if self.flat_mlp:  # as OPT's decoder layer: the MLP site on [B*T, C], then back to [B, T, C]
            shape = x.shape
            x = x.reshape(-1, x.size(-1))
            return (x + self.mlp(self.ln_2(x))).view(shape)
        x = x + self.mlp(self.ln_2(x))
        if self.graph_break == "end":  # Dynamo then compiles the block's frame once for every layer
            torch._dynamo.graph_break()
        return x


class NanoGPT(nn.Module):
    def __init__(self, vocab=64, d=32, heads=2, layers=2, block=16, parallel=False, break_at=None,
                 break_every_block_end=False, flat_mlp=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(
            Block(d, heads, parallel, graph_break="end" if break_every_block_end else (i == break_at),
                  flat_mlp=flat_mlp)
            for i in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --- a hand-written eager mHC NanoGPT: the oracle for the compiled rewrite ----------------------------
# Written from DESIGN.md section 2 directly (no mhc_compile code), so a shared bug cannot hide.


def _sinkhorn(logits, iters):
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


def eager_mhc_coeffs(X, site, iters=20, eps=1e-6, mode="mhc"):
    """H_pre [.., n], H_post [.., n], H_res [.., n, n] of one site for streams X [.., n, C]."""
    n = X.shape[-2]
    x = X.flatten(-2).to(site.phi.dtype)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    z = (x @ site.phi) * r
    if mode == "hc":
        z = torch.tanh(z)
    a, b = site.alpha, site.bias
    pre = a[0] * z[..., :n] + b[:n]
    post = a[1] * z[..., n : 2 * n] + b[n : 2 * n]
    res = (a[2] * z[..., 2 * n :] + b[2 * n :]).unflatten(-1, (n, n))
    if mode == "hc":
        return pre, post, res
    return torch.sigmoid(pre), 2 * torch.sigmoid(post), _sinkhorn(res, iters)


def eager_mhc_site(X, site, f, capture=None, **kw):
    h_pre, h_post, h_res = eager_mhc_coeffs(X, site, **kw)
    x_in = (h_pre.unsqueeze(-1) * X).sum(-2)
    y = f(x_in)
    if capture is not None:
        capture.append({"X": X.detach(), "h_res": h_res.detach(), "h_pre": h_pre.detach(), "h_post": h_post.detach()})
    return torch.einsum("...ij,...jc->...ic", h_res, X) + h_post.unsqueeze(-1) * y.unsqueeze(-2)


def eager_mhc_nanogpt(model: NanoGPT, idx, n: int, capture=None, **kw):
    """NanoGPT (sequential pre-norm blocks) with mHC, using the model's own mhc_attn / mhc_mlp sites."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = model.wte(idx) + model.wpe(pos)
    X = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
    for block in model.h:
        X = eager_mhc_site(X, block.mhc_attn, lambda v: block.attn(block.ln_1(v)), capture, **kw)
        X = eager_mhc_site(X, block.mhc_mlp, lambda v: block.mlp(block.ln_2(v)), capture, **kw)
    return model.lm_head(model.ln_f(X.mean(-2)))


# --- helpers shared by the test modules ---------------------------------------------------------------


def output_tensor(out):
    """The tensor of a model output: a tensor itself, or an HF output's logits / last_hidden_state."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(type(out))


def rel_err(a, b):
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb_mhc(model, scale=0.3):
    """Move the mHC parameters off their init (phi != 0, alpha != 0.01), so a converted model computes
    something else than the original and gradients see every term."""
    import mhc_compile

    with torch.no_grad():
        for p in mhc_compile.mhc_parameters(model):
            p.add_(scale * torch.randn_like(p))


def compiled_nanogpt_grads(options: dict, dtype) -> dict:
    """The parameter gradients (float64) of one step of a 2-layer NanoGPT (d = 32, n = 4, mHC parameters off their
    init) compiled with backend="mhc" and these options: what the backward-graph passes' end-to-end tests compare
    with a pass on and off."""
    import mhc_compile

    torch.manual_seed(0)
    model = NanoGPT(d=32, layers=2).to(dtype)
    idx = torch.randint(0, 64, (2, 16))
    mhc_compile.prepare(model, idx, n=4)
    perturb_mhc(model)  # mixing away from its identity-like init, where some coefficient gradients are 0
    compiled = torch.compile(model, backend="mhc", options={"n": 4, **options})
    compiled(idx).float().sum().backward()
    return {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}
