"""Evaluation metrics on hand-made tables, and batched generation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import GenerateConfig, TinyModelConfig
from pipeline.evaluation import (
    benign_prompt_ids,
    generation_metrics,
    implicit_reward_accuracy,
    kl_to_ref,
    win_rate,
)
from pipeline.generation import generate, select_prompts
from pipeline.modeling import build_tiny_model, train_tiny_tokenizer


def test_win_rate_joins_on_prompt_id_and_counts_ties_half() -> None:
    scores = pd.DataFrame({
        "prompt_id": ["a", "b", "c", "a", "b", "c", "d"],
        "model": ["policy"] * 3 + ["sft"] * 3 + ["sft"],
        "reward": [1.0, 0.0, 2.0, 0.5, 0.0, 3.0, 9.0],
    })
    # a: win, b: tie, c: loss; d has no policy answer and is left out -> (1 + 0.5 + 0) / 3
    assert win_rate(scores.sample(frac=1, random_state=0)) == pytest.approx(0.5)


def test_generation_metrics_and_benign_prompts() -> None:
    pairs = pd.DataFrame({"prompt_id": ["p", "p", "q"], "unsafe_0": [False, False, True],
                          "unsafe_1": [False, False, False]})
    assert benign_prompt_ids(pairs) == {"p"}
    scores = pd.DataFrame({
        "model": ["policy"] * 4, "cost": [-1.0, 0.0, 2.0, -3.0], "reward": [1, 2, 3, 6],
        "refusal": [True, False, False, True], "benign_prompt": [True, True, False, False]})
    m = generation_metrics(scores, "policy")
    assert m == {"harmless_rate": 0.75, "helpfulness": 3.0, "over_refusal_rate": 0.5}


def test_implicit_reward_accuracy_by_hand() -> None:
    pairs = pd.DataFrame({
        "pair_id": ["x", "y", "z"], "better_id": [0, 1, 0], "safer_id": [1, 1, 0],
        "unsafe_0": [True, True, False], "unsafe_1": [False, False, False]})
    ref = pd.DataFrame({"pair_id": ["z", "y", "x"], "logp_0": [-5.0, -5.0, -5.0],
                        "logp_1": [-5.0, -5.0, -5.0]})
    # β = 0.5; rewards r_k = 0.5·(logp_k − ref_k):
    #   x: r0 = 0.5·1 = 0.5, r1 = 0.5·(−1) = −0.5 -> prefers 0 (better 0: right; safer 1: wrong)
    #   y: r0 = 0, r1 = 1 -> prefers 1 (better 1: right; safer 1: right)
    #   z: r0 = r1 -> a tie counts half (better: 0.5; safety flags equal: not counted)
    pol = pd.DataFrame({"pair_id": ["x", "y", "z"], "logp_0": [-4.0, -5.0, -5.0],
                        "logp_1": [-6.0, -3.0, -5.0]})
    acc = implicit_reward_accuracy(pairs, pol, ref, beta=0.5)
    assert acc == {"pref_accuracy_helpful": pytest.approx(2.5 / 3), "pref_accuracy_safety": 0.5}
    # The policy equal to the reference is at chance, whatever the label balance.
    same = implicit_reward_accuracy(pairs, ref, ref, beta=0.5)
    assert same == {"pref_accuracy_helpful": 0.5, "pref_accuracy_safety": 0.5}


def test_kl_to_ref() -> None:
    assert kl_to_ref(np.array([-1.0, -2.0]), np.array([-2.0, -2.5])) == pytest.approx(0.75)


def test_prompt_subset_is_deterministic_and_order_free() -> None:
    pairs = pd.DataFrame({"prompt_id": [f"id{i}" for i in range(50)] * 2,
                          "prompt": [f"prompt {i}" for i in range(50)] * 2})
    a = select_prompts(pairs, 10, seed=1)
    b = select_prompts(pairs.sample(frac=1, random_state=3), 10, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert a["prompt_id"].is_unique and len(a) == 10
    assert set(select_prompts(pairs, 10, seed=2)["prompt_id"]) != set(a["prompt_id"])


def test_batched_left_padded_generation_equals_one_at_a_time() -> None:
    texts = [f"User: question {i} about bread and bikes\nAssistant: answer {i}" for i in
             range(40)]
    tok = train_tiny_tokenizer(texts, vocab_size=320)
    model = build_tiny_model(TinyModelConfig(vocab_size=320, hidden_size=32,
                                             intermediate_size=64, num_layers=2, num_heads=4,
                                             num_kv_heads=4, seed=1), tok)
    prompts = pd.DataFrame({"prompt_id": ["a", "b", "c"],
                            "prompt": ["hi", "a much longer question about bread", "bikes?"]})
    cfg = GenerateConfig(n_prompts=3, max_new_tokens=8, do_sample=False, batch_size=3)
    batched, stats = generate(model, tok, prompts, cfg, "sft")
    single, _ = generate(model, tok, prompts, GenerateConfig(
        n_prompts=3, max_new_tokens=8, do_sample=False, batch_size=1), "sft")
    pd.testing.assert_frame_equal(batched, single)
    assert set(batched["finish_reason"]) <= {"eos", "length"}
    assert (batched["n_tokens"] <= 8).all() and stats.new_tokens > 0
    # Sampling is reproducible from generate.seed and leaves the global RNG alone.
    state = torch.random.get_rng_state()
    s_cfg = GenerateConfig(n_prompts=3, max_new_tokens=8, do_sample=True, samples_per_prompt=2,
                           batch_size=2, seed=5)
    s1, _ = generate(model, tok, prompts, s_cfg, "sft")
    s2, _ = generate(model, tok, prompts, s_cfg, "sft")
    pd.testing.assert_frame_equal(s1, s2)
    assert len(s1) == 6 and torch.equal(state, torch.random.get_rng_state())
