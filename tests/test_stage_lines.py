"""Modules follow the stage lines: an edit to a preference objective or loss never reruns SFT
(hours of GPU time at 7B), and the library has no import cycle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvc_project import DVC, copy_project, run, stages_run
from import_graph import REPO, closure, project_imports

#: What only preference training reads: none of it may be in the `sft` stage's import graph.
PREFERENCE_ONLY = ("pipeline/objectives.py", "pipeline/losses.py", "pipeline/reference.py",
                   "pipeline/preference.py")


def test_sft_imports_nothing_preference_only() -> None:
    sft = closure("stages/sft.py", ("pipeline",))
    assert "pipeline/sft.py" in sft and "pipeline/training.py" in sft
    assert not sft & set(PREFERENCE_ONLY), sorted(sft & set(PREFERENCE_ONLY))
    # The preference stage does read them all: the split is real, not a missing dependency.
    assert set(PREFERENCE_ONLY) <= closure("stages/train.py", ("pipeline",))


def test_the_library_has_no_import_cycle() -> None:
    """Function-local imports count: one that dodges a cycle at import time is still a cycle
    between the ideas."""
    graph = {str(p.relative_to(REPO)): project_imports(p, ("pipeline",))
             for p in sorted((REPO / "pipeline").glob("*.py"))}
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(mod):], mod]))
        if mod in done:
            return
        for dep in sorted(graph.get(mod, ())):
            visit(dep, [*path, mod])
        done.add(mod)

    for mod in graph:
        visit(mod, [])
    assert len(done) == len(graph) > 30


def test_no_library_module_imports_a_stage() -> None:
    for p in sorted((REPO / "pipeline").glob("*.py")):
        assert not project_imports(p, ("stages",)), p.name


# The default pipeline made small: a 1-layer model, 1 epoch of SFT, 4 preference steps.
SMALL = {
    "dataset": {"toy": {"n_train": 128, "n_test": 32}},
    "model": {"tiny": {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
                       "num_layers": 1, "num_heads": 2, "num_kv_heads": 2}},
    "sft": {"epochs": 1, "batch_size": 16, "max_length": 96},
    "train": {"epochs": 1, "batch_size": 32, "max_length": 96},
}


@pytest.mark.slow
@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed here")
def test_editing_an_objective_or_a_loss_reruns_train_but_not_sft(tmp_path: Path) -> None:
    """`dvc status` after `dvc repro train` and an edit: the stages it makes stale."""
    project = copy_project(tmp_path / "p", SMALL)
    assert {"sft", "ref_logps", "train"} <= stages_run(run([str(DVC), "repro", "train"], project))

    def stale() -> set[str]:
        status = json.loads(run([str(DVC), "status", "--json"], project, stdout_only=True))
        return {name for name, changes in status.items() if changes != ["always changed"]}

    # The stages not run yet (judge, generate, evaluate, theory) are stale throughout.
    before = stale()
    assert not before & {"source", "download", "normalize", "sft", "ref_logps", "train"}

    def stale_after_editing(module: str) -> set[str]:
        path = project / module
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        try:
            return stale() - before
        finally:
            path.write_text(original)

    assert stale_after_editing("pipeline/objectives.py") == {"train"}
    assert stale_after_editing("pipeline/losses.py") == {"train"}
    assert stale_after_editing("pipeline/reference.py") == {"ref_logps", "train"}
    # The loop both recipes run does rerun both: the status above sees module edits.
    assert stale_after_editing("pipeline/training.py") == {"sft", "train"}
    assert stale() == before
