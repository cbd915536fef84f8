"""``python -m tunelab`` is the ``tunelab`` command (what ``torchrun -m tunelab`` / ``accelerate launch -m tunelab`` start)."""

import sys

from tunelab.cli import main

if __name__ == "__main__":
    sys.exit(main())
