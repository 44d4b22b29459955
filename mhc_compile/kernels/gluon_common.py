"""What the warp-specialized Gluon kernels (gluon_post_res_proj, gluon_step_bwd, gluon_proj_bwd) share.

- The Gluon imports, absent before Triton 3.5 (``AVAILABLE``).
- The names Triton changed after 3.6, the GPU machine's version: the TMA copies and the barrier of a
  partition's warps.
- The loader warp's register budget.
- TMA descriptors with the swizzle that TMA and wgmma agree on.
- The shared memory a block may take.
- fp32 operands padded with zero columns to a TMA box's width.
"""

from __future__ import annotations

import torch

try:  # Gluon: Triton >= 3.5 (the GPU machine's 3.6 and this machine's later versions build these kernels)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None

AVAILABLE = gluon is not None
SMEM = 226 * 1024  # bytes of rings and tiles: an H100 / H200 block may take 227 KiB, barriers included

if AVAILABLE:
    LOADER_REGS = gl.constexpr(40)  # a loader warp computes coordinates only
    # Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global and the barrier of
    # a partition's warps thread_barrier; later versions: async_load / async_store (same arguments) and barrier
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    warps_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def waited(done, N: gl.constexpr):
        """warpgroup_mma_wait's results as a tuple (it returns one tensor, not a 1-tuple, for one dependency)."""
        if N == 1:
            done = (done,)
        return done
else:  # pragma: no cover - depends on the installed Triton
    LOADER_REGS = tma_load = tma_store = warps_barrier = waited = None


def desc(v, shape, strides, block, dtype) -> "TensorDescriptor":
    """A TMA descriptor of ``shape`` over v's memory, with the swizzle TMA and wgmma agree on (it also spreads a
    column of a narrow per-token tile over the banks)."""
    layout = gl.NVMMASharedLayout.get_default_for(list(block), dtype)
    return TensorDescriptor(v, list(shape), list(strides), list(block), layout)


def pad_cols(v: "torch.Tensor", width: int) -> "torch.Tensor":
    """fp32 [R, width]: v [R, M] with zero columns past M (dp and phi as tf32 wgmma operands)."""
    out = torch.zeros((v.shape[0], width), dtype=torch.float32, device=v.device)
    out[:, :v.shape[1]] = v
    return out
