"""DVC stage `sft`: supervised fine-tuning of the starting model -> data/sft/."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.artifacts import read_parquet
from pipeline.config import load_params
from pipeline.sft import run_sft


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    train = read_parquet(paths.PAIRS_TRAIN)
    test = read_parquet(paths.PAIRS_TEST)
    summary = run_sft(params.model, params.sft, train, test, paths.SFT_DIR)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under a launcher, the main process reports
        return
    saved = summary["saved_dtype"].removeprefix("torch.")
    if summary["enabled"]:
        cut = summary["truncation"]
        print(f"sft: {summary['examples']} examples ({cut['truncated']} truncated to "
              f"max_length), {summary['steps']} steps ({summary['layout']}) in "
              f"{summary['seconds']:.0f}s; held-out "
              f"loss {summary['heldout_loss_before']:.3f} -> {summary['heldout_loss_after']:.3f}"
              f" nats/token -> {paths.SFT_DIR} ({saved})")
    else:
        print(f"sft: disabled; passed {summary['source']} through -> {paths.SFT_DIR} ({saved})")
    print(f"sft: prompt template {summary['template_text']}")
    if summary.get("truncation_warning"):
        print(f"sft: {summary['truncation_warning']}")
