"""Model-stage mistakes give one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from data_cli import assert_one_line_error, make_project, run_cli
from transformers import PreTrainedTokenizerBase

from pipeline.config import TinyModelConfig
from pipeline.encoding import Encoder, resolve_template
from pipeline.modeling import build_tiny_model, load_pretrained, save_model, train_tiny_tokenizer
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


def _tiny_model(pairs: pd.DataFrame, out: Path) -> PreTrainedTokenizerBase:
    """A tiny random model saved as a stage saves it (with the record of its files)."""
    tok = train_tiny_tokenizer(pairs["prompt"].tolist() + pairs["response_0"].tolist(), 300)
    save_model(build_tiny_model(TinyModelConfig(vocab_size=300, hidden_size=16,
                                                intermediate_size=32, num_layers=1,
                                                num_heads=2, num_kv_heads=2), tok),
               tok, resolve_template("plain", tok), out)
    return tok


def _sft_and_reference(params: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str], logp_0: float) -> pd.DataFrame:
    """data/pairs, a tiny data/sft and stored reference log-probs (`logp_0` for response 0)."""
    assert run_cli(monkeypatch, capsys, "download", "-p", str(params))[0] == 0
    assert run_cli(monkeypatch, capsys, "normalize", "-p", str(params))[0] == 0
    pairs = pd.read_parquet("data/pairs/train.parquet")
    tok = _tiny_model(pairs, Path("data/sft"))
    ref = pd.DataFrame({"pair_id": pairs["pair_id"], "logp_0": logp_0, "logp_1": -3.0,
                        "ntok_0": 5, "ntok_1": 5})
    plain = resolve_template("plain", tok)
    write_reference(ref, fingerprint_for(Path("data/sft"), Encoder(tok, plain, 96), "auto",
                                         pairs, "cpu"),
                    Path("data/ref_logps/train.parquet"))
    return ref


def test_nan_reference_stops_training_with_one_line(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch, toy={"n_train": 40, "n_test": 10})
    _set(params, "train", batch_size=8, max_length=96)
    ref = _sft_and_reference(params, monkeypatch, capsys, np.nan)
    pairs = pd.read_parquet("data/pairs/train.parquet")
    tok = load_pretrained(Path("data/sft"))[1]
    plain = resolve_template("plain", tok)
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


def test_exploding_weights_stop_training_before_anything_is_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One step at lr 1e10: its loss and gradient are finite (computed at the start's
    weights), but Adam moves every weight by ~1e10. Nothing may be saved."""
    params = make_project(tmp_path, monkeypatch, toy={"n_train": 40, "n_test": 10})
    _set(params, "train", batch_size=32, max_length=96, epochs=1, lr=1e10, warmup_ratio=0.0,
         schedule="constant")
    _sft_and_reference(params, monkeypatch, capsys, -3.0)
    code, _, err = run_cli(monkeypatch, capsys, "train", "-p", str(params))
    err = "\n".join(line for line in err.splitlines() if "step/s" not in line)
    assert_one_line_error(code, err, "train diverged: the largest |weight| is 1e+10",
                          "train.max_weight_growth 100", "lower the learning rate")
    assert not Path("data/policy").exists() and not list(Path("data").glob(".policy*"))
    _set(params, "train", max_weight_growth=1.0)
    code, _, err = run_cli(monkeypatch, capsys, "train", "-p", str(params))
    assert_one_line_error(code, err, "train.max_weight_growth: must be > 1")


def test_a_model_dir_edited_after_its_stage_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch, toy={"n_train": 40, "n_test": 10})
    assert run_cli(monkeypatch, capsys, "download", "-p", str(params))[0] == 0
    assert run_cli(monkeypatch, capsys, "normalize", "-p", str(params))[0] == 0
    _tiny_model(pd.read_parquet("data/pairs/train.parquet"), Path("data/policy"))
    config = Path("data/policy/config.json")
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 0.1'))
    code, _, err = run_cli(monkeypatch, capsys, "generate", "policy", "-p", str(params))
    assert_one_line_error(code, err, "data/policy: its files were changed after `train` wrote",
                          "rerun `dvc repro train`")
    Path("data/policy/training_summary.json").unlink()  # a directory no stage wrote
    code, _, err = run_cli(monkeypatch, capsys, "generate", "policy", "-p", str(params))
    assert_one_line_error(code, err, "data/policy: no record of the files `train` wrote")
    assert not Path("data/generations/policy.parquet").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_exits_non_zero_with_one_line_and_no_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        sig: signal.Signals) -> None:
    """A real signal in the middle of `generate` (before the fix typer's KeyboardInterrupt ->
    Exit(130) was returned, not raised, and a Ctrl-C exited 0 with nothing written)."""
    params = make_project(tmp_path, monkeypatch, toy={"n_train": 40, "n_test": 10})
    # Long enough to be inside generation when the signal comes: ~250 batches.
    _set(params, "generate", n_prompts=10, samples_per_prompt=4, max_new_tokens=200,
         batch_size=4)
    for stage in ("download", "normalize", "suites"):
        assert run_cli(monkeypatch, capsys, stage, "-p", str(params))[0] == 0
    _tiny_model(pd.read_parquet("data/pairs/train.parquet"), Path("data/policy"))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "safedpo"), "generate", "policy",
                             "-p", str(params)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stderr is not None
    seen = b""
    while b"generate policy:" not in seen:  # its progress bar: the model is generating
        chunk = proc.stderr.read1(4096)
        assert chunk, seen
        seen += chunk
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    tail = (seen + err).decode().replace("\r", "\n").splitlines()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), tail[-3:]
    messages = [ln for ln in tail if ln.startswith("safedpo")]
    assert messages == ["safedpo: interrupted" if sig == signal.SIGINT
                        else "safedpo: terminated"], tail[-5:]
    assert out == b""
    assert sorted(p.name for p in Path("data").iterdir() if "generation" in p.name) in (
        [], ["generations"])
    assert not list(Path("data").rglob("*policy.parquet*"))
