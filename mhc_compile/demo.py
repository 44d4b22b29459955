"""The built-in training demo: a small byte-level GPT on the Python standard library's own sources.

Every machine with Python has that text, so the demo (and the convergence tests) need no download.
``train_compare`` trains the same initial model with plain residuals and with ``backend="mhc"`` side by
side and reports what was rewritten.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def stdlib_text(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted, so every machine reads the same order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no .py files found under the standard library at {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Endless random (input, target) windows of ``seq`` bytes."""
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


class TinyGPT(nn.Module):
    """A pre-norm GPT: the plain residual stream x = x + attn(ln(x)); x = x + mlp(ln(x))."""

    def __init__(self, vocab: int = 256, d: int = 64, heads: int = 4, layers: int = 4, seq: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


@dataclass
class RunResult:
    label: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    parameters: int = 0


def train(model: nn.Module, step_fn, label: str, steps: int, batch: int, seq: int, lr: float,
          seed: int = 0, log_every: int = 0, data: torch.Tensor | None = None) -> RunResult:
    data = stdlib_text() if data is None else data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    result = RunResult(label, parameters=sum(p.numel() for p in model.parameters()))
    start = time.perf_counter()
    for step, (x, y) in zip(range(steps), batches(data, batch, seq, gen)):
        logits = step_fn(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  [{label}] step {step:4d}  loss {loss.item():.4f}")
    result.seconds = time.perf_counter() - start
    return result


def train_compare(steps: int = 60, n: int = 4, d: int = 64, layers: int = 4, batch: int = 16, seq: int = 64,
                  lr: float = 3e-3, inner_backend: str = "inductor", seed: int = 0, log_every: int = 10) -> list[RunResult]:
    """Train plain residual and mHC from the same initial weights on the same batches."""
    import mhc_compile
    from mhc_compile.backend import REPORTS

    data = stdlib_text()
    print(f"data: {data.numel():,} bytes of Python standard-library source; model: TinyGPT d={d} layers={layers}")
    results = []

    torch.manual_seed(seed)
    plain = TinyGPT(d=d, layers=layers, seq=seq)
    init_state = {k: v.clone() for k, v in plain.state_dict().items()}
    plain_step = torch.compile(plain, backend="inductor" if inner_backend == "inductor" else inner_backend)
    results.append(train(plain, plain_step, "residual", steps, batch, seq, lr, seed, log_every, data))

    model = TinyGPT(d=d, layers=layers, seq=seq)
    model.load_state_dict(init_state)
    options = {"n": n, "inner_backend": inner_backend}
    start = len(REPORTS)
    example = torch.zeros(batch, seq, dtype=torch.long)
    mhc_compile.prepare(model, example, **options)
    for report in REPORTS[start:]:
        for line in report.sites:
            print(f"  rewrote residual site {line}")
    added = mhc_compile.mhc_parameters(model)
    print(f"  added {len(added)} mHC parameter tensors ({sum(p.numel() for p in added):,} values) at n={n}")
    mhc_step = torch.compile(model, backend="mhc", options=options)
    results.append(train(model, mhc_step, f"mhc n={n}", steps, batch, seq, lr, seed, log_every, data))
    return results


def summarize(results: list[RunResult], tail: int = 10) -> str:
    lines = [f"{'run':<12} {'params':>10} {'first loss':>11} {'last-' + str(tail) + ' mean':>13} {'time s':>8}"]
    for r in results:
        last = sum(r.losses[-tail:]) / len(r.losses[-tail:])
        lines.append(f"{r.label:<12} {r.parameters:>10,} {r.losses[0]:>11.4f} {last:>13.4f} {r.seconds:>8.1f}")
    return "\n".join(lines)


def bits_per_byte(loss: float) -> float:
    return loss / math.log(2)
