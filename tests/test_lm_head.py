"""Log-probs from the LM head's input at label positions only (`lm_head.LabelLogps`) against
the full logits, and the models `lm_head_of` vouches for."""

from __future__ import annotations

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

from pipeline.layouts import label_positions
from pipeline.lm_head import MODEL_TYPES, lm_head_of
from pipeline.logps import batch_logps


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("head", ["tied", "untied with bias"])
def test_label_positions_equal_full_logits_fp32(chunk: int | None, head: str) -> None:
    model = llama(tie_word_embeddings=head == "tied")
    if head != "tied":
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    assert lm_head_of(model) is not None
    batch = padded_batch()
    n_scored = len(label_positions(batch["labels"])[0])
    assert chunk is None or chunk == 1 or n_scored % chunk, "a last chunk that is not full"
    want, want_g = logps_and_grads(model, full_logits(batch))
    got, got_g = logps_and_grads(model, lambda m: batch_logps(m, batch, chunk=chunk))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[-1] == 0.0  # nothing scored: exactly 0, as in `sequence_logps`
    assert_grads_close(got_g, want_g, rtol=1e-5, atol=1e-5)
    if head != "tied":
        assert "lm_head.bias" in got_g


#: What a 2-layer model of these types needs beyond `tiny_lm`'s shape (DeepSeek-V3's
#: multi-head latent attention and experts, Ministral's explicit head size).
TINY_SHAPES: dict[str, dict[str, object]] = {
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                        moe_intermediate_size=16, n_group=1, topk_group=1),
    "ministral": dict(head_dim=8),
}


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_every_listed_model_type_scores_at_label_positions_as_its_full_logits(
        model_type: str) -> None:
    """Each entry of the one allow-list: `lm_head_of` takes it, and the label-position
    log-probs and gradients equal those of its full logits (fp32, a Cohere model's
    `logit_scale` included)."""
    model = tiny_lm(model_type, **TINY_SHAPES.get(model_type, {}))
    head = lm_head_of(model)
    assert head is not None
    assert (head.scale != 1.0) == MODEL_TYPES[model_type].scaled_head
    batch = padded_batch()
    want, want_g = logps_and_grads(model, full_logits(batch))
    got, got_g = logps_and_grads(model, lambda m: batch_logps(m, batch, chunk=7))
    assert (want[:-1] < -1.0).all()  # real sums over the scored tokens, not empty ones
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    assert_grads_close(got_g, want_g, rtol=1e-4, atol=1e-5)


def test_label_positions_under_cpu_bf16_autocast() -> None:
    """bf16 hidden states and weights as `lm_head` computes them under autocast, fp32
    logsumexp: the same bf16 logits as the full path, so the sums agree to fp32 summation order
    (stated tolerance 1e-4 nats); the gradients to 2% of each parameter's largest (measured
    0.2% for the tied embedding, whose gradient the label path sums in fp32 over its chunks and
    the full path rounds to bf16 once, and 0.5% in layers that run other shapes in 2 groups)."""
    model = llama(tie_word_embeddings=True)
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_g = logps_and_grads(model, full_logits(batch))
        got, got_g = logps_and_grads(model, lambda m: batch_logps(m, batch, 2, chunk=7))
    torch.testing.assert_close(got, want, rtol=0.0, atol=1e-4)
    for k, g in want_g.items():
        assert (got_g[k] - g).abs().max() <= 2e-2 * g.abs().max(), k
    # And bf16 is what ran: fp32 log-probs differ by far more than the tolerance.
    fp32, _ = batch_logps(model, batch)
    assert (fp32 - got).abs().max() > 1e-4


def test_scaled_logits_cohere() -> None:
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       logit_scale=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CohereForCausalLM(cfg)
    head = lm_head_of(model)
    assert head is not None and head.scale == 0.25
    batch = padded_batch()
    want, want_g = logps_and_grads(model, full_logits(batch))
    got, got_g = logps_and_grads(model, lambda m: batch_logps(m, batch, chunk=7))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(got_g, want_g, rtol=1e-5, atol=1e-5)


def test_softcapped_logits_take_the_full_logits_path() -> None:
    """Gemma-2 caps its logits after the head (c·tanh(z/c)): the split would not be exact, so
    `batch_logps` keeps the full logits, and gives what they give."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, final_logit_softcapping=0.5, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(cfg)
    assert lm_head_of(model) is None
    batch = padded_batch()
    want, _ = logps_and_grads(model, full_logits(batch))
    got, _ = logps_and_grads(model, lambda m: batch_logps(m, batch, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A plain model type whose config carries a post-head transform falls back as well.
    assert lm_head_of(llama(final_logit_softcapping=30.0)) is None


def test_lora_models_use_the_label_path_unless_lora_is_on_the_head() -> None:
    from peft import LoraConfig, get_peft_model

    batch = padded_batch()
    lora = get_peft_model(llama(tie_word_embeddings=True), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert lm_head_of(lora) is not None
    want, want_g = logps_and_grads(lora, full_logits(batch))
    got, got_g = logps_and_grads(lora, lambda m: batch_logps(m, batch, 2, chunk=7))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert any("lora_" in k for k in got_g)
    assert_grads_close(got_g, want_g, rtol=1e-5, atol=1e-5)
    on_head = get_peft_model(llama(tie_word_embeddings=False),
                             LoraConfig(r=4, target_modules=["lm_head"]))
    assert lm_head_of(on_head) is None


def test_scoring_without_gradients_uses_the_label_path() -> None:
    model = llama(tie_word_embeddings=True)
    batch = padded_batch()
    with torch.no_grad():
        want, _ = full_logits(batch)(model)
    with torch.inference_mode():
        got, _ = batch_logps(model, batch, 4, chunk=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
