"""Routing the ops' kernel launches through a test's spy."""

from mhc_compile.kernels import launch as launch_mod

real_launch = launch_mod.launch  # what a spy calls on to launch


def patch_launches(monkeypatch, spy, *modules) -> None:
    """Every launch of triton_ops' kernel modules (each binds ``launch`` itself: ``triton_ops.LAUNCHING``) and of
    ``modules`` goes through ``spy`` until the test ends."""
    from mhc_compile.kernels import triton_ops

    for module in triton_ops.LAUNCHING + modules:
        monkeypatch.setattr(module, "launch", spy)
