"""SM clock and power draw while a block of GPU work runs, sampled by nvidia-smi in the background.

Why benchmarks report them: on an H200 the training step holds the GPU at its 700 W power cap, and there the
SM clock sits near 1.5 GHz; kernel benchmarks run at 1.98 GHz (benchmarks/results/session8-2026-12-02-h200.md).
Kernels bound by DRAM bandwidth do not notice. Kernels bound by latency, issue rate or shared memory slow with
the clock. A time is comparable with another run's only at a like clock.

    with ClockLog() as clocks:
        ...GPU work...
    clocks.summary()   # {"sm_mhz": median, "sm_mhz_p10": ..., "watts": median, "samples": n}, or None

Without nvidia-smi (a CPU machine, a container without it) the log is empty and ``summary()`` is None.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw"


def parse(text: str) -> list[tuple[float, float]]:
    """(SM MHz, watts) per line of ``nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits``;
    lines that are not two numbers ("[N/A]", a header, a cut-off last line) are skipped."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            samples.append((float(parts[0]), float(parts[1])))
        except ValueError:
            continue
    return samples


def summarize(samples: list[tuple[float, float]], busy_watts: float = 0.0) -> dict | None:
    """Median and 10th percentile of the SM clock and the median power over the samples drawing more than
    ``busy_watts`` (to leave out idle gaps); None when there are none."""
    busy = [s for s in samples if s[1] > busy_watts]
    if not busy:
        return None
    mhz = sorted(s[0] for s in busy)
    return {"sm_mhz": statistics.median(mhz), "sm_mhz_p10": mhz[len(mhz) // 10],
            "watts": statistics.median(s[1] for s in busy), "samples": len(busy)}


def _device_selector() -> list[str]:
    """nvidia-smi's -i for the current CUDA device, by UUID (CUDA_VISIBLE_DEVICES renumbers devices, UUIDs stay)."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except Exception:  # no CUDA, or a torch without the property: nvidia-smi then reports every GPU
        return []
    return ["-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"]


class ClockLog:
    """Samples the SM clock and power every ``interval_ms`` while the ``with`` block runs."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []
        self._proc = None

    def __enter__(self) -> ClockLog:
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            cmd = [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(self.interval_ms),
                   *_device_selector()]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self.samples = parse(out or "")
        self._proc = None

    def summary(self, busy_watts: float = 0.0) -> dict | None:
        return summarize(self.samples, busy_watts)


def describe(summary: dict | None) -> str:
    """'1485 MHz (p10 1440), 692 W' for a table cell; '' when nothing was sampled."""
    if summary is None:
        return ""
    return f"{summary['sm_mhz']:.0f} MHz (p10 {summary['sm_mhz_p10']:.0f}), {summary['watts']:.0f} W"
