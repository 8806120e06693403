"""Tiny random causal LMs and the checks the log-prob tests share: scores and gradients of a
weighted sum of sequence log-probs, against one padded forward through the full logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.logps import sequence_logps

VOCAB = 211


def llama(**kw: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


def padded_batch(rows: int = 7, width: int = 23) -> dict[str, torch.Tensor]:
    """Right-padded sequences of different lengths, each with a prompt of its own length
    (labels -100 there and on the padding), and one sequence with nothing scored."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, width), generator=gen)
    attn = torch.ones(rows, width, dtype=torch.long)
    labels = ids.clone()
    for i in range(rows):
        n = width - 2 * i
        ids[i, n:], attn[i, n:], labels[i, n:] = 0, 0, -100
        labels[i, :2 + i] = -100
    labels[-1] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def logps_and_grads(model: torch.nn.Module, score: Callable
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`score(model)` -> (logps (B,), n (B,)), and the gradients of a weighted sum of the
    log-probs (a weight per sequence, as the DPO loss gives) wrt every parameter."""
    model.zero_grad(set_to_none=True)
    lp, _ = score(model)
    weights = torch.linspace(-1.0, 2.0, lp.shape[0])
    (lp * weights).sum().backward()
    return lp.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                         if p.grad is not None}


def full_logits(batch: dict[str, torch.Tensor]):
    """Today's path: one padded forward, (B, T, V) logits, `sequence_logps`."""
    def score(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return sequence_logps(out.logits, batch["labels"])
    return score


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                        rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


def tiny_lm(model_type: str, **overrides: object) -> torch.nn.Module:
    """A 2-layer random model of `model_type` with the vocabulary of these tests; `overrides`
    go into its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw: dict[str, object] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2)
    if model_type == "gptj":
        kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, pad_token_id=0)
    cfg = AutoConfig.for_model(model_type, **{**kw, **overrides})
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                "attn_pdrop", "dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
