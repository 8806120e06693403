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
from signals import ctrl_c_reaches_it
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
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=ctrl_c_reaches_it)
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


# --- hostile inputs of issue 25: text encodings, Parquet shapes, model kinds, links ----------

def _pairs(n: int = 40) -> list[dict]:
    return [{"prompt": f"question {i}", "response_0": f"answer {i}", "response_1": "I can't.",
             "is_response_0_safe": True, "is_response_1_safe": True,
             "better_response_id": 0, "safer_response_id": 1,
             "split": "test" if i % 4 == 0 else "train"} for i in range(n)]


def _rejected(split: str = "train") -> dict[str, int]:
    """normalize's rejections of `split`, by reason (the reasons that occurred)."""
    import json

    report = json.loads(Path("data/pairs/report.json").read_text())[split]
    return {k: v for k, v in report["rejected_by_reason"].items() if v}


def _rows(split: str = "train") -> tuple[int, int]:
    import json

    report = json.loads(Path("data/pairs/report.json").read_text())[split]
    return report["rows_in"], report["rows_out"]


def _download_normalize(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                        params: Path) -> tuple[int, str]:
    code, _, err = run_cli(monkeypatch, capsys, "download", "-p", str(params))
    if code:
        return code, err
    code, _, err = run_cli(monkeypatch, capsys, "normalize", "-p", str(params))
    return code, err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_escape_rejects_its_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str],
                                                 suffix: str) -> None:
    """`"\\ud800"` is valid JSON but no Unicode text (nothing stores it as UTF-8): its row is
    rejected as bad_text, the others kept."""
    import json

    rows = _pairs()
    text = [json.dumps(r) for r in rows]
    text[5] = text[5].replace('"answer 5"', '"answer \\ud800 5"')
    body = "\n".join(text) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(text) + "]"
    Path(tmp_path / f"d{suffix}").write_text(body)
    params = make_project(tmp_path, monkeypatch, dataset={"name": f"d{suffix}"})
    code, err = _download_normalize(monkeypatch, capsys, params)
    assert code == 0, err
    assert _rejected() == {"bad_text": 1}
    assert _rows() == (30, 29) and _rows("test") == (10, 10)


def test_parquet_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pd.DataFrame(_pairs())
    # Dictionary-encoded text (what pandas writes for a `category` column): valid, read as text.
    cat = df.assign(prompt=df["prompt"].astype("category"),
                    response_1=df["response_1"].astype("category"))
    pq.write_table(pa.Table.from_pandas(cat, preserve_index=False), tmp_path / "dict.parquet")
    params = make_project(tmp_path, monkeypatch, dataset={"name": "dict.parquet"})
    code, err = _download_normalize(monkeypatch, capsys, params)
    assert code == 0, err
    assert _rows() == (30, 30) and not _rejected()
    # A list-typed column under the pandas metadata of the text column it replaced.
    table = pa.Table.from_pandas(df, preserve_index=False)
    lists = pa.array([[p] for p in df["response_0"]], type=pa.list_(pa.string()))
    i = table.schema.get_field_index("response_0")
    stale = table.set_column(i, pa.field("response_0", lists.type), lists)
    pq.write_table(stale.replace_schema_metadata(table.schema.metadata),
                   tmp_path / "stale.parquet")
    _set(params, "dataset", name="stale.parquet")
    code, err = _download_normalize(monkeypatch, capsys, params)
    assert_one_line_error(code, err, "no train pairs are left", "'bad_text': 30")
    # {"train": [1, 2, 3]}: the split's items are not records.
    (tmp_path / "ints.json").write_text('{"train": [1, 2, 3], "test": []}')
    _set(params, "dataset", name="ints.json")
    code, err = _download_normalize(monkeypatch, capsys, params)
    assert_one_line_error(code, err, "ints.json: split 'train': item 0 is 1, not a JSON object")


def test_zero_width_twins_are_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Pairs that differ only by invisible characters (a zero-width space, a BOM, a full-width
    letter: NFKC plus format characters removed) are the same pair to a reader."""
    import json

    rows = _pairs()
    twins = [dict(rows[1], prompt="question\u200b 1"),
             dict(rows[2], prompt="\ufeffquestion 2", response_0="answer\u00ad 2"),
             dict(rows[3], response_0="ａnswer 3"),  # full-width a
             dict(rows[5], prompt="question 5 ")]  # a trailing space: stripped anyway
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + twins))
    params = make_project(tmp_path, monkeypatch, dataset={"name": "d.jsonl"})
    code, err = _download_normalize(monkeypatch, capsys, params)
    assert code == 0, err
    assert _rejected() == {"duplicate_pair": 4}


def test_wrong_model_kinds_and_broken_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig, BertForMaskedLM

    params = make_project(tmp_path, monkeypatch, toy={"n_train": 40, "n_test": 10})
    assert _download_normalize(monkeypatch, capsys, params)[0] == 0
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    capsys.readouterr()  # the save's progress bar
    _set(params, "judge", kind="guard", guard={"model": str(bert)})
    code, _, err = run_cli(monkeypatch, capsys, "judge", "-p", str(params))
    assert_one_line_error(code, err, "judge.guard.model is a bert checkpoint (BertForMaskedLM)",
                          "not a generative causal LM")
    Path("loop").symlink_to("loop")
    Path("gone").symlink_to("nowhere")
    _set(params, "model", name="loop")
    code, _, err = run_cli(monkeypatch, capsys, "source", "-p", str(params))
    assert_one_line_error(code, err, "loop: model.name is a symbolic link loop")
    _set(params, "model", name="builtin:tiny")
    _set(params, "dataset", name="gone")
    code, _, err = run_cli(monkeypatch, capsys, "download", "-p", str(params))
    assert_one_line_error(code, err, "gone: dataset.name is a symbolic link to 'nowhere', which "
                                     "does not exist")
    _set(params, "judge", kind="hub", reward_model="loop", cost_model="loop")
    code, _, err = run_cli(monkeypatch, capsys, "judge", "-p", str(params))
    assert_one_line_error(code, err, "loop: the judge model is a symbolic link loop")


def test_a_template_longer_than_max_length_is_refused_before_sft(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch, toy={"n_train": 40, "n_test": 10})
    preamble = " ".join(f"rule{i}: be careful and kind to everyone, always." for i in range(8))
    _set(params, "model", template=preamble + "\nUser: {prompt}\nAssistant:")
    _set(params, "sft", max_length=16)
    assert _download_normalize(monkeypatch, capsys, params)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "sft", "-p", str(params))
    assert_one_line_error(code, err, "parameter sft.max_length: 16 tokens cannot hold the prompt "
                                     "template", "raise it above")
    assert not Path("data/sft").exists()
