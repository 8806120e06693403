"""The shared sequence log-prob function, reference precomputation and its fingerprint."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_lms import (
    VOCAB,
    assert_grads_close,
    full_logits,
    llama,
    logps_and_grads,
    padded_batch,
    tiny_lm,
)

from pipeline.artifacts import text_hash
from pipeline.config import TinyModelConfig
from pipeline.encoding import Encoded, Encoder, load_template, resolve_template
from pipeline.errors import UserError
from pipeline.layouts import SCORED, collate, label_positions, pack
from pipeline.lm_head import MODEL_TYPES, lm_head_of
from pipeline.logps import (
    ForwardLayout,
    attention_cost,
    batch_logps,
    forward_layout,
    pair_logps,
    sequence_logps,
)
from pipeline.modeling import build_tiny_model, load_pretrained, save_model, train_tiny_tokenizer
from pipeline.reference import (
    fingerprint_for,
    read_reference,
    write_reference,
)


def _encoder(model_dir: Path, max_length: int = 64):
    model, tok = load_pretrained(model_dir)
    return model, Encoder(tok, load_template(model_dir), max_length)


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
    save_model(model, tok, resolve_template("plain", tok), out)
    return out, pairs


def test_precomputed_reference_equals_online(tiny: tuple[Path, pd.DataFrame]) -> None:
    model_dir, pairs = tiny
    model, enc = _encoder(model_dir)
    tok = enc.tokenizer
    ref = pair_logps(model, enc, pairs, batch_size=5)
    # Online: one unpadded sequence at a time, straight through the model.
    for row, r in zip(pairs.itertuples(), ref.itertuples(), strict=True):
        assert row.pair_id == r.pair_id
        both = enc.pairs([row.prompt], [row.response_0], [row.response_1])[0]
        for k, e in enumerate(both):
            batch = collate([e], tok.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"]).logits
            lp, n = sequence_logps(logits, batch["labels"])
            assert getattr(r, f"logp_{k}") == pytest.approx(lp.item(), abs=1e-5)
            assert getattr(r, f"ntok_{k}") == n.item()


def test_fingerprint_mismatch_is_refused(tiny: tuple[Path, pd.DataFrame],
                                         tmp_path: Path) -> None:
    model_dir, pairs = tiny
    model, enc = _encoder(model_dir)
    tok = enc.tokenizer
    ref = pair_logps(model, enc, pairs, batch_size=8)
    path = tmp_path / "ref.parquet"

    def fp(d: Path = model_dir, e: Encoder = enc, mp: str = "no", p: pd.DataFrame = pairs):
        return fingerprint_for(d, e, mp, p, "cpu")

    write_reference(ref, fp(), path)
    # The same model and data read back fine ...
    back = read_reference(path, fp())
    pd.testing.assert_frame_equal(back, ref)
    # ... another max length, template, precision, data or weights are refused, naming it.
    with pytest.raises(UserError, match="max_length"):
        read_reference(path, fp(e=Encoder(tok, enc.template, 128)))
    with pytest.raises(UserError, match="template"):
        read_reference(path, fp(e=Encoder(tok, resolve_template("safe_rlhf", tok), 64)))
    with pytest.raises(UserError, match="precision: stored 'no' != current 'bf16'"):
        read_reference(path, fp(mp="bf16"))
    with pytest.raises(UserError, match="data"):
        read_reference(path, fp(p=pairs.iloc[:-1]))
    # Reference log-probs scored with bf16 weights are not what fp32 master weights give.
    write_reference(ref, fingerprint_for(model_dir, enc, "no", pairs, "cpu", torch.bfloat16),
                    tmp_path / "bf16.parquet")
    with pytest.raises(UserError, match="weights: stored 'bfloat16' != current 'float32'"):
        read_reference(tmp_path / "bf16.parquet", fp())
    # A note beside the weights (training_summary.json) is not part of the model's identity.
    (model_dir / "training_summary.json").write_text('{"seconds": 1.5}')
    read_reference(path, fp())
    other = tmp_path / "other"
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)
    save_model(model, tok, enc.template, other)
    with pytest.raises(UserError, match="model: stored"):
        read_reference(path, fp(d=other))


@pytest.mark.parametrize("groups", [2, 3, 64])
def test_grouped_forward_equals_one_padded_forward(tiny: tuple[Path, pd.DataFrame],
                                                   groups: int) -> None:
    model_dir, pairs = tiny
    model, encoder = _encoder(model_dir)
    tok = encoder.tokenizer
    enc = encoder.sequences(pairs["prompt"].tolist() * 2,
                            pairs["response_0"].tolist() + pairs["response_1"].tolist())
    batch = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        lp1, n1 = batch_logps(model, batch)
        lpg, ng = batch_logps(model, batch, groups=groups)
    torch.testing.assert_close(lpg, lp1, rtol=1e-5, atol=1e-5)
    assert torch.equal(ng, n1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logps_without_full_log_softmax_equal_the_log_softmax(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 40, 5000, generator=gen) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 5000, (3, 40), generator=gen)
    labels[:, :7] = -100
    lp, n = sequence_logps(logits, labels)
    ref_lp = torch.gather(logits.float()[:, :-1].log_softmax(-1), 2,
                          labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = (ref_lp * (labels[:, 1:] != -100)).sum(-1)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-4)
    assert n.tolist() == [33, 33, 33]
    # Gradients agree too (the bf16 path recomputes its chunks in backward).
    (g1,) = torch.autograd.grad(lp.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("mp", ["no", "bf16"])
def test_dpo_logits_are_zero_at_step_zero_under_the_training_precision(
        tiny: tuple[Path, pd.DataFrame], mp: str) -> None:
    """The reference scored by `ref_logps` and the policy scored by the training loss, both
    under the same autocast, give implicit rewards of 0 when the policy is the reference."""
    from pipeline.objectives import OBJECTIVES, select_pairs
    from pipeline.precision import autocast
    from pipeline.preference import PreferenceLoss, preference_batch, preference_examples
    from pipeline.reference import attach_reference

    model_dir, pairs = tiny
    model, enc = _encoder(model_dir)
    ref = pair_logps(model, enc, pairs, batch_size=4, mixed_precision=mp)
    selected, _ = select_pairs(pairs, "safedpo")
    examples = preference_examples(attach_reference(selected, ref), enc)
    layout = ForwardLayout(groups=3)
    batch = preference_batch(examples, enc.tokenizer.pad_token_id, layout)
    loss = PreferenceLoss(OBJECTIVES["safedpo"], beta=0.1, delta=10.0, layout=layout)
    with torch.no_grad(), autocast(mp, "cpu"):
        _, m = loss(model, batch)
    assert abs(float(m["rewards/chosen"])) < 1e-6
    assert abs(float(m["rewards/margins"])) < 1e-6
    if mp == "bf16":
        # Scoring the reference without the autocast (what ref_logps used to do) does not.
        ref32 = pair_logps(model, enc, pairs, batch_size=4, mixed_precision="no")
        assert (ref32["logp_0"] - ref["logp_0"]).abs().mean() > 1e-4


def test_token_batches_bound_rows_and_padded_tokens() -> None:
    from pipeline.layouts import token_batches

    lengths = np.array([3, 4, 5, 10, 10, 40, 500])
    assert token_batches(lengths, 64, None) == [(0, 7)]
    assert token_batches(lengths, 2, None) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    # At most 40 padded tokens: [3, 4, 5, 10] is 4 × 10; 40 alone; 500 is alone however long.
    assert token_batches(lengths, 64, 40) == [(0, 4), (4, 5), (5, 6), (6, 7)]
    assert token_batches(np.array([], dtype=np.int64), 8, 40) == []


def test_scoring_in_token_sized_batches_gives_the_same_log_probs(
        tiny: tuple[Path, pd.DataFrame]) -> None:
    model_dir, pairs = tiny
    model, enc = _encoder(model_dir)
    a = pair_logps(model, enc, pairs, batch_size=64)
    b = pair_logps(model, enc, pairs, batch_size=64, max_tokens=100)
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-5)


# --- forward layouts against one padded forward through the full logits --------------------

@pytest.mark.parametrize("host_positions", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_every_forward_layout_gives_the_same_log_probs(groups: int, host_positions: bool) -> None:
    """Also with the label positions found on the host by `collate` (SCORED), which the
    one-group forward takes instead of reading them back from the device."""
    model = llama(tie_word_embeddings=True)
    batch = padded_batch()
    if host_positions:
        batch[SCORED] = label_positions(batch["labels"])[0]
    want, want_g = logps_and_grads(model, full_logits(batch))
    got, got_g = logps_and_grads(model, lambda m: batch_logps(m, batch, groups, chunk=5))
    with torch.no_grad():
        assert torch.equal(batch_logps(model, batch, groups)[1], full_logits(batch)(model)[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(got_g, want_g, rtol=1e-5, atol=1e-5)


def test_one_group_with_host_positions_reads_nothing_back(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The one-group path takes `collate`'s positions: no `label_positions` (a `nonzero`, which
    waits for a GPU) and no group widths read back; `collate` provides the key."""
    from pipeline import logps

    model = llama(tie_word_embeddings=True)
    batch = padded_batch()
    want = batch_logps(model, batch, 1)[0]
    batch[SCORED] = label_positions(batch["labels"])[0]

    def refuse(*_: object) -> None:
        raise AssertionError("read back from the device")

    monkeypatch.setattr(logps, "label_positions", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    torch.testing.assert_close(batch_logps(model, batch, 1)[0], want, rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    enc = [Encoded(input_ids=[1, 5, 6, 7], labels=[-100, -100, 6, 7]),
           Encoded(input_ids=[1, 5], labels=[-100, 5])]
    assert collate(enc, 0)[SCORED].tolist() == [1, 2, 4]


# --- the packed layouts (`pack`) against the padded one --------------------------------------

def _sequences(n: int = 9, seed: int = 3) -> list[Encoded]:
    """Sequences of mixed lengths and prompt lengths, one with nothing scored."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, length in enumerate([23, 5, 17, 9, 23, 12, 3, 20, 14][:n]):
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        prompt = length if i == 5 else min(length - 1, 1 + i % 4)
        out.append(Encoded(ids, [-100] * prompt + ids[prompt:]))
    return out


def _pairs_sharing_prompts() -> list[Encoded]:
    """`_sequences` as chosen sides, each with a rejected side on the same prompt."""
    gen = torch.Generator().manual_seed(5)
    chosen, rejected = _sequences(), []
    for e in chosen:
        k = e.n_prompt_tokens
        tail = torch.randint(3, VOCAB, (1 + k % 6,), generator=gen).tolist()
        rejected.append(Encoded(e.input_ids[:k] + tail, [-100] * k + tail))
    return chosen + rejected


@pytest.mark.parametrize("kind", ["packed", "shared_prompts"])
@pytest.mark.parametrize("model_type", sorted(k for k, t in MODEL_TYPES.items() if t.packable))
def test_packed_rows_give_the_padded_log_probs(model_type: str, kind: str) -> None:
    """Every model type packing is allowed for: log-probs and gradients of packed rows equal
    those of one padded forward through the full logits (fp32), so no token attends across a
    sequence boundary (or, with shared prompts, into another response) and each sequence's
    positions are its own."""
    model = tiny_lm(model_type)
    assert lm_head_of(model) is not None
    seqs = _pairs_sharing_prompts()
    padded = collate(seqs, 0)
    layout = forward_layout(kind, None, model, "cpu")  # type: ignore[arg-type]
    packed = layout.collate(seqs, 0)
    assert packed["input_ids"].numel() < padded["input_ids"].numel() * 0.8
    # No position beyond what a sequence has: models with a position table (GPT-J's sinusoids,
    # learned embeddings) or a scaling picked from the largest position see nothing new.
    assert packed["position_ids"].max() < max(len(e.input_ids) for e in seqs)
    want, want_g = logps_and_grads(model, full_logits(padded))
    got, got_g = logps_and_grads(model, lambda m: batch_logps(m, packed, chunk=7))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    assert got[5] == 0.0  # nothing scored
    with torch.no_grad():
        assert torch.equal(batch_logps(model, packed)[1], full_logits(padded)(model)[1])
    assert_grads_close(got_g, want_g, rtol=1e-4, atol=1e-5)


def test_packed_rows_through_gemma3_sliding_window_layers() -> None:
    """Gemma 3 interleaves sliding-window layers with full ones: with a window narrower than
    the sequences, packed rows still give the padded log-probs and gradients (each sequence's
    window counts its own tokens), and shared prompts, whose responses sit further from their
    prompt in columns than in positions, are refused for rows wider than the window."""
    model = tiny_lm("gemma3_text", sliding_window=4, layer_types=["sliding_attention",
                                                                  "full_attention"])
    seqs = _pairs_sharing_prompts()
    assert max(len(e.input_ids) for e in seqs) > 4
    padded = collate(seqs, 0)
    packed = forward_layout("packed", None, model, "cpu").collate(seqs, 0)
    want, want_g = logps_and_grads(model, full_logits(padded))
    got, got_g = logps_and_grads(model, lambda m: batch_logps(m, packed, chunk=7))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    assert_grads_close(got_g, want_g, rtol=1e-4, atol=1e-5)
    shared = forward_layout("shared_prompts", None, model, "cpu").collate(seqs, 0)
    with pytest.raises(UserError, match="window"):
        batch_logps(model, shared)


def test_shared_prompts_with_eager_attention() -> None:
    model = llama(tie_word_embeddings=True)
    model.set_attn_implementation("eager")
    seqs = _pairs_sharing_prompts()
    want, want_g = logps_and_grads(model, full_logits(collate(seqs, 0)))
    packed = pack(seqs, 0, share_prompts=True)
    got, got_g = logps_and_grads(model, lambda m: batch_logps(m, packed))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    assert_grads_close(got_g, want_g, rtol=1e-4, atol=1e-5)


def test_packed_rows_under_cpu_bf16_autocast() -> None:
    """bf16 autocast: packed rows against the padded label path, to the rounding of bf16
    activations computed in other shapes (measured 1.0e-3 nats on sums of ~15 log-probs),
    well inside what bf16 itself moves them from fp32 (0.13 nats, asserted > 2e-2)."""
    model = llama(tie_word_embeddings=True)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)  # peaked logits: bf16 rounding shows
    seqs = _pairs_sharing_prompts()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = batch_logps(model, collate(seqs, 0))
        for share in (False, True):
            got, _ = batch_logps(model, pack(seqs, 0, share_prompts=share))
            torch.testing.assert_close(got, want, rtol=0.0, atol=5e-3)
    fp32, _ = batch_logps(model, pack(seqs, 0, share_prompts=True))
    assert (fp32.detach() - got).abs().max() > 2e-2  # bf16 is what ran


def test_forward_layout_per_device_and_refusals() -> None:
    model = llama(tie_word_embeddings=True)
    cost = attention_cost(model)
    # 2·L·d / weights of the layers' matrices: q, o 32x32; k, v 32x16 (2 KV heads); MLP 3x32x64
    assert cost == pytest.approx(2 * 2 * 32 / (2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)))
    assert forward_layout(None, None, model, "cpu") == ForwardLayout("auto", 4, cost, True)
    assert forward_layout("auto", 2, model, "cuda") == ForwardLayout("auto", 2, cost, True)
    # Several processes: every rank must run as many forward passes (DDP syncs at each).
    assert forward_layout(None, None, model, "cpu", 2) == ForwardLayout("auto", 1, cost, True)
    assert forward_layout("padded", None, model, "cpu", 2) == ForwardLayout(groups=4)
    assert forward_layout(None, None, model, "cuda") == ForwardLayout(groups=1)
    assert forward_layout("padded", 2, model, "cuda") == ForwardLayout(groups=2)
    assert forward_layout("packed", None, model, "cuda").kind == "packed"
    # OPT derives positions from the attention mask: packed rows would be wrong.
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=32, pad_token_id=0))
    with pytest.raises(UserError, match="model type 'opt' is not one tested"):
        forward_layout("packed", None, opt, "cpu")
    assert forward_layout(None, None, opt, "cpu") == ForwardLayout(groups=4)
    assert forward_layout("auto", None, opt, "cpu") == ForwardLayout(groups=4)
    with pytest.raises(ValueError, match="packed batch needs the label-position head"):
        batch_logps(llama(final_logit_softcapping=30.0), pack(_sequences(3), 0))
    # Not flash-attention: it reads packed positions only for a batch of one row.
    model.config._attn_implementation = "flash_attention_2"
    for kind in ("packed", "shared_prompts"):
        with pytest.raises(UserError, match="attention 'flash_attention_2' is not tested"):
            forward_layout(kind, None, model, "cuda")  # type: ignore[arg-type]
    assert forward_layout(None, None, model, "cpu") == ForwardLayout(groups=4)
    # ALiBi (Falcon's option) measures distances in columns: packed rows keep them, shared
    # prompts do not.
    falcon = tiny_lm("falcon", alibi=True)
    assert falcon.transformer.use_alibi
    assert forward_layout(None, None, falcon, "cpu") == ForwardLayout(
        "auto", 4, attention_cost(falcon), share_prompts=False)
    with pytest.raises(UserError, match="ALiBi"):
        forward_layout("shared_prompts", None, falcon, "cpu")
    seqs = _pairs_sharing_prompts()
    want, _ = full_logits(collate(seqs, 0))(falcon)
    got, _ = batch_logps(falcon, forward_layout("packed", None, falcon, "cpu").collate(seqs, 0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    # A sliding window narrower than the rows: the ready mask would drop it.
    mistral = tiny_lm("mistral")
    mistral.config.sliding_window = 8
    assert not forward_layout(None, None, mistral, "cpu").share_prompts
    with pytest.raises(UserError, match="wider than the model's sliding window"):
        batch_logps(mistral, pack(_pairs_sharing_prompts(), 0, share_prompts=True))
