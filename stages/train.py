"""DVC stage `train`: preference training for `train.objective` -> data/policy/, dvclive/."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.artifacts import read_parquet
from pipeline.config import load_params
from pipeline.preference import PreferenceDirs, run_preference


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    dirs = PreferenceDirs(sft=paths.SFT_DIR, reference=paths.REF_TRAIN, out=paths.POLICY_DIR,
                          live=paths.DVCLIVE_DIR, checkpoints=paths.CHECKPOINT_DIR)
    summary = run_preference(params.train, read_parquet(paths.PAIRS_TRAIN), dirs,
                             beta=params.beta, delta=params.delta)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    final = summary["final"]
    resumed = summary["resumed_from_step"]
    print(f"train: {summary['objective']} on {summary['pairs_trained']} pairs (kept "
          f"{summary['pairs_kept']}, swapped {summary['pairs_swapped']}, dropped "
          f"{summary['pairs_dropped']}, of which {summary['pairs_contradictory']} contradictory); "
          f"{summary['steps']} steps ({summary['layout']}"
          f"{f'; resumed from step {resumed}' if resumed else ''}) in "
          f"{summary['seconds']:.0f}s; loss {final.get('loss', float('nan')):.4f}, "
          f"reward accuracy {final.get('rewards/accuracies', float('nan')):.3f} -> "
          f"{paths.POLICY_DIR} ({summary['saved_dtype'].removeprefix('torch.')})")
    if summary["truncation_warning"]:
        print(f"train: {summary['truncation_warning']}")
