"""Run stage commands and SIGKILL them at chosen file operations (tests/test_kill_resume.py).

    python tests/kill_driver.py PLAN.json RESULTS.json

PLAN is a list of steps run one after the other in the current folder: a run
`{"stage": "train", "kill": {"match": REGEX, "nth": N} | null}`, `{"snapshot": DIR, "to": DEST}`
(a copy) or `{"remove": [DIR, ...]}`. Every file operation of a run is an event
written `kind:path` (`open` for writing, `torch.save`, `save_file` for safetensors, `rename`,
`rmtree`); the run is killed with SIGKILL at the N-th event matching REGEX, *inside* the
operation where that can be: an `open` has truncated the file and its first write lands half
before the kill, a `save_file` or `torch.save` leaves half its file, a `rename` or `rmtree`
has not happened yet. RESULTS gets each run's exit code (-9: killed) and its events.

The heavy imports happen once here, and each run is a forked child: a run costs its compute,
not the ~5 s of importing torch and transformers again. The hooks are installed before those
imports because transformers and accelerate bind `safetensors.torch.save_file` when imported.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

_open = builtins.open
_STATE: dict[str, Any] = {"kill": None, "seen": 0, "events": []}


def _rel(path: object) -> str:
    p = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    try:
        return os.path.relpath(p)
    except ValueError:
        return p


def _hit(kind: str, *paths: object) -> bool:
    """Record the event; True if it is the one to die at."""
    text = f"{kind}:" + " -> ".join(_rel(p) for p in paths)
    _STATE["events"].append(text)
    kill = _STATE["kill"]
    if kill is None or not re.search(kill["match"], text):
        return False
    _STATE["seen"] += 1
    return _STATE["seen"] == kill["nth"]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _halve(path: object) -> None:
    size = os.path.getsize(path)
    with _open(path, "r+b") as f:
        f.truncate(size // 2)
    _die()


class _Torn:
    """A file whose first write lands half, then the process dies."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> None:
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        _die()

    def close(self) -> None:
        self._f.flush()
        _die()

    def __enter__(self) -> _Torn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _open_hook(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    f = _open(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
            and _hit("open", file):
        return _Torn(f)
    return f


def _wrap_rename(orig: Any, kind: str) -> Any:
    def hook(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if _hit(kind, src, dst):
            _die()
        return orig(src, dst, *args, **kwargs)
    return hook


def _wrap_rmtree(orig: Any) -> Any:
    def hook(path: Any, *args: Any, **kwargs: Any) -> Any:
        if _hit("rmtree", path):
            _die()
        return orig(path, *args, **kwargs)
    return hook


def _wrap_save(orig: Any, kind: str, path_arg: int) -> Any:
    def hook(*args: Any, **kwargs: Any) -> Any:
        path = args[path_arg] if len(args) > path_arg else kwargs.get("filename",
                                                                        kwargs.get("f"))
        out = orig(*args, **kwargs)
        if isinstance(path, (str, os.PathLike)) and _hit(kind, path):
            _halve(path)
        return out
    return hook


def install() -> None:
    builtins.open = io.open = _open_hook
    os.replace = _wrap_rename(os.replace, "rename")
    os.rename = _wrap_rename(os.rename, "rename")
    shutil.rmtree = _wrap_rmtree(shutil.rmtree)
    import safetensors.torch
    import torch

    safetensors.torch.save_file = _wrap_save(safetensors.torch.save_file, "save_file", 1)
    torch.save = _wrap_save(torch.save, "torch.save", 1)


def main(plan_path: str, results_path: str) -> None:
    install()
    import dvclive  # noqa: F401  (imported by the stage only when it logs)
    import stages.sft
    import stages.train  # noqa: F401
    from stages.cli import main as cli_main

    plan = json.loads(Path(plan_path).read_text())
    results = []
    for run in plan:
        if "snapshot" in run:  # copy a folder aside, in this (parent) process
            shutil.copytree(run["snapshot"], run["to"], dirs_exist_ok=False)
            continue
        if "remove" in run:
            for p in run["remove"]:
                shutil.rmtree(p, ignore_errors=True)
            continue
        out = Path(results_path).with_suffix(".run.json")
        pid = os.fork()
        if pid == 0:
            _STATE.update(kill=run["kill"], seen=0, events=[])
            code = 0
            sys.argv = ["safedpo", run["stage"]]
            try:
                cli_main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            with _open(out, "w") as f:
                json.dump(_STATE["events"], f)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        events = json.loads(out.read_text()) if code != -signal.SIGKILL else None
        out.unlink(missing_ok=True)
        results.append({"stage": run["stage"], "kill": run["kill"], "code": code,
                        "events": events})
        with _open(results_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
