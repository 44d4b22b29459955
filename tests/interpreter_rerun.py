"""For test modules that need Triton's interpreter but find triton already imported without it."""

import os
import subprocess
import sys


def rerun_in_subprocess(path: str):
    """A test that runs every test of the module at ``path`` in a fresh interpreter process with
    TRITON_INTERPRET=1 (which must be set before triton is first imported)."""

    def test_module_in_interpreter_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", path],
                             env=env, cwd=root, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]

    return test_module_in_interpreter_subprocess


# The Triton kernel modules in import order (each after those it takes names from), so that reloading them in this
# order leaves every module bound to reloaded ones.
KERNEL_MODULES = ("triton_common", "triton_config", "triton_pre", "triton_post_res", "triton_proj", "triton_coeffs",
                  "triton_post_res_proj", "triton_ops", "triton_proj_bwd", "triton_fused")


def interpreted_kernels() -> dict:
    """{name: module} of KERNEL_MODULES with their kernels decorated under the interpreter: reloaded, in order,
    where they were imported before TRITON_INTERPRET was set (triton.jit picks the interpreter when it decorates;
    the caller has checked that Triton itself was imported with it)."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    modules = {name: importlib.import_module(f"mhc_compile.kernels.{name}") for name in KERNEL_MODULES}
    if not isinstance(modules["triton_common"].hi_lo_kernel, InterpretedFunction):
        modules = {name: importlib.reload(module) for name, module in modules.items()}
    return modules
