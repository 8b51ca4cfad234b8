"""Timing and memory on the device a run uses: the one place that knows CUDA and CPU differ here.

CUDA work is asynchronous, so a timer must synchronize before reading the clock; CUDA's allocator keeps a
resettable peak, while CPU has only the process-lifetime ``ru_maxrss`` (which would carry an earlier job's
peak into every later job of a multirun), so a CPU peak is reported as unavailable.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak so the next ``peak_memory_bytes`` covers only what ran since."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated bytes since ``reset_peak_memory`` on CUDA; None on CPU, where no per-run peak exists."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_model(device: torch.device) -> str:
    """The GPU's name or the CPU's model: what computed a run. Float rounding differs between them (which of two
    near-tied tokens a top-k keeps, which greedy token wins a near tie), and every speed figure does, so a run's
    identity names it. Asking CUDA for a name initialises it in this process; the launching process of a
    multi-GPU sweep therefore never asks (see ``kvbench.runner.prefill_group_key``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()
