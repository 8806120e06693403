"""Who holds the project: DVC's locks and the stage commands running in it.

`dvc repro` holds DVC's repository lock (`.dvc/tmp/lock`) while it plans and records, and
*releases* it while a stage's command runs; what records the running stage then is DVC's
`rwlock` (`.dvc/tmp/rwlock`: the pid and command line of each `dvc` process reading a stage's
deps and writing its outs). A stage command run by hand shows in neither, so every `safedpo`
stage command holds a shared lock of its own (`paths.STAGE_LOCK`) while it runs.

`safedpo compare` queues experiments with `dvc exp run --queue -S ...`, which writes the set
parameters into the workspace's params.yaml for a moment (DVC stashes the workspace with them):
a stage reading params.yaml then would train another objective into the workspace's outs.
So compare takes the stage lock exclusively for as long as it queues, and refuses while DVC's
lock, a running DVC stage or a stage command holds the project; a stage command started
meanwhile waits until the queueing is done.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import paths
from pipeline.errors import UserError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def running_dvc_stages(root: Path = Path()) -> list[str]:
    """The live processes DVC's rwlock names (`pid N: dvc repro ...`), or []."""
    try:
        data = json.loads((root / paths.DVC_RWLOCK).read_text())
    except (OSError, ValueError):
        return []
    found = set()
    for kind in ("read", "write"):
        entries = data.get(kind) if isinstance(data, dict) else None
        for info in (entries or {}).values():
            for one in info if isinstance(info, list) else [info]:
                pid = one.get("pid") if isinstance(one, dict) else None
                if isinstance(pid, int) and _alive(pid):
                    found.add(f"pid {pid}: {one.get('cmd', '?')}")
    return sorted(found)


def _held(path: Path) -> bool:
    """Whether another process holds an flock on `path` (DVC's repo lock is one, through
    zc.lockfile). Probing takes and drops it at once; a missing file is not held."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def _dvc_project(root: Path) -> bool:
    return (root / paths.DVC_RWLOCK).parent.parent.is_dir()


@contextmanager
def _lock_fd(root: Path) -> Iterator[int | None]:
    """The stage lock file, open, in a DVC project; None elsewhere (nothing to hold, and no
    `.dvc` folder is made: dvc would take it for a project)."""
    if not _dvc_project(root):
        yield None
        return
    path = root / paths.STAGE_LOCK
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def stage_lock(root: Path = Path()) -> Iterator[None]:
    """Held (shared) by a stage command while it runs, in a DVC project; waits while
    `exclusive` holds it."""
    with _lock_fd(root) as fd:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield


@contextmanager
def exclusive(what: str, root: Path = Path()) -> Iterator[None]:
    """Hold the project for `what` (a command that edits params.yaml), or refuse in one line
    while DVC or a stage holds it. Outside a DVC project there is nothing to hold; dvc itself
    then says so."""
    with _lock_fd(root) as fd:
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what} edits params.yaml, and a safedpo stage command is running "
                            "in this project; wait for it to end") from None
        running = running_dvc_stages(root)
        if running:
            raise UserError(f"{what} edits params.yaml, and DVC is running a stage in this "
                            f"project ({'; '.join(running)}); wait for it to end")
        if _held(root / paths.DVC_LOCK):
            raise UserError(f"{what} edits params.yaml, and a dvc command holds this "
                            f"project's lock ({paths.DVC_LOCK}); wait for it to end")
        yield
