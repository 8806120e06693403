"""`dvc.yaml` and `pipeline/paths.py` declare the same artifact paths."""

from __future__ import annotations

from pathlib import Path

import yaml
from import_graph import closure

from pipeline import paths

REPO = Path(__file__).resolve().parents[1]


def _entries(items: list) -> set[str]:
    return {next(iter(i)) if isinstance(i, dict) else i for i in items or []}


def test_dvc_yaml_outs_are_the_declared_paths() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs: set[str] = set()
    for name, st in stages.items():
        body = st.get("do", st)
        items = [*_entries(body.get("outs")), *_entries(body.get("metrics")),
                 *_entries(body.get("plots"))]
        if "foreach" in st:
            items = [i.replace("${item}", tag) for i in items for tag in st["foreach"]]
        outs |= set(items)
        assert items, name
    declared = {str(p) for p in (
        paths.SOURCE_KEY, paths.MODEL_KEY, paths.RAW_TRAIN, paths.RAW_TEST, paths.SOURCE_JSON,
        paths.PAIRS_TRAIN, paths.PAIRS_TEST,
        paths.PAIRS_REPORT, paths.SFT_DIR, paths.REF_TRAIN, paths.REF_TEST, paths.POLICY_DIR,
        paths.JUDGE_DIR, paths.SUITES_PROMPTS, paths.SUITES_RECORD, paths.EVAL_METRICS,
        paths.EVAL_SCORES,
        paths.EVAL_TRADEOFF, paths.EVAL_CATEGORIES, paths.DVCLIVE_DIR / "metrics.json",
        paths.DVCLIVE_DIR / "plots" / "metrics", paths.THEORY_DIR / "curves.parquet",
        paths.THEORY_DIR / "convergence.png", paths.THEORY_DIR / "metrics.json",
        *(paths.generations_path(t) for t in paths.MODEL_TAGS))}
    assert outs == declared
    # Resumable checkpoints stay outside every declared out, so the DVC cache never copies them.
    assert not any(str(paths.CHECKPOINT_DIR).startswith(o) for o in outs)


def test_stage_commands_exist_in_the_cli() -> None:
    from typer.main import get_command

    from stages.cli import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for st in stages.values():
        cmd = st.get("do", st)["cmd"].split()
        if cmd[0] == LAUNCH:  # the training stages' launcher prefix (empty unless set)
            cmd = cmd[1:]
        assert cmd[0] == "safedpo" and cmd[1] in commands, cmd


#: What a cluster run sets to launch `sft` and `train` on every process (docs/training.md).
LAUNCH = "$SAFEDPO_LAUNCH"


def test_only_the_training_stages_take_a_launcher() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    launched = {name for name, st in stages.items()
                if st.get("do", st)["cmd"].startswith(f"{LAUNCH} ")}
    assert launched == {"sft", "train"}


def test_stage_deps_cover_every_project_module_the_stage_imports() -> None:
    """A change to any module a stage runs (config.py and artifacts.py included) reruns it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        body = st.get("do", st)
        seen = closure(f"stages/{name}.py")
        deps = set(body["deps"])
        assert seen <= deps, f"{name}: missing deps {sorted(seen - deps)}"
        stale = {d for d in deps if d.endswith(".py")} - seen
        assert not stale, f"{name}: lists modules it does not import: {sorted(stale)}"
