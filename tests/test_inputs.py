"""Hostile and broken inputs: each is refused with one line (or handled), never accepted
silently, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from data_cli import REPO, assert_one_line_error, make_project, run_cli

from pipeline.artifacts import atomic_path, write_json
from pipeline.config import load_params
from pipeline.errors import UserError


def _params(tmp_path: Path, edit: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in edit.items():
        *parents, last = dotted.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize(("edit", "message"), [
    ({"train.lr": float("inf")}, "train.lr: must be a finite number"),
    ({"train.epochs": float("inf")}, "train.epochs: must be a finite number"),
    ({"delta": float("nan")}, "delta: must be a finite number"),
    ({"model.tiny.max_position_embeddings": 64}, "model.tiny.max_position_embeddings: must be"),
    ({"model.template": "no field"}, "model.template"),
])
def test_bad_parameter_values(tmp_path: Path, edit: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_params(_params(tmp_path, edit))


def test_broken_parameter_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(UserError, match="is empty"):
        load_params(empty)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 0\nbeta: 0.1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_params(latin)
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(UserError, match="is a directory"):
        load_params(folder)
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("seed: 0\n1: a\nzz: b\n")
    with pytest.raises(UserError, match=r"unknown parameter\(s\) \['1', 'zz'\]"):
        load_params(mixed)


def test_metrics_json_is_strict(tmp_path: Path) -> None:
    import numpy as np

    write_json({"a": float("nan"), "b": [np.float64("inf"), 1.5], "c": np.int64(3)},
               tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": 3}


def test_a_killed_write_leaves_nothing_the_next_one_keeps(tmp_path: Path) -> None:
    dest = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    (tmp_path / ".out.json.tmp").write_text("left by a kill -9")  # what a hard kill leaves
    write_json({"x": 1}, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_pickle_only_model_directory_is_refused(tmp_path: Path) -> None:
    """`pytorch_model.bin` is a pickle: loading it can run code. Only safetensors load."""
    import torch
    from real_models import metaspace_tokenizer, tiny_llama

    from pipeline.modeling import load_pretrained

    tok = metaspace_tokenizer(["a b c d e f g"] * 20, vocab_size=40, chat_template=None)
    model = tiny_llama(tok)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists()
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(UserError, match="could not load model"):
        load_pretrained(tmp_path, dtype=torch.float32)


def test_evaluate_refuses_a_policy_trained_from_another_sft_model(tmp_path: Path) -> None:
    from pipeline.artifacts import weights_hash
    from pipeline.evaluation import check_lineage
    from pipeline.paths import SUMMARY_FILE

    sft, other, policy = (tmp_path / n for n in ("sft", "other", "policy"))
    for d, payload in ((sft, b"weights A"), (other, b"weights B")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(payload)
    policy.mkdir()
    (policy / SUMMARY_FILE).write_text(json.dumps({"sft_model": weights_hash(sft)}))
    check_lineage(policy, sft)
    with pytest.raises(UserError, match="trained from another SFT model"):
        check_lineage(policy, other)
    (policy / SUMMARY_FILE).write_text("{}")
    with pytest.raises(UserError, match="no record of the SFT model"):
        check_lineage(policy, sft)


def test_an_unexpected_error_is_one_line_and_verbose_shows_the_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch)
    import stages.download

    def boom(params_file: Path) -> None:
        raise KeyError("something the code did not expect")

    monkeypatch.setattr(stages.download, "run", boom)
    code, _, err = run_cli(monkeypatch, capsys, "download", "-p", str(params))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("safedpo: unexpected error: KeyError") and "-v" in lines[0]
    with pytest.raises(KeyError):
        run_cli(monkeypatch, capsys, "-v", "download", "-p", str(params))
    # A user's mistake stays a one-line error with exit code 2.
    params.write_text("")
    code, _, err = run_cli(monkeypatch, capsys, "normalize", "-p", str(params))
    assert_one_line_error(code, err, "is empty")


def test_normalize_fails_early_on_an_empty_or_seen_test_split() -> None:
    import pandas as pd

    from pipeline.normalize import normalize_splits

    rows = pd.DataFrame({
        "prompt": [f"p{i}" for i in range(6)], "response_0": [f"a{i}" for i in range(6)],
        "response_1": [f"b{i}" for i in range(6)], "is_response_0_safe": [True] * 6,
        "is_response_1_safe": [False] * 6, "better_response_id": [0] * 6,
        "safer_response_id": [0] * 6})
    # test = train: every test pair is a train pair, so none is left.
    with pytest.raises(UserError, match="no test pairs are left"):
        normalize_splits(rows, rows)
    # Other responses to the same prompts: pairs are left, but nothing is held out.
    other = rows.assign(response_1=[f"c{i}" for i in range(6)])
    with pytest.raises(UserError, match="allow_seen_test_prompts"):
        normalize_splits(rows, other)
    _, test, report = normalize_splits(rows, other, allow_seen_test_prompts=True)
    assert len(test) == 6 and report["test"]["pairs_with_prompt_in_train"] == 6


def test_truncated_or_foreign_artifacts_say_which_stage_to_rerun(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd
    import torch
    from real_models import metaspace_tokenizer, tiny_llama

    from pipeline.artifacts import read_parquet, read_parquet_metadata, write_parquet
    from pipeline.encoding import Encoder, resolve_template
    from pipeline.modeling import load_pretrained, save_model
    from pipeline.reference import fingerprint_for, read_reference

    tok = metaspace_tokenizer(["a b c d e f g"] * 20, vocab_size=40, chat_template=None)
    model_dir = tmp_path / "sft"
    save_model(tiny_llama(tok), tok, resolve_template("plain", tok), model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"unreadable weights.*rerun the stage"):
        load_pretrained(model_dir, dtype=torch.float32)

    ref = tmp_path / "ref.parquet"
    df = pd.DataFrame({"pair_id": ["a"], "logp_0": [-1.0], "logp_1": [-2.0],
                       "ntok_0": np.int32([1]), "ntok_1": np.int32([1])})
    write_parquet(df, ref, metadata={"fingerprint": {"model": "x", "surprise": 1}})
    save_model(tiny_llama(tok), tok, resolve_template("plain", tok), model_dir)
    expected = fingerprint_for(model_dir, Encoder(tok, resolve_template("plain", tok), 64),
                               "no", pd.DataFrame({"pair_id": ["a"], "prompt": ["p"],
                                                   "response_0": ["x"], "response_1": ["y"]}),
                               "cpu")
    with pytest.raises(UserError, match="fingerprint of another format"):
        read_reference(ref, expected)
    ref.write_bytes(ref.read_bytes()[:40])
    for reader in (read_parquet, read_parquet_metadata):
        with pytest.raises(UserError, match=r"not a readable Parquet file.*rerun"):
            reader(ref)


def test_negative_seed_and_lora_targets_that_match_nothing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"dataset\.toy\.seed: a seed must be"):
        load_params(_params(tmp_path, {"dataset.toy.seed": -1}))
    from real_models import metaspace_tokenizer, tiny_llama

    from pipeline.config import LoraConfig
    from pipeline.preference import _apply_lora

    tok = metaspace_tokenizer(["a b c d e f g"] * 20, vocab_size=40, chat_template=None)
    with pytest.raises(UserError, match=r"target_modules.*q_proj"):
        _apply_lora(tiny_llama(tok), LoraConfig(enabled=True, target_modules=("c_attn",)))


def test_training_never_saves_non_finite_or_exploded_weights() -> None:
    import torch
    from real_models import metaspace_tokenizer, tiny_llama

    from pipeline.modeling import check_weights, max_abs_weight

    tok = metaspace_tokenizer(["a b c d e f g"] * 20, vocab_size=40, chat_template=None)
    model = tiny_llama(tok)
    start = max_abs_weight(model)
    assert start == 1.0  # the norm weights
    check_weights(model, "train", start, 100.0)
    with torch.no_grad():
        model.model.norm.weight[1] = 99.0  # within 100 x the start
    check_weights(model, "train", start, 100.0)
    with torch.no_grad():
        model.model.norm.weight[1] = 101.0
    with pytest.raises(UserError, match=r"train diverged: the largest \|weight\| is 101, more "
                                        r"than train.max_weight_growth 100 x 1"):
        check_weights(model, "train", start, 100.0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(UserError, match=r"non-finite weights.*lower the learning rate"):
        check_weights(model, "train", start, 100.0)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"prompt": "how?", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
       "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0}


def test_raw_files_that_readers_would_resolve_silently(tmp_path: Path) -> None:
    from pipeline.sources import read_table

    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(ROW)[:-1] + ', "prompt": "again"}\n')
    with pytest.raises(UserError, match="line 1: key 'prompt' appears twice"):
        read_table(dup)
    csv = tmp_path / "dup.csv"
    csv.write_text("prompt,response_0,prompt\nq,a,r\n")
    with pytest.raises(UserError, match=r"line 1: column\(s\) \['prompt'\] appear twice"):
        read_table(csv)


def test_reserved_columns_and_huge_labels(tmp_path: Path) -> None:
    from pipeline.config import DatasetConfig
    from pipeline.sources import arrow_safe, fetch

    rows = [dict(ROW, prompt=f"q{i}", response_0=f"a{i}") for i in range(20)]
    own = _write_rows(tmp_path / "own.jsonl", [dict(r, source_row="x") for r in rows])
    with pytest.raises(UserError, match=r"\['source_row'\] are reserved"):
        fetch(DatasetConfig(name=str(own)))
    rows[3]["better_response_id"] = 10**30  # beyond int64
    raw = fetch(DatasetConfig(name=str(_write_rows(tmp_path / "big.jsonl", rows))))
    arrow_safe(pd.concat([raw.train, raw.test]))  # storable in Parquet, no OverflowError


def test_non_text_in_a_text_column_is_rejected_not_stringified(tmp_path: Path) -> None:
    from pipeline.normalize import normalize_frame
    from pipeline.sources import arrow_safe

    df = pd.DataFrame([dict(ROW, prompt=f"q{i}", response_1=v) for i, v in
                       enumerate(["fine", 5, [1, 2], {"a": 1}, "also fine"])])
    raw = arrow_safe(df)
    pa_table = __import__("pyarrow").Table.from_pandas(raw)  # what download writes
    res = normalize_frame(pa_table.to_pandas())
    assert dict(zip(res.rejected["row"], res.rejected["reason"], strict=True)) == {
        1: "bad_text", 2: "bad_text", 3: "bad_text"}
    assert res.pairs["response_1"].tolist() == ["fine", "also fine"]


def test_same_text_up_to_case_and_spacing_and_overlong_texts() -> None:
    from pipeline.normalize import normalize_frame

    df = pd.DataFrame([dict(ROW, prompt="p0", response_0="Hello  World", response_1="hello world "),
                       dict(ROW, prompt="p1", response_1="x" * 50),
                       dict(ROW, prompt="p2")])
    res = normalize_frame(df, max_text_chars=40)
    assert dict(zip(res.rejected["row"], res.rejected["reason"], strict=True)) == {
        0: "identical_responses", 1: "too_long"}


def test_a_hub_model_needs_a_pinned_revision() -> None:
    from pipeline.modeling import load_pretrained

    with pytest.raises(UserError, match=r"needs model\.revision"):
        load_pretrained("some-org/some-model")


def test_a_list_or_struct_prompt_column_is_rejected_per_row() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.normalize import normalize_frame

    table = pa.table({**{k: [v] * 3 for k, v in ROW.items() if k != "prompt"},
                      "prompt": [["a", "b"], ["c"], ["d"]]})
    res = normalize_frame(table.to_pandas())
    assert set(res.rejected["reason"]) == {"bad_text"} and len(res.pairs) == 0
    struct = pa.table({**{k: [v] * 2 for k, v in ROW.items() if k != "prompt"},
                       "prompt": [{"text": "a"}, {"text": "b"}]})
    buf = __import__("io").BytesIO()
    pq.write_table(struct, buf)
    res = normalize_frame(pq.read_table(buf).to_pandas())
    assert set(res.rejected["reason"]) == {"bad_text"}


def test_a_generations_file_missing_a_column_names_it(tmp_path: Path) -> None:
    from pipeline.artifacts import read_parquet, write_parquet
    from pipeline.generation import GENERATION_COLUMNS

    path = tmp_path / "policy.parquet"
    write_parquet(pd.DataFrame({"prompt_id": ["a"], "response": ["x"]}), path)
    with pytest.raises(UserError, match=r"missing column\(s\) \['suite', 'prompt'"):
        read_parquet(path, GENERATION_COLUMNS)
