"""SM clock and power draw while a block of GPU work runs, sampled by nvidia-smi in the background.

Why benchmarks report them: on an H200 the training step holds the GPU at its 700 W power cap, and there the
SM clock sits near 1.5 GHz; kernel benchmarks run at 1.98 GHz (benchmarks/results/session8-2026-12-02-h200.md).
Kernels bound by DRAM bandwidth do not notice. Kernels bound by latency, issue rate or shared memory slow with
the clock. A time is comparable with another run's only at a like clock.

    with ClockLog() as clocks:
        ...GPU work...
    clocks.summary()   # {"sm_mhz": median, "sm_mhz_p10": ..., "watts": median, "samples": n}, or None

Where nvidia-smi reports them, the log also keeps why the clock is where it is: NVML's clock event reasons (a bit
mask a sample; older drivers call them throttle reasons), summarised as each reason's share of the busy samples.
Session 27's kernel table ran proj's backward at 1800 MHz drawing 519 W, under the 700 W cap, with the byte-bound
rows at 1980 MHz; the reasons say which limit that was.

Without nvidia-smi (a CPU machine, a container without it) the log is empty and ``summary()`` is None.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw"
# the clock event reasons' field, by its name since driver 535 and by its older one
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
# NVML's clock event reason bits; 0x1 (the GPU idle) is left out
REASONS = {0x2: "app clocks", 0x4: "SW power cap", 0x8: "HW slowdown", 0x10: "sync boost", 0x20: "SW thermal",
           0x40: "HW thermal", 0x80: "HW power brake", 0x100: "display clocks"}
SHOWN_SHARE = 0.1  # a reason active in fewer of the busy samples than this is left out of the summary


def _mask(text: str) -> int | None:
    """The reasons' bit mask nvidia-smi prints ("0x0000000000000004"), or None ("[N/A]", "Not Supported")."""
    text = text.strip()
    try:
        return int(text, 16) if text.lower().startswith("0x") else None
    except ValueError:
        return None


def parse(text: str) -> list[tuple]:
    """(SM MHz, watts) per line of ``nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits``,
    and (SM MHz, watts, reasons' mask or None) where the query had the reasons' field too; lines that do not start
    with two numbers ("[N/A]", a header, a cut-off last line) are skipped."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (2, 3):
            continue
        try:
            pair = (float(parts[0]), float(parts[1]))
        except ValueError:
            continue
        samples.append(pair if len(parts) == 2 else pair + (_mask(parts[2]),))
    return samples


def summarize(samples: list[tuple], busy_watts: float = 0.0) -> dict | None:
    """Median and 10th percentile of the SM clock and the median power over the samples drawing more than
    ``busy_watts`` (to leave out idle gaps); None when there are none. Where the samples carry the reasons' mask:
    ``reasons``, each reason's share of those samples (at least SHOWN_SHARE), largest first."""
    busy = [s for s in samples if s[1] > busy_watts]
    if not busy:
        return None
    mhz = sorted(s[0] for s in busy)
    out = {"sm_mhz": statistics.median(mhz), "sm_mhz_p10": mhz[len(mhz) // 10],
           "watts": statistics.median(s[1] for s in busy), "samples": len(busy)}
    masks = [s[2] for s in busy if len(s) > 2 and s[2] is not None]
    if masks:
        shares = {name: sum(bool(m & bit) for m in masks) / len(masks) for bit, name in REASONS.items()}
        known = sum(REASONS) | 0x1  # newer drivers add bits (board limit, reliability): counted as "other"
        shares["other"] = sum(bool(m & ~known) for m in masks) / len(masks)
        out["reasons"] = dict(sorted(((k, v) for k, v in shares.items() if v >= SHOWN_SHARE), key=lambda kv: -kv[1]))
    return out


def _device_selector() -> list[str]:
    """nvidia-smi's -i for the current CUDA device, by UUID (CUDA_VISIBLE_DEVICES renumbers devices, UUIDs stay)."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except Exception:  # no CUDA, or a torch without the property: nvidia-smi then reports every GPU
        return []
    return ["-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"]


_REASON_FIELD: dict[str, str | None] = {}  # nvidia-smi -> the reasons' field it answers, or None: asked once


def reason_field(exe: str) -> str | None:
    """The name under which this nvidia-smi reports the clock event reasons, or None where it reports neither (an
    unknown field fails the whole query, so the sampler asks for it only once it is known to work)."""
    if exe not in _REASON_FIELD:
        _REASON_FIELD[exe] = None
        for field in REASON_FIELDS:
            try:
                proc = subprocess.run([exe, f"--query-gpu={field}", "--format=csv,noheader,nounits",
                                       *_device_selector()], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                break
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines and _mask(lines[0]) is not None:
                _REASON_FIELD[exe] = field
                break
    return _REASON_FIELD[exe]


class ClockLog:
    """Samples the SM clock, power and (where reported) the clock event reasons every ``interval_ms`` while the
    ``with`` block runs."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []
        self._proc = None

    def __enter__(self) -> ClockLog:
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            field = reason_field(exe)
            query = QUERY + (f",{field}" if field else "")
            cmd = [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", str(self.interval_ms),
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
    """'1485 MHz (p10 1440), 692 W' for a table cell, then the reasons' shares where sampled ('...; SW power cap
    90 %', or '...; no clock limit' where none reached SHOWN_SHARE); '' when nothing was sampled."""
    if summary is None:
        return ""
    text = f"{summary['sm_mhz']:.0f} MHz (p10 {summary['sm_mhz_p10']:.0f}), {summary['watts']:.0f} W"
    if "reasons" in summary:
        text += "; " + (", ".join(f"{k} {100 * v:.0f} %" for k, v in summary["reasons"].items()) or "no clock limit")
    return text
