"""After `pip install`, backend="mhc" works without importing mhc_compile (torch_dynamo_backends)."""

import subprocess
import sys

SCRIPT = r"""
import warnings, torch
warnings.simplefilter("ignore")
import sys
assert "mhc_compile" not in sys.modules
assert "mhc" in torch._dynamo.list_backends()
lin = torch.nn.Linear(8, 8)
class M(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.lin = lin
    def forward(self, x):
        return x + self.lin(torch.relu(x))
m = M(); x = torch.randn(2, 8)
want = m(x)
got = torch.compile(m, backend="mhc", options={"n": 2, "inner_backend": "aot_eager"})(x)
assert (got - want).abs().max() < 1e-5
assert any("mhc" in k for k, _ in m.named_parameters())
print("OK")
"""


def test_backend_by_name_without_import():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
