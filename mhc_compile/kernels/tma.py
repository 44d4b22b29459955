"""TMA (Hopper's tensor memory accelerator) for the Triton kernels: whether tensors can move as descriptor
blocks, and the host-side descriptors themselves.

Kernels that take descriptors (proj's one-pass backward, post_res_proj) keep a pointer build beside them for
what TMA cannot address (other dtypes, unaligned rows, GPUs before sm_90); their wrappers ask ``tma_ok``.
"""

from __future__ import annotations

import functools

import torch
from triton.tools.tensor_descriptor import TensorDescriptor


@functools.lru_cache(maxsize=None)
def has_tma(device: torch.device) -> bool:
    """The TMA engine: Hopper (sm_90) and later. The interpreter (CPU tensors) runs descriptors too."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def tma_ok(*tensors) -> bool:
    """Whether these [.., C]-shaped bf16 tensors can be read and written through TMA descriptors: a GPU with TMA,
    16-byte aligned bases and rows (C a multiple of 8), the last dim contiguous (the wrapper made them
    contiguous). Elsewhere the kernel's pointer loads run."""
    return has_tma(tensors[0].device) and all(
        v.dtype == torch.bfloat16 and v.data_ptr() % 16 == 0 and v.shape[-1] % 8 == 0 for v in tensors)


def descriptor(v, rows, cols, block):
    """A [rows, cols] TMA descriptor over the contiguous tensor v, read and written in blocks of ``block``."""
    return TensorDescriptor.from_tensor(v.view(rows, cols), list(block))
