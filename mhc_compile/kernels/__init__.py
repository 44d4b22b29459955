"""Kernels of the mHC ops: ``reference`` (plain PyTorch, the oracle) and ``triton_ops`` (fused GPU kernels)."""
