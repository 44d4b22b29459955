"""Mark the mHC bookkeeping for recomputation in backward (paper Sec. 4.3.2).

The sites of a chain are cut into blocks of L_r. The nodes that produce widened streams (expand,
post_res, and the post-norm ops that now act on all streams) are tagged ``recompute = MUST_RECOMPUTE``
with the block's ``ac_graph_id``. The coefficient path's outputs (p, sq, H: (n^2 + 2n + 1) fp32 values a
token, a few percent of one stream) are tagged MUST_SAVE: recomputing them would re-read the n-wide
stream for the projection, the most expensive bookkeeping kernel. ``pre`` is recomputed too (one read
of the streams), so the sublayer's input is not kept beside the streams it is made from. These meta keys survive AOTAutograd's retrace into the joint graph,
where the min-cut partitioner honours them: inside a block nothing of the widened stream is saved and
the intermediates are recomputed from the block's input stream and the saved sublayer outputs y;
between two blocks the partitioner keeps the boundary stream (a tagged node whose user has a larger
``ac_graph_id`` is saved), which is exactly "store the stream every L_r sublayers plus each F output".
The collapsed stream at a chain's end (one C-wide tensor) is saved too (``_save_collapses``).
With ``fuse=True`` the boundary stream is an output of a multi-output ``step`` op, which the partitioner would
not keep on that rule, so the block's last fused op is saved whole (``_save_boundary_ops``).

recompute="auto" picks the block sizes with ``cost.block_schedule``: the partition of the chain that
minimises the modelled peak of the backward (``cost.block_peak``: activations still alive + weight gradients
already produced + stored block inputs + the streams recomputed for the block being processed + the gradient
stream entering it), given how many C-wide activations each site's sublayer produces and how many its weight
gradients take (both estimated from the graph's fake tensors). Blocks come out large early in the chain
and small late, where the backward starts with every activation alive. Without that estimate (no tensor
metadata) it falls back to uniform blocks of round(sqrt(n L / (n + 2))), the minimiser of the simpler model
n C (L / L_r) + (n + 2) C L_r. An int recompute forces uniform blocks of that size.
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.fx as fx

from mhc_compile import _compat, cost
from mhc_compile.config import MHCConfig
from mhc_compile.passes.detect import Detection, example_value, innermost_module

_ids = itertools.count(10_000)  # away from the ids torch.utils.checkpoint hands out


def block_size(config: MHCConfig, num_sites: int) -> int | None:
    """Uniform block size: the forced one, or auto's fallback when activations cannot be estimated."""
    if config.recompute == "none" or num_sites == 0:
        return None
    if config.recompute == "auto":
        return max(1, min(num_sites, round(cost.optimal_block_size(config.n, num_sites))))
    return min(int(config.recompute), num_sites)


def block_sizes(config: MHCConfig, num_sites: int, act: float | None, wgrad: float = 0.0) -> list[int]:
    """Sizes of a chain's recompute blocks, first block first ([] with recompute="none")."""
    if isinstance(config.recompute, tuple):
        if sum(config.recompute) != num_sites:
            raise ValueError(f"mhc option 'recompute': blocks {list(config.recompute)} cover "
                             f"{sum(config.recompute)} sites, but a chain here has {num_sites}")
        return list(config.recompute)
    if config.recompute == "auto" and act is not None and num_sites > 0:
        return cost.block_schedule(num_sites, config.n, act, wgrad)
    lr = block_size(config, num_sites)
    if lr is None:
        return []
    return [min(lr, num_sites - start) for start in range(0, num_sites, lr)]


def _nbytes(t: torch.Tensor) -> int:
    return _compat.size_hint(t.numel()) * t.element_size()


def _stream_bytes(detection: Detection) -> int:
    """Bytes of one site's stream (the unit of the planner's counts); 0 when unknown or empty."""
    unit = example_value(detection.sites[0].stream) if detection.sites else None
    return _nbytes(unit) if isinstance(unit, torch.Tensor) else 0


def activation_units(gm: fx.GraphModule, detection: Detection) -> float | None:
    """C-wide activations (per token) the sublayers produce per site: the bytes of every non-view tensor the
    model's own nodes output, over (sites x one site's stream). An upper bound of what they keep for backward
    (some outputs are freed or recomputed), which is the side to err on: it makes late blocks smaller."""
    sites, unit = detection.sites, _stream_bytes(detection)
    if not unit:
        return None
    total = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or "mhc" in node.meta:
            continue
        v = example_value(node)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and getattr(v, "_base", None) is None:
            total += _nbytes(v)
    return total / (len(sites) * unit)


def weight_grad_units(gm: fx.GraphModule, detection: Detection) -> float:
    """C-wide activations (per token) that one site's weight gradients take: the bytes of the trainable
    parameters read inside the modules that own sites (a GPT block's attention and MLP, not the embeddings or
    the head, whose gradients come at the end of the backward; every parameter when the root owns a site), over
    (sites x one site's stream)."""
    sites, unit = detection.sites, _stream_bytes(detection)
    if not unit:
        return 0.0
    owners = {site.owner for site in sites}
    total = 0
    for node in gm.graph.nodes:
        v = example_value(node) if node.op in ("placeholder", "get_attr") and "mhc" not in node.meta else None
        if not isinstance(v, torch.Tensor) or not v.requires_grad or not v.is_floating_point():
            continue
        if not (isinstance(v, torch.nn.Parameter) or getattr(v, "_is_param", False)):
            continue
        paths = {innermost_module(user) for user in node.users}
        if any(owner == "" or p == owner or p.startswith(owner + ".") for p in paths for owner in owners):
            total += _nbytes(v)
    return total / (len(sites) * unit)


# Fused boundary ops (passes/fuse.py) are recomputed whole: X_l and x_in come out of the same node. At a block
# boundary that is not enough: the stream crossing it is a getitem of the block's last ``step``, and the min-cut
# partitioner never bans a getitem from recomputation, so a MUST_SAVE on it (what the boundary rule above sets)
# is ignored and the next block's backward rebuilds the whole chain from its start (H200, d = 4096: +65 %
# activation memory against +18 % unfused). That ``step`` node itself is saved instead (``_save_boundary_ops``).
_STREAM_ROLES = ("expand", "post_res", "collapse", "pre", "branch_sum", "step", "enter")
_SAVED_ROLES = ("proj", "coeffs")
_FUSED_OPS = ("step", "enter")


def _policy(node: fx.Node, policy):
    role = (node.meta.get("mhc") or {}).get("role")
    if role is None or role in _STREAM_ROLES:  # role None: a post-norm op on the streams
        return policy.MUST_RECOMPUTE
    if role in _SAVED_ROLES and node.target is operator.getitem:
        return policy.MUST_SAVE
    if role == "coeffs" and node.op == "call_method":  # the transposed H_res view: recompute (free)
        return policy.MUST_RECOMPUTE
    return None


def apply(gm: fx.GraphModule, detection: Detection, config: MHCConfig) -> list[list[str]]:
    """Tag nodes in place; return the blocks as lists of site paths (for reports)."""
    policy = _compat.checkpoint_policy()
    blocks: list[list[str]] = []
    by_site: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        info = node.meta.get("mhc")
        if info and info.get("site") and info.get("role") != "param":
            by_site.setdefault(info["site"], []).append(node)
    link_of: dict[str, list[fx.Node]] = {}
    for chain in detection.chains:
        for site, link in zip(chain.sites, chain.links):
            link_of[site.path] = link
    act = activation_units(gm, detection) if config.recompute == "auto" else None
    wgrad = weight_grad_units(gm, detection) if act is not None else 0.0
    for chain in detection.chains:
        start = 0
        for size in block_sizes(config, len(chain.sites), act, wgrad):
            block = chain.sites[start : start + size]
            start += size
            graph_id = next(_ids)
            for site in block:
                for node in by_site.get(site.path, []) + link_of.get(site.path, []):
                    policy_for = _policy(node, policy)
                    if policy_for is not None:
                        node.meta["recompute"] = policy_for
                        node.meta["ac_graph_id"] = graph_id
            if start < len(chain.sites):  # another block follows
                _save_boundary_ops(by_site.get(block[-1].path, []), policy)
            blocks.append([s.path for s in block])
    if blocks:
        _save_collapses(gm.graph, policy)
    return blocks


def _save_collapses(graph: fx.Graph, policy) -> None:
    """Each collapsed stream (mean or sum over the n streams: one C-wide tensor) MUST_SAVE. Left to the min-cut
    partitioner, the head's collapse was recomputed: the backward rebuilt the chain's last n-wide stream (its
    post_res, which nothing else in the backward reads) and reduced it again, 3n + 1 C-wide tensors of traffic a
    token to spare one of memory. A movedim view after it stays free to recompute."""
    for node in graph.nodes:
        if node.op == "call_function" and (node.meta.get("mhc") or {}).get("role") == "collapse":
            node.meta["recompute"] = policy.MUST_SAVE


def _save_boundary_ops(nodes: list[fx.Node], policy) -> None:
    """The fused op of a block's last site, and its outputs, MUST_SAVE: its stream is the next block's input.
    What the backward then keeps of it besides the stream (the sublayer input x_in, the coefficients) is one
    C-wide tensor and a few fp32 values a token, as the unfused ops' saved coefficients."""
    for node in nodes:
        op = node.args[0] if node.target is operator.getitem else node
        if (op.meta.get("mhc") or {}).get("role") in _FUSED_OPS:
            node.meta["recompute"] = policy.MUST_SAVE
