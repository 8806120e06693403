"""kill -9 at seeded random points of `safedpo sft` and `safedpo train`, then a rerun: the same
model, byte for byte, as an uninterrupted run, and DVCLive's files as if never interrupted.

The kills land inside file operations (tests/kill_driver.py): a checkpoint's weights or state
file half written, the swap of two checkpoints half done, DVCLive's metrics.json emptied or a
.tsv row cut, the final save's weights half written, the checkpoints half removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dvc_project import DVC, REPO, copy_project, run

PARAMS = {
    "dataset": {"toy": {"n_train": 128, "n_test": 32}},
    "model": {"tiny": {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
                       "num_layers": 1, "num_heads": 2, "num_kv_heads": 2}},
    "sft": {"epochs": 1, "batch_size": 16, "max_length": 96},
    # ~13 steps with a checkpoint every 2.
    "train": {"epochs": 1, "batch_size": 8, "max_length": 96, "checkpoint_every": 2},
}
KILLED = -signal.SIGKILL
CKPT = r"data/checkpoints/train/\.step-\d+\.tmp"


def _drive(project: Path, plan: list[dict]) -> list[dict]:
    (project / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kill_driver.py"), "plan.json", "results.json"],
        cwd=project, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((project / "results.json").read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "DVC_NO_ANALYTICS": "true"}


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_kill_at_random_points_then_rerun_gives_identical_outputs(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", PARAMS)
    sft_kills = [{"match": r"save_file:data/\.sft\.tmp/", "nth": 1},
                 {"match": r"open:data/\.sft\.tmp/.*training_summary", "nth": 1}]
    done = _drive(project, [
        *({"stage": s, "kill": None} for s in ("source", "download", "normalize", "sft")),
        {"snapshot": "data/sft", "to": "straight/sft"},
        {"remove": ["data/sft"]},
        *({"stage": "sft", "kill": k} for k in sft_kills),
        {"stage": "sft", "kill": None},
        {"stage": "ref-logps", "kill": None},
        {"stage": "train", "kill": None},
        {"snapshot": "data/policy", "to": "straight/policy"},
        {"snapshot": "dvclive", "to": "straight/dvclive"},
        {"remove": ["data/policy", "dvclive"]},
    ])
    assert [r["code"] for r in done] == [0, 0, 0, 0, KILLED, KILLED, 0, 0, 0], done
    assert _files(project / "data/sft") == _files(project / "straight/sft")
    assert not list((project / "data").glob(".sft*"))  # the killed runs' leftovers are gone

    # Where the uninterrupted run's checkpoints and writes fall decides the seeded plan.
    events = done[-1]["events"]
    assert not (project / "data/checkpoints/train").exists()
    saves = [e for e in events if re.match(rf"save_file:{CKPT}/", e)]
    assert len(saves) >= 5, saves
    rng = random.Random(25)
    third = [i for i, e in enumerate(events, 1) if re.match(rf"save_file:{CKPT}/", e)][2]
    kills = [
        {"match": ".", "nth": rng.randint(1, third)},  # any operation before the 3rd checkpoint
        {"match": rf"save_file:{CKPT}/", "nth": 1},  # a checkpoint's weights half written
        {"match": rng.choice([rf"torch\.save:{CKPT}/", rf"open:{CKPT}/trainer_state"]),
         "nth": 1},  # its optimizer state or its step record half written
        {"match": r"open:dvclive/metrics\.json", "nth": rng.randint(1, 4)},
        {"match": r"open:dvclive/plots/metrics/.*\.tsv", "nth": rng.randint(1, 20)},
        {"match": rf"rename:{CKPT} -> data/checkpoints/train/latest", "nth": 1},  # mid-swap
        {"match": r"save_file:data/\.policy\.tmp/", "nth": 1},  # the final save
        {"match": r"rmtree:data/checkpoints/train$", "nth": 1},  # after it
    ]
    killed = _drive(project, [{"stage": "train", "kill": k} for k in kills])
    assert [r["code"] for r in killed] == [KILLED] * len(kills), killed

    log = run([str(DVC), "repro", "--single-item", "train"], project)
    assert "Running stage 'train'" in log
    policy = _files(project / "data/policy")
    assert policy.keys() == _files(project / "straight/policy").keys()
    assert policy == _files(project / "straight/policy")  # model.safetensors included
    assert _files(project / "dvclive") == _files(project / "straight/dvclive")
    assert not (project / "data/checkpoints/train").exists()
    assert not [p.name for p in (project / "data").iterdir()
                if p.name.startswith(".") and p.name != ".gitignore"]
    shutil.rmtree(project / "straight")
