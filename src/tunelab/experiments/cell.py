"""Entry point of one grid cell in its own process: ``python -m tunelab.experiments.cell RUN_DIR RUN_ID``.

The parent writes ``RUN_DIR/.work/RUN_ID/cell.json``; this process trains and evaluates the cell and writes
``RUN_DIR/results/RUN_ID.json`` atomically. A user mistake prints ``error: <message>`` and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunelab.errors import TunelabError


def main(argv: list[str]) -> int:
    from tunelab.experiments.runner import run_cell
    from tunelab.experiments.spec import Cell
    from tunelab.utils import atomic_write_json

    run_dir, run_id = Path(argv[0]), argv[1]
    cell = Cell.model_validate_json((run_dir / ".work" / run_id / "cell.json").read_text())
    try:
        result = run_cell(cell, run_dir, progress=sys.stderr.isatty() or sys.stdout.isatty())
    except TunelabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    atomic_write_json(run_dir / "results" / f"{run_id}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
