"""Studies across processes: several ``tunelab tune`` workers on one Optuna study (issue 17).

- Two worker *processes started together* on the default SQLite storage finish a study of 4 trials:
  trial numbers 0..3 each ran once (one result file each, distinct run ids), none lost, and the
  spec's default configuration was enqueued once.
- The same against a real PostgreSQL server (Debian's ``postgresql`` package) that the test starts on
  127.0.0.1 with a temporary data directory and a free port — skipped, with the reason, when the
  server binaries or the ``psycopg`` driver are absent (``.ci/run`` installs both).
- A worker killed mid-trial (SIGKILL) loses only that trial: with heartbeats every second, the next
  worker marks it FAILED and runs it again with the same values (``RetryFailedTrialCallback``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

SPEC = """name: study
output_dir: {runs}
model: {{name: '{model}'}}
method: {{name: lora, options: {{r: 4}}}}
data: {{tasks: [summarization], domain: medical, train_size: 8, eval_size: 4, test_size: 2}}
train: {{max_steps: 4, batch_size: 4, eval_every: 2, learning_rate: 1.0e-3}}
eval: {{max_new_tokens: 4, latency_batches: 0}}
search:
  metric: eval_loss
  direction: minimize
  params:
    train.learning_rate: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}
    method.options.r: {{type: int, low: 2, high: 8}}
  pruning: {{enabled: false}}
"""


def _spec(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(SPEC.format(runs=tmp_path / "runs", model=model))
    return path


def _worker(config: Path, trials: int, storage: str | None = None, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tunelab", "tune", str(config), "--trials", str(trials)]
    command += ["--storage", storage] if storage else []
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def _check_two_workers(tmp_path: Path, model: Path, storage: str | None) -> None:
    config = _spec(tmp_path, model)
    workers = [_worker(config, 2, storage), _worker(config, 2, storage)]
    for process in workers:
        _finish(process)
    url = storage or f"sqlite:///{(tmp_path / 'runs' / 'study' / 'tune.db').resolve()}"
    trials = optuna.load_study(study_name="study", storage=url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # nothing lost, nothing extra
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    run_ids = [t.user_attrs["run_id"] for t in trials]
    assert len(set(run_ids)) == 4  # no trial ran twice
    written = sorted(p.stem for p in (tmp_path / "runs" / "study" / "trials").glob("*.json"))
    assert written == sorted(run_ids)
    assert sum(bool(t.user_attrs.get("default")) for t in trials) == 1


def test_two_workers_share_a_sqlite_study(tmp_path, small_model_dir):
    _check_two_workers(tmp_path, small_model_dir, None)


def test_a_killed_worker_loses_only_its_running_trial(tmp_path, small_model_dir):
    config = _spec(tmp_path, small_model_dir)
    fast = {"TUNELAB_TUNE_HEARTBEAT_S": "1"}
    killed = _worker(config, 2, **fast, TUNELAB_KILL_AT_STEP="4")  # SIGKILLs itself at step 4 of trial 0
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    time.sleep(2.5)  # past the grace period (2 heartbeats) of its last heartbeat
    _finish(_worker(config, 2, **fast))
    url = f"sqlite:///{(tmp_path / 'runs' / 'study' / 'tune.db').resolve()}"
    trials = sorted(optuna.load_study(study_name="study", storage=url).trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.COMPLETE]
    retry = trials[1]
    assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == trials[0].params  # the lost trial ran again with its values


# ----------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server's commands as the `postgres` user then."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as a non-root user")
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (temporary data directory, free port, trust auth)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL server binaries absent (apt-get install postgresql; .ci/run does)")
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3 (2.0: psycopg2)
    pytest.importorskip("psycopg", reason="the psycopg driver is absent (pip install 'psycopg[binary]')")
    bin_dir = Path(found[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres",
                                 "--auth=trust"]), check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={data}"
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-w",
                                 "-l", str(data / "log"), "start"]), check=True, capture_output=True)
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(tmp_path, small_model_dir, postgres_url):
    _check_two_workers(tmp_path, small_model_dir, postgres_url)


def test_postgres_fixture_reports_json_roundtrip(postgres_url):
    """The server really is PostgreSQL (a sanity check of the fixture, independent of tunelab)."""
    import psycopg

    with psycopg.connect(postgres_url) as connection, connection.cursor() as cursor:
        cursor.execute("select version(), %s::jsonb", (json.dumps({"a": 1}),))
        version, value = cursor.fetchone()
    assert version.startswith("PostgreSQL") and value == {"a": 1}


def test_the_enqueue_lock_serialises_workers(tmp_path):
    """Two workers opening a new study at once both enqueued the default trial (Optuna's check-then-insert
    is not atomic); run_trials now checks and enqueues under a flock that a second holder waits for."""
    import threading

    from tunelab.experiments.rundir import file_lock

    entered = threading.Event()

    def second() -> None:
        with file_lock(tmp_path / "run" / ".tune.lock"):
            entered.set()

    with file_lock(tmp_path / "run" / ".tune.lock"):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3)  # blocked while the first holder is inside
    thread.join(5)
    assert entered.is_set()  # and let in once it left
