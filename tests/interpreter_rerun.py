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
