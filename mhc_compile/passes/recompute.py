"""Mark the mHC bookkeeping for recomputation in backward (paper Sec. 4.3.2).

The sites of a chain are cut into blocks of L_r. Every mHC node of a block (expand, proj, coeffs, pre,
post_res, and the post-norm ops that now act on all streams) is tagged ``recompute = MUST_RECOMPUTE``
with the block's ``ac_graph_id``. These meta keys survive AOTAutograd's retrace into the joint graph,
where the min-cut partitioner honours them: inside a block nothing of the widened stream is saved and
the intermediates are recomputed from the block's input stream and the saved sublayer outputs y;
between two blocks the partitioner keeps the boundary stream (a tagged node whose user has a larger
``ac_graph_id`` is saved), which is exactly "store the stream every L_r sublayers plus each F output".

L_r = "auto" picks round(sqrt(n L / (n + 2))) for a chain of L sites, the minimiser of the memory
model  n C (L / L_r) + (n + 2) C L_r  (block inputs kept + one block's intermediates live at once).
"""

from __future__ import annotations

import itertools
import math

import torch.fx as fx

from mhc_compile import _compat
from mhc_compile.config import MHCConfig
from mhc_compile.passes.detect import Detection

_ids = itertools.count(10_000)  # away from the ids torch.utils.checkpoint hands out


def block_size(config: MHCConfig, num_sites: int) -> int | None:
    if config.recompute == "none" or num_sites == 0:
        return None
    if config.recompute == "auto":
        n = config.n
        return max(1, min(num_sites, round(math.sqrt(n * num_sites / (n + 2)))))
    return min(int(config.recompute), num_sites)


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
                    node.meta["recompute"] = policy.MUST_RECOMPUTE
                    node.meta["ac_graph_id"] = graph_id
            blocks.append([s.path for s in block])
    return blocks
