"""The built-in training demo: a small byte-level GPT on the Python standard library's own sources.

Every machine with Python has that text, so the demo (and the convergence tests) need no download.
``train_compare`` trains the same initial model with plain residuals and with ``backend="mhc"`` side by
side and reports what was rewritten.
"""

from __future__ import annotations

import math
import sys
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
          seed: int = 0, log_every: int = 0, data: torch.Tensor | None = None, device: str = "cpu") -> RunResult:
    data = stdlib_text() if data is None else data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    result = RunResult(label, parameters=sum(p.numel() for p in model.parameters()))
    start = time.perf_counter()
    bar = _Progress(label, steps)
    for step, (x, y) in zip(range(steps), batches(data, batch, seq, gen)):
        x, y = x.to(device), y.to(device)
        logits = step_fn(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.losses.append(loss.item())
        bar.update(step, loss.item(), log_every)
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


class _Progress:
    """A one-line progress bar on a terminal; periodic log lines otherwise (CI logs, pipes)."""

    def __init__(self, label: str, steps: int):
        self.label, self.steps = label, steps
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, log_every: int) -> None:
        if self.tty:
            done = int(30 * (step + 1) / self.steps)
            sys.stdout.write(f"\r  [{self.label:<10}] [{'#' * done}{'.' * (30 - done)}] {step + 1}/{self.steps} loss {loss:.4f}")
            sys.stdout.flush()
        elif log_every and (step % log_every == 0 or step == self.steps - 1):
            print(f"  [{self.label}] step {step:4d}  loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def train_compare(steps: int = 60, n: int = 4, d: int = 64, layers: int = 4, batch: int = 16, seq: int = 64,
                  lr: float = 3e-3, inner_backend: str = "inductor", seed: int = 0, log_every: int = 10,
                  modes: tuple[str, ...] = ("residual", "mhc"), out_dir: str | None = None,
                  device: str | None = None) -> list[RunResult]:
    """Train the same initial TinyGPT with plain residuals and with each mHC mode, on the same batches.

    "residual" compiles the unmodified model with ``inner_backend``; "mhc" / "hc" go through
    ``backend="mhc"`` with that mode. With ``out_dir``, writes losses.csv, loss curves and, for the mHC
    modes, the gain / H_res plots of the trained models (paper Fig. 3, 7, 8).
    """
    import mhc_compile
    from mhc_compile.backend import REPORTS

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = stdlib_text()
    print(f"data: {data.numel():,} bytes of Python standard-library source; model: TinyGPT d={d} layers={layers}; "
          f"device {device}")
    torch.manual_seed(seed)
    init_state = TinyGPT(d=d, layers=layers, seq=seq).state_dict()
    results, trained = [], {}
    for mode in modes:
        model = TinyGPT(d=d, layers=layers, seq=seq)
        model.load_state_dict(init_state)
        model.to(device)
        if mode == "residual":
            step = torch.compile(model, backend="inductor" if inner_backend == "inductor" else inner_backend)
            label = "residual"
        else:
            options = {"n": n, "mode": mode, "inner_backend": inner_backend}
            start = len(REPORTS)
            mhc_compile.prepare(model, torch.zeros(batch, seq, dtype=torch.long, device=device), **options)
            for report in REPORTS[start:]:
                for line in report.sites:
                    print(f"  rewrote residual site {line}")
            added = mhc_compile.mhc_parameters(model)
            print(f"  added {len(added)} mHC parameter tensors ({sum(p.numel() for p in added):,} values) at n={n}, mode={mode}")
            step = torch.compile(model, backend="mhc", options=options)
            label = f"{mode} n={n}"
        results.append(train(model, step, label, steps, batch, seq, lr, seed, log_every, data, device))
        trained[mode] = (model, step)
    if out_dir:
        write_outputs(out_dir, results, trained, data, batch, seq, seed)
    return results


def write_outputs(out_dir: str, results: list[RunResult], trained: dict, data, batch: int, seq: int, seed: int) -> None:
    """losses.csv, loss_curves.png and, per mHC mode, gains / H_res heatmaps / divergence plots."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "losses.csv"), "w") as f:
        f.write("step," + ",".join(r.label for r in results) + "\n")
        for i in range(len(results[0].losses)):
            f.write(f"{i}," + ",".join(f"{r.losses[i]:.6f}" for r in results) + "\n")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("  matplotlib is not installed: wrote losses.csv only (pip install matplotlib for the plots)")
        return
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for r in results:
        ax.plot(r.losses, label=r.label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.legend()
    fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=120)
    from mhc_compile import diagnostics

    x, _ = next(batches(data, batch, seq, torch.Generator().manual_seed(seed + 1)))
    x = x.to(next(iter(trained.values()))[0].head.weight.device)
    for mode, (_, step) in trained.items():
        if mode == "residual":
            continue
        diag = diagnostics.collect(step, x)
        diagnostics.plot_gains(diag, os.path.join(out_dir, f"gains_{mode}.png"))
        diagnostics.plot_h_res_heatmaps(diag, os.path.join(out_dir, f"h_res_{mode}.png"))
        diagnostics.plot_divergence(diag, os.path.join(out_dir, f"divergence_{mode}.png"))
        with open(os.path.join(out_dir, f"diagnostics_{mode}.txt"), "w") as f:
            f.write(diag.summary() + "\n")
        print(f"  {mode}: composite gain fwd {float(diag.composite_fwd[-1]):.3g}, bwd {float(diag.composite_bwd[-1]):.3g}")
    print(f"  wrote losses, loss curves and gain plots to {out_dir}")


def summarize(results: list[RunResult], tail: int = 10) -> str:
    lines = [f"{'run':<12} {'params':>10} {'first loss':>11} {'last-' + str(tail) + ' mean':>13} {'time s':>8}"]
    for r in results:
        last = sum(r.losses[-tail:]) / len(r.losses[-tail:])
        lines.append(f"{r.label:<12} {r.parameters:>10,} {r.losses[0]:>11.4f} {last:>13.4f} {r.seconds:>8.1f}")
    return "\n".join(lines)


def bits_per_byte(loss: float) -> float:
    return loss / math.log(2)
