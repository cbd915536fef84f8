"""Helpers of the runner's CLI tests: run ``tunelab`` in-process and capture it; find a run's cell
subprocesses (Linux: reads /proc) for the Ctrl-C and kill tests."""

from __future__ import annotations

from pathlib import Path

from tunelab.cli import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``tunelab ARGS`` run in this process."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


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
