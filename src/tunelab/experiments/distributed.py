"""Which process am I? The runner's view of a data-parallel launch (``torchrun`` / ``accelerate launch``).

Under a launcher every process runs the whole experiment: all of them train each cell together (DDP,
:mod:`tunelab.train.loop`), and only the main one (``RANK`` 0) holds the run-directory lock, evaluates,
and writes results, adapters and reports. These helpers read the launcher's environment
(``RANK``, ``WORLD_SIZE``) so that nothing initialises a process group before training needs one.
"""

from __future__ import annotations

import os

from tunelab.errors import TunelabError


def world_size() -> int:
    """Processes in this launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on the process that writes (rank 0), and always without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of the launch (a no-op in one process)."""
    if world_size() > 1:
        from accelerate.state import PartialState

        PartialState().wait_for_everyone()


class NoLock:
    """The run lock of a non-main rank: the main process holds the real one."""

    def acquire(self) -> NoLock:
        return self

    def release(self) -> None:
        return None


class LaunchFailed(TunelabError):
    """A process of a data-parallel launch failed or was killed: exit code 1, resumable."""

    exit_code = 1


def relaunch(processes: int, arguments: list[str]) -> None:
    """Run ``tunelab <arguments>`` in ``processes`` data-parallel processes (``torchrun --standalone``).

    torchrun stops every process when one fails or is killed. A rank's own one-line error (a user
    mistake) is raised as it is (exit code 2); otherwise :class:`LaunchFailed` says how to continue (a
    rerun resumes each cell from its last checkpoint).
    """
    import subprocess
    import sys

    import torch

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "tunelab", *arguments]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # DDP over gloo on CPU
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    user_error = None
    for line in process.stderr:  # pass the processes' messages through; remember a rank's one-line error
        sys.stderr.write(line)
        if line.startswith("error: "):
            user_error = user_error or line.removeprefix("error: ").strip()
    code = process.wait()
    if code in (130, -2):
        raise KeyboardInterrupt
    if code != 0 and user_error is not None:
        raise TunelabError(user_error)
    if code != 0:
        raise LaunchFailed(f"a process of the {processes}-process launch failed or was killed (exit code {code}; "
                           "details above); rerun the same command to continue from the last checkpoint")
