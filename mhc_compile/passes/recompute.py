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

L_r = "auto" picks round(sqrt(n L / (n + 2))) for a chain of L sites, the minimiser (derived in
``cost.py``) of the memory model  n C (L / L_r) + (n + 2) C L_r  (block inputs kept + one block's
intermediates live at once).
"""

from __future__ import annotations

import itertools
import operator

import torch.fx as fx

from mhc_compile import _compat, cost
from mhc_compile.config import MHCConfig
from mhc_compile.passes.detect import Detection

_ids = itertools.count(10_000)  # away from the ids torch.utils.checkpoint hands out


def block_size(config: MHCConfig, num_sites: int) -> int | None:
    if config.recompute == "none" or num_sites == 0:
        return None
    if config.recompute == "auto":
        return max(1, min(num_sites, round(cost.optimal_block_size(config.n, num_sites))))
    return min(int(config.recompute), num_sites)


# Fused boundary ops (passes/fuse.py) are recomputed whole: X_l and x_in come out of the same node;
# post_res_proj (passes/fuse_proj.py) too, its p / sq outputs (role "proj") being saved.
_STREAM_ROLES = ("expand", "post_res", "post_res_proj", "collapse", "pre", "branch_sum", "step", "enter")
_SAVED_ROLES = ("proj", "coeffs")


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
    for chain in detection.chains:
        lr = block_size(config, len(chain.sites))
        if lr is None:
            continue
        for start in range(0, len(chain.sites), lr):
            block = chain.sites[start : start + lr]
            graph_id = next(_ids)
            for site in block:
                for node in by_site.get(site.path, []) + link_of.get(site.path, []):
                    policy_for = _policy(node, policy)
                    if policy_for is not None:
                        node.meta["recompute"] = policy_for
                        node.meta["ac_graph_id"] = graph_id
            blocks.append([s.path for s in block])
    return blocks
