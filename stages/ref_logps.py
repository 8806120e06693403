"""DVC stage `ref_logps`: reference (SFT) log-probs of every response -> data/ref_logps/."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline import paths
from pipeline.artifacts import read_parquet
from pipeline.config import load_params
from pipeline.modeling import load_pretrained
from pipeline.reference import compute_reference, fingerprint_for, write_reference


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(paths.SFT_DIR)
    model.to(device)
    max_length = params.train.max_length
    for split, src, dest in (("train", paths.PAIRS_TRAIN, paths.REF_TRAIN),
                             ("test", paths.PAIRS_TEST, paths.REF_TEST)):
        pairs = read_parquet(src)
        t0 = time.perf_counter()
        ref = compute_reference(model, tokenizer, pairs, max_length,
                                params.ref_logps.batch_size, device)
        write_reference(ref, fingerprint_for(paths.SFT_DIR, tokenizer, max_length, pairs), dest)
        print(f"ref_logps: {split}: {len(ref)} pairs in {time.perf_counter() - t0:.1f}s -> {dest}")
