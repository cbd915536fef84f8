"""Entry point of one grid cell in its own process: ``python -m tunelab.experiments.cell RUN_DIR RUN_ID KEY``.

The parent writes ``RUN_DIR/.work/RUN_ID/cell.json``; this process trains and evaluates the cell, writes
``RUN_DIR/results/RUN_ID.json`` atomically, then removes its scratch folder. A user mistake prints
``error: <message>`` and exits 2, any other exception prints its traceback and exits 1; both leave
``RUN_DIR/.work/RUN_ID/error.json`` (the exception's type and message) for the parent's failure record.
Ctrl-C exits 130 quietly (the parent prints how to resume).

The cell never outlives the parent: on Linux the kernel sends it SIGKILL when the parent dies
(``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog thread ends it once its parent process is gone
(the parent pid comes in ``TUNELAB_PARENT_PID``).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

from tunelab.errors import TunelabError

WATCHDOG_SECONDS = 1.0


def die_with_parent() -> None:
    """Arrange for this process to end when the process that started it ends."""
    expected = int(os.environ.get("TUNELAB_PARENT_PID", "0") or 0)
    if not expected:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != expected:  # the parent died before prctl took effect
        os._exit(137)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != expected:
                os._exit(137)

    threading.Thread(target=watch, name="tunelab-parent-watchdog", daemon=True).start()


def main(argv: list[str]) -> int:
    die_with_parent()
    from tunelab.experiments.runner import run_cell
    from tunelab.experiments.spec import Cell
    from tunelab.utils import atomic_write_json

    run_dir, run_id = Path(argv[0]), argv[1]
    key = argv[2] if len(argv) > 2 else None
    work = run_dir / ".work" / run_id
    cell = Cell.model_validate_json((work / "cell.json").read_text())
    try:
        result = run_cell(cell, run_dir, progress=sys.stderr.isatty() or sys.stdout.isatty(), key=key)
    except TunelabError as error:
        _record(work, error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the parent records it and goes on with the other cells
        traceback.print_exc()
        _record(work, error)
        return 1
    atomic_write_json(run_dir / "results" / f"{run_id}.json", result)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _record(work: Path, error: BaseException) -> None:
    """``error.json`` in the cell's scratch folder: what the parent writes into ``failed/<run>.json``."""
    from tunelab.utils import atomic_write_json

    try:
        atomic_write_json(work / "error.json", {"type": type(error).__name__, "message": str(error)})
    except OSError:
        pass  # the parent falls back to the exit code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
