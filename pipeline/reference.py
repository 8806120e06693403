"""Reference log-probs: computed once by the `ref_logps` stage, read (never recomputed) by
training and evaluation, and guarded by a fingerprint of everything they depend on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.artifacts import frame_hash, read_parquet, read_parquet_metadata, write_parquet
from pipeline.errors import UserError
from pipeline.logps import Fingerprint, score_sequences, tokenizer_id
from pipeline.modeling import encode_many, template_id, weights_hash

REF_COLUMNS = ["pair_id", "logp_0", "logp_1", "ntok_0", "ntok_1"]


def pairs_hash(pairs: pd.DataFrame) -> str:
    """What the reference log-probs of a pairs table depend on: ids and texts."""
    return frame_hash(pairs, ["pair_id", "prompt", "response_0", "response_1"])


def fingerprint_for(model_dir: Path, tokenizer: PreTrainedTokenizerBase, max_length: int,
                    pairs: pd.DataFrame) -> Fingerprint:
    return Fingerprint(model=weights_hash(model_dir), tokenizer=tokenizer_id(tokenizer),
                       template=template_id(tokenizer), max_length=max_length,
                       data=pairs_hash(pairs))


def compute_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: pd.DataFrame,
    max_length: int, batch_size: int, device: str = "cpu",
) -> pd.DataFrame:
    """Summed log-prob and token count of both responses of every pair, keyed by `pair_id`."""
    n = len(pairs)
    prompts = pairs["prompt"].tolist() * 2
    responses = pairs["response_0"].tolist() + pairs["response_1"].tolist()
    enc = encode_many(tokenizer, prompts, responses, max_length)
    logps, ntok = score_sequences(model, enc, tokenizer.pad_token_id, batch_size, device,
                                  desc="ref log-probs")
    return pd.DataFrame({
        "pair_id": pairs["pair_id"].to_numpy(),
        "logp_0": logps[:n], "logp_1": logps[n:],
        "ntok_0": ntok[:n].astype(np.int32), "ntok_1": ntok[n:].astype(np.int32),
    })


def write_reference(df: pd.DataFrame, fp: Fingerprint, path: Path) -> None:
    write_parquet(df[REF_COLUMNS], path, metadata={"fingerprint": fp.as_dict()})


def read_reference(path: Path, expected: Fingerprint) -> pd.DataFrame:
    """Reference log-probs whose fingerprint matches `expected`; anything else is refused."""
    meta = read_parquet_metadata(path)
    if "fingerprint" not in meta:
        raise UserError("has no fingerprint; rerun `dvc repro ref_logps`", path=path)
    stored = Fingerprint(**meta["fingerprint"])
    bad = expected.mismatches(stored)
    if bad:
        detail = ", ".join(f"{k}: stored {getattr(stored, k)!r} != current "
                           f"{getattr(expected, k)!r}" for k in bad)
        raise UserError(f"reference log-probs do not match the model and data being trained "
                        f"({detail}); rerun `dvc repro ref_logps`", path=path)
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
