"""What a result was measured on: the machine, torch, the commit, and the device chosen."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["machine_info", "pick_device"]


def pick_device(device: str | None = None) -> str:
    """``device`` as given, else "cuda" when a CUDA device is usable, else "cpu".

    Raises:
        ValueError: ``device`` names CUDA but none is available.
    """
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this torch sees no CUDA device; use --device cpu")
    return device


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    """CPU model, core counts, RAM, torch and thread settings, GPU (if used), commit and date."""
    model = cpu_model()
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import attnkit

    info = {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_bytes": mem_total,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "attnkit": attnkit.__version__,
        "git_commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return info
