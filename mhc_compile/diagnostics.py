"""Signal-gain diagnostics of the mHC paper (DeepSeek-AI 2025, Fig. 3, 7 and 8).

The residual mapping H_res of a site multiplies the n streams: ``X' = H_res X + H_post^T y``. Across a
stack of sites the residual path alone is the product ``H_{L-1} ... H_1 H_0``; if that product grows,
signals explode forward and gradients explode backward. The paper measures this with the *Amax gain
magnitude* of a matrix:

* forward gain  = max absolute row sum    (the infinity norm: the largest factor any output stream can
  receive from streams of unit size),
* backward gain = max absolute column sum (the 1-norm: the same for gradients, which flow through H^T).

Unconstrained Hyper-Connections (``mode="hc"``) let both grow without bound with depth; mHC projects
H_res onto doubly stochastic matrices (Sinkhorn), whose row and column sums are 1, so both gains stay at 1
for every site and for every product of sites.

Pure tensor functions (``amax_gain``, ``composite``, ``composite_gains``, ``stream_divergence``) work on
any matrices; ``collect`` runs an mHC model once under ``runtime.ops.capture_coefficients()`` and gathers
everything into a ``Diagnostics``; the ``plot_*`` functions draw it (matplotlib, imported only there).

Reductions over tokens: every per-site and composite gain is reduced over tokens (all leading dims) with
``max``, the worst token, as in the paper's Amax plots. Stream divergence is reduced with ``mean``.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Diagnostics",
    "amax_gain",
    "collect",
    "composite",
    "composite_gains",
    "plot_divergence",
    "plot_gains",
    "plot_h_res_heatmaps",
    "stream_divergence",
]


# ---------------------------------------------------------------------------------------------
# Gains of matrices and of their products
# ---------------------------------------------------------------------------------------------
def amax_gain(h: Tensor) -> tuple[Tensor, Tensor]:
    """Forward and backward Amax gain of matrices ``h`` of shape ``[..., n, n]``.

    Returns ``(fwd, bwd)``, each of shape ``h.shape[:-2]``: fwd = max_i sum_j |h[i, j]| (max absolute
    row sum), bwd = max_j sum_i |h[i, j]| (max absolute column sum).
    """
    if h.dim() < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"amax_gain expects square matrices [..., n, n], got shape {tuple(h.shape)}")
    a = h.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def _check_stack(h_list: Sequence[Tensor], what: str) -> None:
    if len(h_list) == 0:
        raise ValueError(f"{what} needs at least one matrix")
    shape = h_list[0].shape
    for k, h in enumerate(h_list):
        if h.shape != shape:
            raise ValueError(
                f"{what}: every site must have the same token shape; site 0 has {tuple(shape)}, "
                f"site {k} has {tuple(h.shape)}"
            )


def composite(h_list: Sequence[Tensor]) -> Tensor:
    """The composite residual mapping ``H_{L-1} @ ... @ H_1 @ H_0``, per token.

    ``h_list`` holds the per-site H_res in application order (``X_{k+1} = H_k X_k``), each ``[..., n, n]``
    with the same leading (token) dims. The product is taken in the promoted dtype of the inputs.
    """
    _check_stack(h_list, "composite")
    dtype = h_list[0].dtype
    for h in h_list[1:]:
        dtype = torch.promote_types(dtype, h.dtype)
    out = h_list[0].to(dtype)
    for h in h_list[1:]:
        out = h.to(dtype) @ out  # the later site acts on the output of the earlier ones: left-multiply
    return out


def composite_gains(h_list: Sequence[Tensor], reduce: str | None = "max") -> tuple[Tensor, Tensor]:
    """Gain vs depth: Amax gains of the prefix products ``P_k = H_k ... H_0`` for k = 0 .. L-1.

    Computed in float64 (unconstrained HC products can grow by orders of magnitude per site).
    ``reduce="max"`` (default) takes the worst token, giving two curves of shape ``[L]``; ``"mean"``
    averages over tokens; ``None`` keeps the tokens, giving ``[L, *leading]``.
    """
    _check_stack(h_list, "composite_gains")
    if reduce not in ("max", "mean", None):
        raise ValueError(f"composite_gains: reduce must be 'max', 'mean' or None, got {reduce!r}")
    fwd, bwd = [], []
    prod = None
    for h in h_list:
        h = h.detach().to(torch.float64)
        prod = h if prod is None else h @ prod
        f, b = amax_gain(prod)
        fwd.append(_reduce(f, reduce))
        bwd.append(_reduce(b, reduce))
    return torch.stack(fwd), torch.stack(bwd)


def _reduce(t: Tensor, reduce: str | None) -> Tensor:
    if reduce == "max":
        return t.amax()
    if reduce == "mean":
        return t.mean()
    return t


# ---------------------------------------------------------------------------------------------
# Stream divergence
# ---------------------------------------------------------------------------------------------
def stream_divergence(x: Tensor, eps: float = 1e-12) -> Tensor:
    """How far the n streams of ``x`` ([..., n, C]) have moved apart, averaged over tokens.

    Per token: ``max_{i,j} ||X_i - X_j|| / ||X||_F`` (0 when every stream is equal; at most sqrt(2)).
    Returns a scalar (float32 or wider): the mean over all tokens.
    """
    n = x.shape[-2]
    xt = x.detach().reshape(-1, n, x.shape[-1])
    xt = xt.to(torch.promote_types(xt.dtype, torch.float32))
    worst = xt.new_zeros(xt.shape[0])
    # One stream pair at a time: never materialise the [T, n, n, C] difference tensor.
    for i in range(n):
        for j in range(i + 1, n):
            worst = torch.maximum(worst, torch.linalg.vector_norm(xt[:, i] - xt[:, j], dim=-1))
    total = torch.linalg.vector_norm(xt.flatten(1), dim=-1)
    return (worst / total.clamp_min(eps)).mean()


# ---------------------------------------------------------------------------------------------
# Collecting from a model
# ---------------------------------------------------------------------------------------------
@dataclass
class Diagnostics:
    """What one forward call of an mHC model did, site by site (execution order).

    ``h_res`` holds the matrices as *applied* to the streams (already transposed under
    ``res_convention="transpose"``), so ``composite(h_res)`` is the model's residual path. The per-site
    lists keep the tokens' leading dims (e.g. ``[B, T, n, n]``). Gains are reduced over tokens with max,
    divergence with mean (see the module docstring). The streams cross a graph break inside a chain
    (runtime/carry.py), so the composite multiplies across it; where they do not (a channel-first chain, a
    stream changed between the graphs), the product still runs across the collapse there.
    """

    sites: list[str]
    h_pre: list[Tensor]
    h_post: list[Tensor]
    h_res: list[Tensor]
    site_fwd: Tensor           # [L] forward gain of each site's H_res (max over tokens)
    site_bwd: Tensor           # [L] backward gain of each site's H_res
    composite_fwd: Tensor      # [L] forward gain of H_k ... H_0 (max over tokens)
    composite_bwd: Tensor      # [L] backward gain of H_k ... H_0
    divergence: Tensor         # [L] stream divergence of each site's input X (mean over tokens)
    res_convention: str = "paper"
    streams: list[Tensor] | None = field(default=None, repr=False)  # the captured X, if kept

    @property
    def depth(self) -> int:
        return len(self.sites)

    @property
    def n(self) -> int:
        return self.h_res[0].shape[-1]

    def mean_h_res(self) -> Tensor:
        """Token-mean H_res of every site, ``[L, n, n]`` (the paper's Fig. 8 heatmaps)."""
        return torch.stack([h.reshape(-1, self.n, self.n).mean(0) for h in self.h_res])

    def mean_composite(self) -> Tensor:
        """Token-mean of the per-token composite ``H_{L-1} ... H_0``, ``[n, n]`` (float64)."""
        return composite([h.to(torch.float64) for h in self.h_res]).reshape(-1, self.n, self.n).mean(0)

    def summary(self) -> str:
        """A plain-text table: one row per site."""
        width = max(len("site"), *(len(s) for s in self.sites))
        lines = [f"{'site':<{width}}  {'fwd':>9}  {'bwd':>9}  {'comp fwd':>9}  {'comp bwd':>9}  {'diverg':>8}"]
        for k, s in enumerate(self.sites):
            lines.append(
                f"{s:<{width}}  {self.site_fwd[k].item():9.4g}  {self.site_bwd[k].item():9.4g}  "
                f"{self.composite_fwd[k].item():9.4g}  {self.composite_bwd[k].item():9.4g}  "
                f"{self.divergence[k].item():8.4g}"
            )
        return "\n".join(lines)


def _is_compiled(fn: Any) -> bool:
    """torch.compile(model) (an OptimizedModule), model.compile() (in place), or a compiled function."""
    if hasattr(fn, "_orig_mod"):
        return True
    if isinstance(fn, nn.Module):
        return getattr(fn, "_compiled_call_impl", None) is not None
    return True  # any other callable: run it as given (e.g. torch.compile(f) or a wrapper around it)


def _site_options(model: nn.Module, options: dict) -> dict:
    """Fill n and mode from the model's existing MHCSite modules, so prepare()'s options are reused."""
    from mhc_compile.runtime.params import MHCSite

    options = dict(options)
    site = next((m for m in model.modules() if isinstance(m, MHCSite)), None)
    if site is not None:
        options.setdefault("n", site.n)
        options.setdefault("mode", site.mode)
    return options


def collect(
    model_or_compiled_fn: Callable,
    *inputs: Any,
    options: dict | None = None,
    res_convention: str | None = None,
    keep_streams: bool = False,
) -> Diagnostics:
    """Run one forward call under ``capture_coefficients()`` and gather the diagnostics.

    * A compiled model (``torch.compile(model, backend="mhc", ...)``, ``model.compile(...)``) or any
      other callable is called as given, ``model_or_compiled_fn(*inputs)``, under ``torch.no_grad()``.
      Sites of several graphs (graph breaks) are all recorded, in execution order.
    * A plain ``nn.Module`` is run through ``mhc_compile.trace(model, *inputs, **options)``: the
      backend's rewritten graphs, executed eagerly once. ``n`` and ``mode`` default to those of the
      model's existing mHC sites (from ``prepare``).

    ``res_convention`` must match the backend's option (captured H_res is the matrix before the
    transpose); it defaults to ``options["res_convention"]``, else ``"paper"``. ``keep_streams=True``
    also keeps every site's input streams X in ``Diagnostics.streams``.
    """
    from mhc_compile.runtime.ops import capture_coefficients

    options = dict(options or {})
    if res_convention is None:
        res_convention = options.get("res_convention", "paper")
    if res_convention not in ("paper", "transpose"):
        raise ValueError(f"collect: res_convention must be 'paper' or 'transpose', got {res_convention!r}")

    with capture_coefficients() as records:
        if isinstance(model_or_compiled_fn, nn.Module) and not _is_compiled(model_or_compiled_fn):
            from mhc_compile.api import trace

            trace(model_or_compiled_fn, *inputs, **_site_options(model_or_compiled_fn, options))
        else:
            with torch.no_grad():
                model_or_compiled_fn(*inputs)
    if not any("h_res" in r for r in records):
        raise RuntimeError(
            "collect: no mHC site ran. Pass a model compiled with backend='mhc' (mode 'mhc' or 'hc'), "
            "or a prepared nn.Module to trace; mode 'residual' has no sites."
        )
    return _from_records(records, res_convention, keep_streams)


def _from_records(records: list[dict], res_convention: str, keep_streams: bool) -> Diagnostics:
    """Pair each site's coefficients entry with its stream entry, in execution order.

    ``coeffs`` records before ``pre`` for the same site, but pairing by name (first in, first out)
    keeps this right if a scheduler interleaves independent sites or one site runs more than once.
    """
    coeff_entries: list[dict] = []
    pending_x: dict[str, list[Tensor]] = {}
    waiting: dict[str, list[int]] = {}  # site -> indices of coefficient entries still without an x
    for r in records:
        site = r["site"]
        if "h_res" in r:
            coeff_entries.append(dict(r))
            if pending_x.get(site):
                coeff_entries[-1]["x"] = pending_x[site].pop(0)
            else:
                waiting.setdefault(site, []).append(len(coeff_entries) - 1)
        elif "x" in r:
            if waiting.get(site):
                coeff_entries[waiting[site].pop(0)]["x"] = r["x"]
            else:
                pending_x.setdefault(site, []).append(r["x"])

    sites = [e["site"] for e in coeff_entries]
    h_pre = [e["h_pre"] for e in coeff_entries]
    h_post = [e["h_post"] for e in coeff_entries]
    h_res = [e["h_res"] for e in coeff_entries]
    if res_convention == "transpose":
        h_res = [h.transpose(-1, -2).contiguous() for h in h_res]

    gains = [amax_gain(h.to(torch.float64)) for h in h_res]
    site_fwd = torch.stack([f.amax() for f, _ in gains])
    site_bwd = torch.stack([b.amax() for _, b in gains])
    if all(h.shape == h_res[0].shape for h in h_res):
        comp_fwd, comp_bwd = composite_gains(h_res)
    else:  # sites saw different token shapes: there is no per-token product
        comp_fwd = comp_bwd = torch.full((len(h_res),), math.nan, dtype=torch.float64)
    nan = torch.tensor(math.nan)
    divergence = torch.stack([stream_divergence(e["x"]).float().cpu() if "x" in e else nan for e in coeff_entries])
    return Diagnostics(
        sites=sites, h_pre=h_pre, h_post=h_post, h_res=h_res,
        site_fwd=site_fwd, site_bwd=site_bwd, composite_fwd=comp_fwd, composite_bwd=comp_bwd,
        divergence=divergence, res_convention=res_convention,
        streams=[e.get("x") for e in coeff_entries] if keep_streams else None,
    )


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib is imported here only; the object-oriented API renders with Agg, or SVG/PDF
# by extension, without touching pyplot's global backend)
# ---------------------------------------------------------------------------------------------
_FORMATS = (".png", ".svg", ".pdf")


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def _save(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"plot path must end in one of {_FORMATS}, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _site_axis(ax, diag: Diagnostics) -> None:
    ax.set_xlabel("site (execution order)")
    if diag.depth <= 24:
        ax.set_xticks(range(diag.depth))
        ax.set_xticklabels(diag.sites, rotation=60, ha="right", fontsize=7)


def _cpu(t: Tensor):
    return t.detach().double().cpu().numpy()


def plot_gains(diag: Diagnostics, path) -> pathlib.Path:
    """Per-site (left) and composite (right) Amax gains vs depth, log y axis (paper Fig. 3 and 7)."""
    fig = _figure(figsize=(11, 4.2), layout="constrained")
    depth = range(diag.depth)
    panels = [
        ("single site H_res", diag.site_fwd, diag.site_bwd),
        ("composite H_k ... H_0", diag.composite_fwd, diag.composite_bwd),
    ]
    for ax, (title, fwd, bwd) in zip(fig.subplots(1, 2), panels):
        ax.plot(depth, _cpu(fwd), "o-", label="forward (max row sum)")
        ax.plot(depth, _cpu(bwd), "s--", label="backward (max column sum)")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        # At least [0.5, 2] around the gain 1 line, so mHC's flat curves are not blown up into noise.
        values = [v for v in (*_cpu(fwd), *_cpu(bwd)) if math.isfinite(v) and v > 0]
        if values:
            lo, hi = min(0.5, min(values) / 1.5), max(2.0, max(values) * 1.5)
            ax.set_ylim(lo, hi)
            if hi / lo < 100:  # under two decades: plain numbers read better than 2 x 10^0
                from matplotlib.ticker import FuncFormatter

                plain = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
        ax.set_ylabel("Amax gain magnitude (max over tokens)")
        ax.set_title(title)
        _site_axis(ax, diag)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_h_res_heatmaps(diag: Diagnostics, path, annotate: bool | None = None) -> pathlib.Path:
    """Token-mean H_res of every site, plus the mean composite, as a grid of heatmaps (paper Fig. 8).

    The sites share one colour scale; the composite (last panel) has its own, since under HC its
    entries are orders of magnitude larger. A scale is sequential (0 .. max) when every entry is >= 0
    as in mHC, diverging and symmetric around 0 otherwise. Entries are written in the cells when
    n <= 6 (``annotate``).
    """
    sites = list(_cpu(diag.mean_h_res()))
    comp = _cpu(diag.mean_composite())
    n = diag.n
    if annotate is None:
        annotate = n <= 6
    panels = len(sites) + 1
    cols = math.ceil(math.sqrt(panels))
    rows = math.ceil(panels / cols)

    fig = _figure(figsize=(2.3 * cols + 1.6, 2.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = list(axes.flat)
    site_scale = _colour_scale(sites)
    site_image = None
    for k, mat in enumerate(sites):
        site_image = _heatmap(flat[k], mat, diag.sites[k], site_scale, annotate)
    comp_image = _heatmap(flat[len(sites)], comp, "composite H_L-1 ... H_0", _colour_scale([comp]), annotate)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.colorbar(site_image, ax=flat[: len(sites)], shrink=0.8, label="mean H_res entry (sites)")
    fig.colorbar(comp_image, ax=flat[len(sites)], location="bottom", shrink=0.9, label="composite")
    return _save(fig, path)


def _colour_scale(mats) -> tuple[str, float, float]:
    lo = min(float(m.min()) for m in mats)
    hi = max(float(m.max()) for m in mats)
    if lo >= 0:
        return "viridis", 0.0, max(hi, 1e-12)
    bound = max(abs(lo), abs(hi))
    return "RdBu_r", -bound, bound


def _heatmap(ax, mat, title: str, scale: tuple[str, float, float], annotate: bool):
    cmap, vmin, vmax = scale
    image = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=8)
    n = mat.shape[0]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.tick_params(labelsize=6)
    if annotate:
        for i in range(n):
            for j in range(n):
                # Dark text on the light middle of the colour map, white on its dark ends.
                r, g, b, _ = image.cmap(image.norm(mat[i, j]))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, f"{mat[i, j]:.3g}", ha="center", va="center", fontsize=6, color=colour)
    return image


def plot_divergence(diag: Diagnostics, path) -> pathlib.Path:
    """Stream divergence of each site's input streams vs depth."""
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(diag.depth), _cpu(diag.divergence), "o-")
    ax.set_ylabel("mean_tokens max_ij ||X_i - X_j|| / ||X||")
    ax.set_title("stream divergence at each site's input")
    ax.set_ylim(bottom=0)
    _site_axis(ax, diag)
    return _save(fig, path)
