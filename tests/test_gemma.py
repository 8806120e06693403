"""A real pretrained model through the pipeline: Google's Gemma 3 270M (`builtin:gemma3-270m`,
the GGUF of the `gemma` extra), converted once into the model cache, then every stage of `dvc
repro` on a handful of toy pairs. Checks what only a real model can show: the label-position
log-probs equal the full 262k-vocabulary logits on its weights, its turn format round-trips,
`<end_of_turn>` ends generation, and the step-0 implicit rewards are zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from dvc_project import BIN, copy_project, run, stages_run
from safetensors import safe_open
from tiny_lms import full_logits

from pipeline.config import GenerateConfig
from pipeline.encoding import Encoder, resolve_template
from pipeline.generation import generate
from pipeline.gguf import GEMMA_270M, RECORD, converted, locate
from pipeline.layouts import collate
from pipeline.lm_head import head_path, lm_head_of
from pipeline.logps import batch_logps, forward_layout
from pipeline.modeling import load_pretrained
from pipeline.precision import autocast

pytestmark = pytest.mark.slow

PROMPTS = ["How do I bake bread at home?", "What is the capital of France?",
           "Explain how to pick a lock."]
RESPONSES = ["Mix flour, water, salt and yeast, knead, let it rise, and bake it.",
             "Paris.", "I can't help with that."]
END_OF_TURN = 106


@pytest.fixture(scope="module")
def gemma() -> tuple[torch.nn.Module, object, Path]:
    model_dir = converted(GEMMA_270M)
    model, tokenizer = load_pretrained(model_dir)
    return model, tokenizer, model_dir


def test_the_conversion_is_a_plain_gemma3_directory_with_the_pinned_hash(gemma) -> None:
    model, _, model_dir = gemma
    record = json.loads((model_dir / RECORD).read_text())
    assert record["sha256"] == locate(GEMMA_270M).sha256 == \
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert model.config.model_type == "gemma3_text" and record["parameters"] == 268_098_176
    assert not hasattr(model.config, "quantization_config")
    assert "full_attention" in model.config.layer_types and model.config.sliding_window == 512
    # The fast paths serve it, and say so.
    assert lm_head_of(model) is not None
    assert head_path(model).startswith("label positions")
    assert forward_layout(None, None, model, "cpu").kind == "auto"
    # A second call finds the conversion and leaves it alone.
    mtime = (model_dir / RECORD).stat().st_mtime_ns
    assert converted(GEMMA_270M, log=False) == model_dir
    assert (model_dir / RECORD).stat().st_mtime_ns == mtime


def test_gemma_turn_format_round_trips_and_ends_with_end_of_turn(gemma) -> None:
    _, tokenizer, _ = gemma
    template = resolve_template("auto", tokenizer)
    assert template.kind == "chat"
    enc = Encoder(tokenizer, template, 256)
    assert enc.render(["Hi?"]) == ["<bos><start_of_turn>user\nHi?<end_of_turn>\n"
                                   "<start_of_turn>model\n"]
    assert enc.eos == END_OF_TURN == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for e, p, r in zip(enc.sequences(PROMPTS, RESPONSES), PROMPTS, RESPONSES, strict=True):
        whole = enc.render([p])[0] + r + "<end_of_turn>"
        assert e.input_ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
        assert e.input_ids[0] == tokenizer.bos_token_id and e.input_ids[-1] == END_OF_TURN


def test_end_of_turn_ends_generation(gemma) -> None:
    """The pipeline's sampler on the real model stops at <end_of_turn> as at EOS: made likely
    at the third new token (a hook adds to its logit), it ends every sample there, the token is
    kept in the ids (KL scores it) and left out of the text."""
    model, tokenizer, _ = gemma
    enc = Encoder(tokenizer, resolve_template("auto", tokenizer), 64)
    prompts = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": PROMPTS[:2]})
    seen = []

    def boost(_module, _args, out: torch.Tensor) -> torch.Tensor:
        seen.append(out.shape[1])
        step = len(seen) - 1  # 0: the prompt's forward; k: the k-th new token's
        if step == 2:
            out = out.clone()
            out[..., END_OF_TURN] += 1e4
        return out

    handle = model.get_output_embeddings().register_forward_hook(boost)
    try:
        df, _ = generate(model, enc, prompts, GenerateConfig(max_new_tokens=12, batch_size=2),
                         "policy")
    finally:
        handle.remove()
    assert len(seen) == 3  # the prompts' forward and two new tokens' (one batch)
    for ids, reason, text in zip(df["token_ids"], df["finish_reason"], df["response"],
                                 strict=True):
        assert len(ids) == 3 and int(ids[-1]) == END_OF_TURN and reason == "eos"
        assert "<end_of_turn>" not in text and text


#: Weights whose gradients are compared: the tied embedding/head, the first and last layers.
GRAD_NAMES = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.17.mlp.down_proj.weight", "model.norm.weight")


@pytest.mark.parametrize(("precision", "tol"), [("no", 3e-4), ("bf16", 2e-2)])
def test_label_position_logps_equal_the_full_logits_on_gemma(gemma, precision: str,
                                                             tol: float) -> None:
    """Sums and gradients: the head at label positions against a softmax over all 262,144
    logits, in fp32 and under CPU bf16 autocast. Gradients agree as a whole (‖Δg‖ / ‖g‖ ≤ tol),
    since 18 layers spread the reduction-order noise of fp32 over every element (measured on
    this machine: 1.1e-4 for the embedding in fp32, the largest elementwise gap 1.5e-4 of the
    largest element; 7e-3 of it in bf16). The full-logit gradient of the
    embedding also carries the 262k-column softmax at every label, so it checks the tied head's
    backward."""
    model, tokenizer, _ = gemma
    enc = Encoder(tokenizer, resolve_template("auto", tokenizer), 48)
    batch = collate(enc.sequences(PROMPTS, RESPONSES), tokenizer.pad_token_id)
    model.eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name in GRAD_NAMES)

    def run(score) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            lp = score()
        lp.sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}

    try:
        want, want_g = run(lambda: full_logits(batch)(model)[0])
        got, got_g = run(lambda: batch_logps(model, batch, 1)[0])
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
    assert torch.isfinite(want).all() and (want < 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5 if precision == "no" else 2e-3, atol=1e-3)
    assert got_g.keys() == want_g.keys() == set(GRAD_NAMES)
    for name in GRAD_NAMES:
        rel = ((got_g[name] - want_g[name]).norm() / want_g[name].norm()).item()
        assert rel <= tol, (name, rel)


def test_gemma_through_every_stage(tmp_path: Path) -> None:
    # Sizes for CI's 2 cores: one SFT step of 16 sequences, one SafeDPO step of 8 pairs.
    project = copy_project(tmp_path, {
        "dataset": {"toy": {"n_train": 8, "n_test": 4}},
        "model": {"name": GEMMA_270M, "template": "auto"},
        "sft": {"epochs": 1, "batch_size": 16, "max_length": 48, "lr": 2e-5, "log_every": 1},
        "train": {"epochs": 1, "batch_size": 8, "max_length": 48, "lr": 1e-5,
                  "checkpoint_every": 1000},
        "generate": {"n_prompts": 2, "max_new_tokens": 8, "batch_size": 8},
        "judge": {"offline": {"epochs": 2, "n_features": 4096, "vocab_buckets": 65536}},
        "evaluate": {"bootstrap": 100},
        "suites": [{"name": "redteam", "source": "builtin:redteam", "max_prompts": 2}]})
    log = run([str(BIN / "dvc"), "repro", "evaluate"], project)
    assert stages_run(log) >= {"sft", "ref_logps", "train", "generate@sft", "generate@policy",
                               "judge", "evaluate"}
    # No stage converted the model once more (the first run on a machine converts it once).
    assert log.count("gguf: converting") <= 1
    assert "log-probs from label positions only" in log
    key = json.loads((project / "data/model_key.json").read_text())
    assert key["kind"] == "gguf" and key["sha256"] == locate(GEMMA_270M).sha256

    # Step 0: the policy is its reference, so its implicit rewards are 0 (β·log-ratio).
    for side in ("chosen", "rejected"):
        tsv = pd.read_csv(project / f"dvclive/plots/metrics/rewards/{side}.tsv", sep="\t")
        assert abs(tsv.iloc[0, -1]) < 2e-3, (side, tsv.iloc[0].tolist())
    # The optimizer moved the weights.
    with safe_open(project / "data/sft/model.safetensors", "pt") as a, \
            safe_open(project / "data/policy/model.safetensors", "pt") as b:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(a.get_tensor(name), b.get_tensor(name))

    # <end_of_turn> ends generation: no token after it, never in the text.
    gens = pd.read_parquet(project / "data/generations/policy.parquet")
    assert len(gens) == 2 + 2
    stops = {END_OF_TURN, 1}
    for ids, reason, text in zip(gens["token_ids"], gens["finish_reason"], gens["response"],
                                 strict=True):
        assert not stops & set(ids[:-1].tolist())
        assert (reason == "eos") == (int(ids[-1]) in stops)
        assert "<end_of_turn>" not in text
    # KL is scored on the sampled ids: the policy's log-prob of one sample, recomputed.
    scores = pd.read_parquet(project / "data/eval/scores.parquet")
    row = scores[scores["model"] == "policy"].iloc[0]
    model, _ = load_pretrained(project / "data/policy")
    seq = [*row["prompt_ids"], *row["token_ids"]]
    labels = [-100] * len(row["prompt_ids"]) + list(row["token_ids"])
    with torch.no_grad():
        lp, _ = batch_logps(model.eval(), {"input_ids": torch.tensor([seq]),
                                           "attention_mask": torch.ones(1, len(seq), dtype=int),
                                           "labels": torch.tensor([labels])})
    assert lp.item() == pytest.approx(row["logp_policy"], abs=1e-3)
    metrics = json.loads((project / "data/eval/metrics.json").read_text())
    assert metrics["kl_to_ref"] is not None and metrics["suite_redteam_harmless_rate_n"] == 2
