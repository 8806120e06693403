"""DVC stage `ref_logps`: reference (SFT) log-probs of every response -> data/ref_logps/."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import paths
from pipeline.artifacts import read_parquet
from pipeline.config import load_params
from pipeline.encoding import TruncationStats
from pipeline.logps import pair_logps
from pipeline.modeling import load_for_scoring
from pipeline.precision import device
from pipeline.reference import REFERENCE_WEIGHTS, fingerprint_for, write_reference


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    on = device()
    mp = params.train.mixed_precision
    # As training scores: fp32 weights (model.dtype is for generate/evaluate only).
    model, encoder = load_for_scoring(paths.SFT_DIR, "sft", dtype=REFERENCE_WEIGHTS,
                                      max_length=params.train.max_length, device=on)
    encoder.require_room("train.max_length")
    for split, src, dest in (("train", paths.PAIRS_TRAIN, paths.REF_TRAIN),
                             ("test", paths.PAIRS_TEST, paths.REF_TEST)):
        pairs = read_parquet(src)
        t0 = time.perf_counter()
        stats = TruncationStats()
        ref = pair_logps(model, encoder, pairs, params.ref_logps.batch_size, on, mp, stats,
                         desc=f"ref log-probs {split}", max_tokens=params.ref_logps.max_tokens)
        write_reference(ref, fingerprint_for(paths.SFT_DIR, encoder, mp, pairs, on), dest, stats)
        print(f"ref_logps: {split}: {len(ref)} pairs in {time.perf_counter() - t0:.1f}s; "
              f"{stats.describe()} at max_length {encoder.max_length} -> {dest}")
        warning = stats.warning(f"{split} pairs", "train.max_length", encoder.max_length)
        if warning:
            print(f"ref_logps: {warning}")
