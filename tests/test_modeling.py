"""Loading hub-shaped checkpoints: bf16 weights train in fp32 and are saved back in bf16,
dropout is switched off."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from real_models import corpus, metaspace_tokenizer, pku_v1_rows, save_hub_like, tiny_llama
from safetensors.torch import load_file

from pipeline.config import ModelConfig, SFTConfig, TinyModelConfig, ToyConfig
from pipeline.encoding import Template
from pipeline.modeling import (
    build_tiny_model,
    disable_dropout,
    load_pretrained,
    save_model,
    stored_dtype,
    train_tiny_tokenizer,
)
from pipeline.normalize import normalize_splits
from pipeline.sft import run_sft
from pipeline.toydata import generate


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same weights saved as a bf16 hub checkpoint and as its fp32 twin."""
    tok = metaspace_tokenizer(corpus(pku_v1_rows(3, words=(20, 40))), vocab_size=400)
    model = tiny_llama(tok, seed=0, hidden=64)
    root = tmp_path_factory.mktemp("ckpt")
    bf16 = save_hub_like(model, tok, root / "bf16", torch.bfloat16)
    # The twin holds exactly the bf16 values, in fp32.
    fp32 = save_hub_like(model.to(torch.bfloat16).to(torch.float32), tok, root / "fp32",
                         torch.float32)
    return bf16, fp32


def _moved(before: dict, after: dict) -> float:
    """Share of weights an optimizer step changed (embedding rows of unseen tokens get no
    gradient, so the embedding is left out)."""
    keys = [k for k in after if "embed_tokens" not in k]
    return sum(int((after[k] != before[k]).sum()) for k in keys) / \
        sum(after[k].numel() for k in keys)


def _one_adamw_step(model_dir: Path, **load: object) -> tuple[dict, dict]:
    model, _ = load_pretrained(model_dir, **load)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return before, {k: v.detach() for k, v in model.named_parameters()}


def test_a_bf16_checkpoint_trains_like_its_fp32_twin(checkpoints: tuple[Path, Path]) -> None:
    bf16, fp32 = checkpoints
    b0, b1 = _one_adamw_step(bf16)  # the way `train` loads: fp32 master weights
    f0, f1 = _one_adamw_step(fp32)
    assert all(v.dtype == torch.float32 for v in b1.values())
    for k in b1:
        torch.testing.assert_close(b0[k], f0[k], rtol=0, atol=0)
        torch.testing.assert_close(b1[k], f1[k], rtol=1e-6, atol=1e-9)
    assert _moved(b0, b1) > 0.95
    # Loading in the checkpoint's own dtype (transformers' "auto", what dtype=None meant) puts
    # bf16 parameters under the optimizer: an lr-1e-6 step then mostly rounds away.
    a0, a1 = _one_adamw_step(bf16, dtype="auto")
    assert next(iter(a1.values())).dtype == torch.bfloat16
    assert _moved(a0, a1) < 0.2


def test_dropout_is_switched_off(tmp_path: Path) -> None:
    tok = metaspace_tokenizer(corpus(pku_v1_rows(2, words=(20, 40))), vocab_size=300)
    model = tiny_llama(tok, seed=1, dropout=0.5)
    model.train()
    ids = torch.arange(3, 30).view(1, -1)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.equal(a, b)  # attention dropout at p = 0.5 in train mode
    assert disable_dropout(model) > 0
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        model.eval()
        c = model(input_ids=ids).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_load_errors_say_what_is_wrong(tmp_path: Path) -> None:
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="model directory not found") as e:
        load_pretrained(str(tmp_path / "inputs" / "llama_typo"))
    assert "llama_typo" in str(e.value)
    for hub_id in ("org/model", "gpt2"):  # a legacy id without owner is still a hub id
        with pytest.raises(UserError, match=r"needs model\.revision"):
            load_pretrained(hub_id)


def _toy_pairs() -> tuple[pd.DataFrame, pd.DataFrame]:
    train_raw, test_raw = generate(ToyConfig(n_train=24, n_test=8, seed=1))
    train, test, _ = normalize_splits(train_raw, test_raw)
    return train, test


def test_sft_saves_in_the_dtype_of_the_checkpoint_it_loaded(
        checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    """Trained in fp32 (master weights), saved in bf16 as loaded: half the disk; the policy
    follows the SFT model's dtype; `model.save_dtype` overrides."""
    bf16, _ = checkpoints
    train, test = _toy_pairs()
    cfg = SFTConfig(lr=1e-3, epochs=1, batch_size=8, max_length=64)
    summary = run_sft(ModelConfig(name=str(bf16)), cfg, train, test, tmp_path / "sft")
    assert summary["saved_dtype"] == "torch.bfloat16"
    saved = load_file(tmp_path / "sft" / "model.safetensors")
    start = load_file(bf16 / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["dtype"] == "bfloat16"
    assert stored_dtype(tmp_path / "sft") == torch.bfloat16
    # The training steps survive the cast back to bf16.
    assert any(not torch.equal(saved[k], start[k]) for k in saved)
    summary = run_sft(ModelConfig(name=str(bf16), save_dtype="float32"), cfg, train, test,
                      tmp_path / "sft32")
    assert summary["saved_dtype"] == "torch.float32"
    assert {t.dtype for t in load_file(tmp_path / "sft32" / "model.safetensors").values()} \
        == {torch.float32}
    assert stored_dtype(tmp_path / "sft32") == torch.float32


def test_save_model_casts_a_copy_and_keeps_fp32_bytes(tmp_path: Path) -> None:
    tok = train_tiny_tokenizer(corpus(pku_v1_rows(3, words=(20, 40))), 400)
    model = build_tiny_model(TinyModelConfig(vocab_size=400, hidden_size=32,
                                             intermediate_size=64, num_layers=1, num_heads=2,
                                             num_kv_heads=2), tok)
    template = Template("format", "User: {prompt}\nAssistant:")
    save_model(model, tok, template, tmp_path / "plain")
    save_model(model, tok, template, tmp_path / "fp32", dtype=torch.float32)
    save_model(model, tok, template, tmp_path / "bf16", dtype=torch.bfloat16)
    # `builtin:tiny` (fp32 in, fp32 out) writes exactly what it wrote before.
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "fp32" / name).read_bytes()
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "bf16" / "model.safetensors")
    # The tied embedding is still written once, and the model in memory is untouched.
    assert a.keys() == b.keys()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16))
               for k in a)
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size \
        < 0.6 * (tmp_path / "plain" / "model.safetensors").stat().st_size


def test_load_for_scoring_gives_a_checked_eval_model_and_its_encoder(tmp_path: Path) -> None:
    """The one loader of a model ready to score: eval mode (its dropout inactive), the dtype
    asked for, the template it was saved with, and the saved files checked."""
    from pipeline.errors import UserError
    from pipeline.modeling import load_for_scoring

    tok = metaspace_tokenizer(corpus(pku_v1_rows(2, words=(20, 40))), vocab_size=300)
    model = tiny_llama(tok, seed=1, dropout=0.5)
    template = Template("format", "Q: {prompt}\nA:")
    save_model(model, tok, template, tmp_path / "m", {"note": 1})
    scorer, encoder = load_for_scoring(tmp_path / "m", "sft", dtype=torch.bfloat16,
                                       max_length=48, device="cpu")
    assert not scorer.training and next(scorer.parameters()).dtype == torch.bfloat16
    assert encoder.template == template and encoder.max_length == 48
    ids = torch.arange(3, 30).view(1, -1)
    with torch.no_grad():
        assert torch.equal(scorer(input_ids=ids).logits, scorer(input_ids=ids).logits)
    (tmp_path / "m" / "config.json").write_text(
        (tmp_path / "m" / "config.json").read_text().replace("{", "{\n", 1))
    with pytest.raises(UserError, match="changed after `sft` wrote them"):
        load_for_scoring(tmp_path / "m", "sft", dtype=torch.float32, max_length=48)
