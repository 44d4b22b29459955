"""Triton kernels of the mHC ops, one function per op of ``kernels/reference.py`` with the same signature.

All streams are contiguous and token-major: x [T, n, C], y [T, C], coefficients [T, n] / [T, n, n] fp32. The
one exception is a stream input x broadcast over n (a chain's head; ``triton_common.stream_arg``): the kernels
that read x take it as its [T, C] rows under the X_BCAST constexpr, and write their outputs dense.
Conventions shared by every kernel:

* ``T`` (tokens) is a runtime argument and is excluded from Triton's value specialisation
  (``do_not_specialize``), so a new batch or sequence length reuses the compiled kernel. ``n`` is a
  constexpr (loops over streams unroll), ``C`` a runtime argument (Triton still specialises it on
  divisibility by 16, which is what lets loads along C vectorise).
* The stream stays in its dtype (bf16 / fp16 / fp32, fp64 for tests); everything is accumulated in fp32
  (fp64 when the stream is fp64), matching ``reference.acc_dtype``.
* Stream offsets are computed in int64: T * n * C exceeds 2^31 at long contexts.
* Reductions over T (dphi, dbias, dalpha) and split-K reductions write per-program partials that are then
  summed with ``torch.sum``: deterministic, no atomics.
* The projections use ``tl.dot``. A bf16 stream enters the tensor cores as loaded (post_res_proj: X' as
  rounded to bf16 in registers), and the fp32 operand (phi in proj and post_res_proj; dp in dphi = X^T dp) is
  split into bf16 hi + lo halves, two dots: X is exact and the fp32 operand keeps ~16 mantissa bits, a
  relative error of about 2^-17 per product. Where the stream is not the other operand (dx's dp @ phi^T)
  and for fp16 streams, the operands are fp32 multiplied in tf32 (10 mantissa bits, about 2^-11 per
  product). fp32 / fp64 streams use exact ("ieee") products.

Kernels are launched directly rather than through ``torch.library.triton_op``, so the same code runs under
``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests exercise it. Every launch goes through
kernels/launch.py: ``kernel[grid](...)`` the first time a call signature is seen, its compiled kernel's launcher
after that (Triton's per-call binding and cache lookup cost more host time than these kernels' GPU time at small
widths).

Where each op lives (one module an op, the layering of Liger-Kernel: kernel and wrapper together, this module the
functional surface that ``runtime/ops.py`` dispatches to):

* ``triton_pre``: pre, pre_backward, pre_backward_dh
* ``triton_post_res``: post_res, post_res_backward, post_res_backward_pre, post_res_chain, post_res_collapse
* ``triton_proj``: proj, proj_backward, proj_pre_backward, proj_pre_backward_collapsed (bf16's one-pass backward:
  ``triton_proj_bwd``, and on sm_90 ``gluon_proj_bwd``)
* ``triton_coeffs``: coeffs, coeffs_backward
* ``triton_post_res_proj``: post_res_proj (on sm_90: ``gluon_post_res_proj``)
* ``triton_boundary``: boundary_backward (on sm_90: ``gluon_step_bwd.boundary_grads``)
* ``triton_config``: the tiles (``configure``, ``tuning``); ``triton_common``: what the wrappers share
"""

from mhc_compile.kernels import (triton_coeffs, triton_common, triton_post_res, triton_post_res_proj, triton_pre,
                                 triton_proj)
from mhc_compile.kernels.triton_coeffs import coeffs, coeffs_backward
from mhc_compile.kernels.triton_config import (
    BoundaryBwdCfg, CoeffsBwdCfg, DotCfg, FusedBwdCfg, PostResBwdCfg, StreamCfg, configure, tuning,
)
from mhc_compile.kernels.triton_post_res import (post_res, post_res_backward, post_res_backward_pre, post_res_chain,
                                                 post_res_collapse)
from mhc_compile.kernels.triton_post_res_proj import post_res_proj
from mhc_compile.kernels.triton_pre import pre, pre_backward, pre_backward_dh
from mhc_compile.kernels.triton_proj import proj, proj_backward, proj_pre_backward, proj_pre_backward_collapsed
from mhc_compile.kernels.triton_boundary import boundary_backward

# The modules whose wrappers launch kernels, each through its own binding of ``launch``: what a test or a check
# that wraps every launch of these ops patches (triton_proj_bwd and triton_fused bind their own too).
LAUNCHING = (triton_common, triton_pre, triton_post_res, triton_proj, triton_coeffs, triton_post_res_proj)

__all__ = [
    "pre", "pre_backward", "pre_backward_dh", "post_res", "post_res_backward", "post_res_backward_pre",
    "post_res_chain", "post_res_collapse", "proj",
    "proj_backward", "proj_pre_backward", "proj_pre_backward_collapsed", "boundary_backward", "coeffs", "coeffs_backward", "post_res_proj",
    "configure", "tuning", "StreamCfg", "PostResBwdCfg", "CoeffsBwdCfg", "DotCfg", "FusedBwdCfg",
    "BoundaryBwdCfg",
    "LAUNCHING",
]
