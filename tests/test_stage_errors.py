"""Model-stage mistakes give one clear line and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from data_cli import assert_one_line_error, make_project, run_cli

from pipeline.config import TinyModelConfig
from pipeline.encoding import Encoder, resolve_template
from pipeline.modeling import build_tiny_model, save_model, train_tiny_tokenizer
from pipeline.reference import Fingerprint, fingerprint_for, write_reference


def _set(params: Path, section: str, **values: object) -> None:
    data = yaml.safe_load(params.read_text())
    data.setdefault(section, {}).update(values)
    params.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("max_new_tokens", 0, "generate.max_new_tokens: must be > 0"),
    ("temperature", -0.5, "generate.temperature: must be >= 0"),
    ("top_p", 0.0, "generate.top_p"),
])
def test_impossible_generation_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], key: str,
                                      value: object, fragment: str) -> None:
    params = make_project(tmp_path, monkeypatch)
    _set(params, "generate", **{key: value})
    code, _, err = run_cli(monkeypatch, capsys, "generate", "sft", "-p", str(params))
    assert_one_line_error(code, err, fragment)


def test_generate_without_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch)
    code, _, err = run_cli(monkeypatch, capsys, "generate", "policy", "-p", str(params))
    assert_one_line_error(code, err, "data/policy")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "nonsense", "-p", str(params))
    assert_one_line_error(code, err, "unknown model 'nonsense'")


def test_model_name_that_is_not_a_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch)
    (tmp_path / "empty").mkdir()
    _set(params, "model", name=str(tmp_path / "empty"))
    assert run_cli(monkeypatch, capsys, "download", "-p", str(params))[0] == 0
    assert run_cli(monkeypatch, capsys, "normalize", "-p", str(params))[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "sft", "-p", str(params))
    assert_one_line_error(code, err, "no config.json")
    _set(params, "model", name="builtin:huge")
    code, _, err = run_cli(monkeypatch, capsys, "sft", "-p", str(params))
    assert_one_line_error(code, err, "unknown built-in model 'builtin:huge'")
    _set(params, "model", name="builtin:tiny")
    _set(params, "sft", enabled=False)
    code, _, err = run_cli(monkeypatch, capsys, "sft", "-p", str(params))
    assert_one_line_error(code, err, "sft.enabled: false")


def test_nan_reference_stops_training_with_one_line(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch, toy={"n_train": 40, "n_test": 10})
    _set(params, "train", batch_size=8, max_length=96)
    assert run_cli(monkeypatch, capsys, "download", "-p", str(params))[0] == 0
    assert run_cli(monkeypatch, capsys, "normalize", "-p", str(params))[0] == 0
    pairs = pd.read_parquet("data/pairs/train.parquet")
    tok = train_tiny_tokenizer(pairs["prompt"].tolist() + pairs["response_0"].tolist(), 300)
    save_model(build_tiny_model(TinyModelConfig(vocab_size=300, hidden_size=16,
                                                intermediate_size=32, num_layers=1,
                                                num_heads=2, num_kv_heads=2), tok),
               tok, resolve_template("plain", tok), Path("data/sft"))
    ref = pd.DataFrame({"pair_id": pairs["pair_id"], "logp_0": np.nan, "logp_1": -3.0,
                        "ntok_0": 5, "ntok_1": 5})
    plain = resolve_template("plain", tok)
    write_reference(ref, fingerprint_for(Path("data/sft"), Encoder(tok, plain, 96), "auto",
                                         pairs, "cpu"),
                    Path("data/ref_logps/train.parquet"))
    code, _, err = run_cli(monkeypatch, capsys, "train", "-p", str(params))
    # The training progress bar had started; the error is the one line after it.
    err = "\n".join(line for line in err.splitlines() if "step/s" not in line)
    assert_one_line_error(code, err, "loss is nan at step 0")
    # A reference file computed for another max length is refused before any training.
    fp = fingerprint_for(Path("data/sft"), Encoder(tok, plain, 64), "auto", pairs, "cpu")
    write_reference(ref.fillna(-3.0), Fingerprint(**fp.as_dict()),
                    Path("data/ref_logps/train.parquet"))
    code, _, err = run_cli(monkeypatch, capsys, "train", "-p", str(params))
    assert_one_line_error(code, err, "max_length: stored 64 != current 96",
                          "rerun `dvc repro -s -f ref_logps`")
