"""Finding the runner's cell subprocesses of a run (Linux: reads /proc), for the Ctrl-C and kill tests."""

from __future__ import annotations

from pathlib import Path


def cell_processes(run_dir: Path) -> list[int]:
    """PIDs of the live `tunelab.experiments.cell` processes whose command line names ``run_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"tunelab.experiments.cell" in cmdline and str(run_dir).encode() in cmdline:
                found.append(int(entry.name))
    return found
