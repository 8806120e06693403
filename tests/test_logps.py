"""The shared sequence log-prob function, reference precomputation and its fingerprint."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.artifacts import text_hash
from pipeline.config import TinyModelConfig
from pipeline.errors import UserError
from pipeline.logps import collate, sequence_logps
from pipeline.modeling import build_tiny_model, encode_many, save_model, train_tiny_tokenizer
from pipeline.reference import (
    compute_reference,
    fingerprint_for,
    read_reference,
    write_reference,
)


def test_sequence_logps_by_hand() -> None:
    # Vocabulary of 2. Position t predicts token t+1; labels −100 are not scored.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    lp, n = sequence_logps(logits, labels)
    # token 1 (=0) from uniform logits: log 1/2; token 2 (=1) from [log 3, 0]: log 1/4
    assert lp.item() == pytest.approx(math.log(0.5) + math.log(0.25))
    assert n.item() == 2


def _pairs(n: int = 12) -> pd.DataFrame:
    rows = []
    for i in range(n):
        p = f"Question number {i}: how do I {'bake bread' if i % 2 else 'fix a bike'}?"
        a = f"Here is a careful answer {i} with several words in it."
        b = "I'm sorry, I can't help." if i % 3 else f"Try step {i} then step {i + 1}."
        rows.append({"pair_id": text_hash(p, a, b), "prompt_id": text_hash(p), "prompt": p,
                     "response_0": a, "response_1": b, "unsafe_0": False, "unsafe_1": i % 2 == 0,
                     "better_id": 0, "safer_id": 0})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    pairs = _pairs()
    texts = [f"User: {p}\nAssistant: {r}" for p in pairs["prompt"]
             for r in (*pairs["response_0"], *pairs["response_1"])][:200]
    tok = train_tiny_tokenizer(texts, vocab_size=400)
    model = build_tiny_model(TinyModelConfig(vocab_size=400, hidden_size=32,
                                             intermediate_size=64, num_layers=2, num_heads=4,
                                             num_kv_heads=2, seed=3), tok)
    out = tmp_path_factory.mktemp("model") / "sft"
    save_model(model, tok, out)
    return out, pairs


def test_precomputed_reference_equals_online(tiny: tuple[Path, pd.DataFrame]) -> None:
    from pipeline.modeling import load_pretrained

    model_dir, pairs = tiny
    model, tok = load_pretrained(model_dir)
    ref = compute_reference(model, tok, pairs, max_length=64, batch_size=5)
    # Online: one unpadded sequence at a time, straight through the model.
    for row, r in zip(pairs.itertuples(), ref.itertuples(), strict=True):
        assert row.pair_id == r.pair_id
        for k, resp in enumerate((row.response_0, row.response_1)):
            (enc,) = encode_many(tok, [row.prompt], [resp], 64)
            batch = collate([enc], tok.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"]).logits
            lp, n = sequence_logps(logits, batch["labels"])
            assert getattr(r, f"logp_{k}") == pytest.approx(lp.item(), abs=1e-5)
            assert getattr(r, f"ntok_{k}") == n.item()


def test_fingerprint_mismatch_is_refused(tiny: tuple[Path, pd.DataFrame],
                                         tmp_path: Path) -> None:
    from pipeline.modeling import load_pretrained

    model_dir, pairs = tiny
    model, tok = load_pretrained(model_dir)
    ref = compute_reference(model, tok, pairs, max_length=64, batch_size=8)
    path = tmp_path / "ref.parquet"
    write_reference(ref, fingerprint_for(model_dir, tok, 64, pairs), path)
    # The same model and data read back fine ...
    back = read_reference(path, fingerprint_for(model_dir, tok, 64, pairs))
    pd.testing.assert_frame_equal(back, ref)
    # ... another max length, other data, or other weights are refused, naming what differs.
    with pytest.raises(UserError, match="max_length"):
        read_reference(path, fingerprint_for(model_dir, tok, 128, pairs))
    with pytest.raises(UserError, match="data"):
        read_reference(path, fingerprint_for(model_dir, tok, 64, pairs.iloc[:-1]))
    other = tmp_path / "other"
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)
    save_model(model, tok, other)
    with pytest.raises(UserError, match="model: stored"):
        read_reference(path, fingerprint_for(other, tok, 64, pairs))


@pytest.mark.parametrize("groups", [2, 3, 64])
def test_grouped_forward_equals_one_padded_forward(tiny: tuple[Path, pd.DataFrame],
                                                   groups: int) -> None:
    from pipeline.logps import batch_logps
    from pipeline.modeling import load_pretrained

    model_dir, pairs = tiny
    model, tok = load_pretrained(model_dir)
    enc = encode_many(tok, pairs["prompt"].tolist() * 2,
                      pairs["response_0"].tolist() + pairs["response_1"].tolist(), 64)
    batch = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        lp1, n1 = batch_logps(model, batch)
        lpg, ng = batch_logps(model, batch, groups=groups)
    torch.testing.assert_close(lpg, lp1, rtol=1e-5, atol=1e-5)
    assert torch.equal(ng, n1)
