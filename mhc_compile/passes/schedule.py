"""Stage "schedule": where the mHC graph meets torch.distributed.

1. ``apply`` (a graph pass): records where the mHC ops sit (``gm.meta["mhc_nodes"]``), so that a scheduler can move
   them to a side stream without re-deriving the sites. It changes nothing in the graph.
2. ``compile_for_ddp`` (how the rewritten graph is compiled under DistributedDataParallel): Dynamo's DDPOptimizer
   cannot split the graph before the rewrite, since that cuts the residual chains (``distributed.py``), so the
   backend splits it after: at DDP's gradient-bucket boundaries, each piece compiled apart. A piece's backward
   then hands DDP's reducer its parameters' gradients as soon as it ends, and the bucket's all-reduce overlaps
   the backward of the pieces before it, as it does for the model without mHC; one graph would hand every
   gradient over at the end of the whole backward. The n-stream tensors cross the boundaries as ordinary
   activations. ``MHCConfig.ddp_buckets`` turns it off.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.fx as fx

from mhc_compile import _compat
from mhc_compile.config import MHCConfig

log = logging.getLogger("mhc_compile")


def apply(gm: fx.GraphModule, config: MHCConfig) -> None:
    gm.meta["mhc_nodes"] = [n.name for n in gm.graph.nodes if "mhc" in n.meta]


def compile_for_ddp(gm: fx.GraphModule, example_inputs: list, config: MHCConfig,
                    compile_piece: Callable[[fx.GraphModule, list], Callable]) -> tuple[Callable, int] | None:
    """(the compiled graph, its number of pieces) when a DDP's forward is running and Dynamo left the graph whole
    (``optimize_ddp`` off, or a graph within one bucket), else None: no DDP, ``ddp_buckets`` off, or a
    compiled-autograd DDP mode, which orders the all-reduces itself."""
    ddp = _compat.active_ddp_module()
    if ddp is None or not config.ddp_buckets or _compat.optimize_ddp_mode() not in ("ddp_optimizer",
                                                                                   "no_optimization"):
        return None
    compile_split, buckets = _compat.ddp_bucket_compiler(ddp.bucket_bytes_cap, compile_piece)
    compiled = compile_split(gm, example_inputs)
    log.info("mhc: graph compiled in %d piece(s) at DDP's gradient buckets (%d bytes)", buckets(),
             ddp.bucket_bytes_cap)
    return compiled, buckets()
