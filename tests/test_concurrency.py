"""`safedpo compare` beside a running pipeline: it queues experiments with `dvc exp run --queue
-S`, which writes the set params into the workspace's params.yaml for a moment, so it refuses
while `dvc repro` or a stage command runs in the project, and leaves params.yaml untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from dvc_project import BIN, DVC, copy_project
from signals import ctrl_c_reaches_it

from pipeline import paths
from pipeline.repolock import _held, running_dvc_stages

# A `theory` stage that runs for minutes (it is stopped once compare has been refused).
LONG = {"theory": {"steps": 2_000_000}}


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "true", "OMP_NUM_THREADS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 180
    while not cond():
        assert proc.poll() is None, f"{what}: exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{what}: timed out"
        time.sleep(0.2)


def _compare(project: Path) -> tuple[int, list[str]]:
    proc = subprocess.run([str(BIN / "safedpo"), "compare"], cwd=project, env=_env(),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.strip()]


def _stop(proc: subprocess.Popen, sig: signal.Signals) -> int:
    """`sig` to the process group, as a terminal's Ctrl-C reaches dvc and its stage."""
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def test_compare_refuses_beside_a_running_dvc_repro_or_stage(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", LONG)
    params = (project / "params.yaml").read_bytes()

    repro = subprocess.Popen([str(DVC), "repro", "theory"], cwd=project, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, preexec_fn=ctrl_c_reaches_it)
    try:
        # DVC releases its repository lock while the stage's command runs; its rwlock names it.
        _wait_for(lambda: running_dvc_stages(project), repro, "dvc repro")
        _wait_for(lambda: _held(project / paths.STAGE_LOCK), repro, "the stage command")
        code, err = _compare(project)
    finally:
        _stop(repro, signal.SIGINT)
    assert not _held(project / paths.STAGE_LOCK)  # the stage ended with dvc
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("safedpo: error: safedpo compare edits params.yaml, and "), err
    assert "running" in err[0] and "wait for it to end" in err[0], err
    assert (project / "params.yaml").read_bytes() == params
    assert not running_dvc_stages(project)

    # A stage command run by hand shows in none of DVC's locks: its own lock tells.
    stage = subprocess.Popen([str(BIN / "safedpo"), "theory"], cwd=project, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _wait_for(lambda: _held(project / paths.STAGE_LOCK), stage, "safedpo theory")
        code, err = _compare(project)
    finally:
        stopped = _stop(stage, signal.SIGTERM)
    assert code == 2 and err == ["safedpo: error: safedpo compare edits params.yaml, and a "
                                 "safedpo stage command is running in this project; wait for "
                                 "it to end"], err
    assert (project / "params.yaml").read_bytes() == params
    # Terminated: one line, exit 143, no out.
    assert stopped == 143
    assert [ln for ln in stage.stderr.read().splitlines() if ln.startswith("safedpo")] == [
        "safedpo: terminated"]
    assert not (project / paths.THEORY_METRICS).exists()
    assert not _held(project / paths.STAGE_LOCK)


def test_dvc_locks_are_read_as_dvc_writes_them(tmp_path: Path) -> None:
    """Between two stages `dvc repro` holds DVC's repository lock (an flock, zc.lockfile);
    while a stage runs, its rwlock names the dvc process. Dead pids are stale entries."""
    import fcntl
    import json

    import pytest

    from pipeline.errors import UserError
    from pipeline.repolock import exclusive

    (tmp_path / ".dvc/tmp").mkdir(parents=True)
    with exclusive("safedpo compare", tmp_path):
        pass
    dead = subprocess.run(["true"]).returncode or 2 ** 22 + 7  # no such pid
    (tmp_path / paths.DVC_RWLOCK).write_text(json.dumps({
        "read": {"data/sft": [{"pid": dead, "cmd": "dvc repro old"}]},
        "write": {"data/policy": {"pid": os.getpid(), "cmd": "dvc repro train"}}}))
    with pytest.raises(UserError, match=rf"running a stage in this project \(pid {os.getpid()}: "
                                        r"dvc repro train\); wait"), \
            exclusive("safedpo compare", tmp_path):
        pass
    (tmp_path / paths.DVC_RWLOCK).write_text('{"read": {}, "write": {}}')
    with open(tmp_path / paths.DVC_LOCK, "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=r"a dvc command holds this project's lock"), \
                exclusive("safedpo compare", tmp_path):
            pass
    with exclusive("safedpo compare", tmp_path):
        pass
