"""Reference log-probs: computed once by the `ref_logps` stage, read (never recomputed) by
training and evaluation, and guarded by a fingerprint of everything they depend on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.artifacts import (
    frame_hash,
    read_parquet,
    read_parquet_metadata,
    weights_hash,
    write_parquet,
)
from pipeline.config import MixedPrecision
from pipeline.encoding import Encoder, TruncationStats
from pipeline.errors import UserError
from pipeline.precision import resolve_mixed_precision

REF_COLUMNS = ["pair_id", "logp_0", "logp_1", "ntok_0", "ntok_1"]
#: Reference log-probs are scored with the weights training has, fp32 master weights under the
#: training autocast, whatever `model.dtype` says for generation and evaluation.
REFERENCE_WEIGHTS = torch.float32


@dataclass(frozen=True)
class Fingerprint:
    """What reference log-probs depend on. Training and evaluation refuse ones that differ."""

    model: str
    tokenizer: str
    template: str
    max_length: int
    precision: str
    data: str
    # The dtype of the weights that scored (training's master weights are fp32): bf16 weights
    # shift step-0 DPO logits by ~1e-2 on a 3-layer model, more with depth and length.
    weights: str = "float32"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def mismatches(self, other: Fingerprint) -> list[str]:
        return [k for k, v in self.as_dict().items() if other.as_dict().get(k) != v]


def tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def pairs_hash(pairs: pd.DataFrame) -> str:
    """What the reference log-probs of a pairs table depend on: ids and texts."""
    return frame_hash(pairs, ["pair_id", "prompt", "response_0", "response_1"])


def fingerprint_for(model_dir: Path, encoder: Encoder, mixed_precision: MixedPrecision,
                    pairs: pd.DataFrame, device: torch.device | str,
                    weights: torch.dtype = REFERENCE_WEIGHTS) -> Fingerprint:
    return Fingerprint(model=weights_hash(model_dir), tokenizer=tokenizer_id(encoder.tokenizer),
                       template=encoder.template_id, max_length=encoder.max_length,
                       precision=resolve_mixed_precision(mixed_precision, torch.device(device)),
                       data=pairs_hash(pairs), weights=str(weights).removeprefix("torch."))


def write_reference(df: pd.DataFrame, fp: Fingerprint, path: Path,
                    truncation: TruncationStats | None = None) -> None:
    meta: dict[str, object] = {"fingerprint": fp.as_dict()}
    if truncation is not None:
        meta["truncation"] = truncation.as_dict()
    write_parquet(df[REF_COLUMNS], path, metadata=meta)


def read_reference(path: Path, expected: Fingerprint) -> pd.DataFrame:
    """Reference log-probs whose fingerprint matches `expected`; anything else is refused."""
    meta = read_parquet_metadata(path)
    if "fingerprint" not in meta:
        raise UserError("has no fingerprint; rerun `dvc repro ref_logps`", path=path)
    stored = meta["fingerprint"]
    if not isinstance(stored, dict) or set(stored) != set(expected.as_dict()):
        raise UserError("has a fingerprint of another format (written by another version of "
                        "this code); rerun `dvc repro ref_logps`", path=path)
    bad = expected.mismatches(Fingerprint(**stored))
    if bad:
        detail = ", ".join(f"{k}: stored {stored.get(k)!r} != current "
                           f"{getattr(expected, k)!r}" for k in bad)
        raise UserError(f"reference log-probs do not match the model and data being trained "
                        f"({detail}); rerun `dvc repro -s -f ref_logps` (forced: a "
                        "change of device or of the day a template prints is no DVC "
                        "dependency)", path=path)
    return read_parquet(path, required=REF_COLUMNS)


def attach_reference(selected: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """Add `ref_chosen`/`ref_rejected` to selected pairs, joined on `pair_id` and `chosen_idx`."""
    merged = selected.merge(ref, on="pair_id", how="left", validate="many_to_one",
                            indicator=True)
    missing = merged.pop("_merge") == "left_only"
    if missing.any():
        raise UserError(f"{int(missing.sum())} selected pairs have no reference log-probs "
                        f"(e.g. pair_id {merged.loc[missing, 'pair_id'].iloc[0]}); "
                        "rerun `dvc repro ref_logps`")
    c0 = merged["chosen_idx"].to_numpy() == 0
    merged["ref_chosen"] = np.where(c0, merged["logp_0"], merged["logp_1"])
    merged["ref_rejected"] = np.where(c0, merged["logp_1"], merged["logp_0"])
    return merged.drop(columns=["logp_0", "logp_1", "ntok_0", "ntok_1"])
