"""What a cell was measured on, recorded in its result: the device (type, name, training processes,
usable cores, torch threads), library versions and the git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from tunelab.experiments import distributed


def device_info(model) -> dict:
    """What this cell's time was measured on: the model's device type and name, the training processes
    (data-parallel world size), the cores this process may use and torch's threads (the cost's context)."""
    device = next(model.parameters()).device
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    info = {"type": device.type, "name": cpu_name() if device.type == "cpu" else "",
            "processes": distributed.world_size(), "cpu_count": cores, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's processor or machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import transformers

    import tunelab

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tunelab": tunelab.__version__}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.getcwd())
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
