"""`safedpo results`: the main-table comparison across objectives (not a DVC stage)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import paths
from pipeline.config import load_params
from pipeline.results import default_variants, run_comparison


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = run_comparison(params, default_variants(params.delta), paths.RESULTS_DIR, device)
    print((paths.RESULTS_MARKDOWN).read_text())
    print(f"results: {len(table)} rows -> {paths.RESULTS_DIR}/")
