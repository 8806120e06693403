"""download: toy, local files of every format, hub sources, and one clear line per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_cli import assert_one_line_error, make_project, run_cli

from pipeline import artifacts, sources
from pipeline.config import DatasetConfig, ToyConfig
from pipeline.errors import UserError


def sample_rows(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt": [f"prompt number {i % 25}" for i in range(n)],
        "response_0": [f"first answer {i}" for i in range(n)],
        "response_1": [f"second answer {i}" for i in range(n)],
        "is_response_0_safe": [i % 2 == 0 for i in range(n)],
        "is_response_1_safe": [True] * n,
        "better_response_id": [i % 2 for i in range(n)],
        "safer_response_id": [0 if i % 2 == 0 else 1 for i in range(n)],
    })


def write(df: pd.DataFrame, path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        df.to_json(path, orient="records")
    elif suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_file_formats_agree(tmp_path: Path, suffix: str) -> None:
    path = write(sample_rows(), tmp_path / f"data{suffix}")
    raw = sources.fetch(DatasetConfig(name=str(path), test_fraction=0.3, split_seed=5))
    assert raw.kind == "file" and len(raw.train) + len(raw.test) == 40
    got = pd.concat([raw.train, raw.test]).sort_values("source_row").reset_index(drop=True)
    assert got["source_row"].tolist() == list(range(40))
    assert got["prompt"].tolist() == sample_rows()["prompt"].tolist()
    # Same split whatever the format: it depends on the prompt text and the seed only.
    reference = sources.fetch(DatasetConfig(name=str(write(sample_rows(), tmp_path / "r.parquet")),
                                            test_fraction=0.3, split_seed=5))
    assert sorted(raw.test["source_row"]) == sorted(reference.test["source_row"])


def test_hash_split_keeps_prompts_together_and_follows_seed(tmp_path: Path) -> None:
    path = write(sample_rows(400).assign(prompt=[f"p{i % 150}" for i in range(400)]),
                 tmp_path / "d.parquet")
    a = sources.fetch(DatasetConfig(name=str(path), test_fraction=0.25, split_seed=1))
    b = sources.fetch(DatasetConfig(name=str(path), test_fraction=0.25, split_seed=1))
    c = sources.fetch(DatasetConfig(name=str(path), test_fraction=0.25, split_seed=2))
    assert not set(a.train["prompt"]) & set(a.test["prompt"])
    assert a.test["source_row"].tolist() == b.test["source_row"].tolist()
    assert a.test["source_row"].tolist() != c.test["source_row"].tolist()
    assert 0.12 < len(a.test) / 400 < 0.40


def test_split_column_and_max_rows(tmp_path: Path) -> None:
    df = sample_rows(30).assign(split=["train"] * 20 + ["test"] * 10)
    path = write(df, tmp_path / "d.jsonl")
    raw = sources.fetch(DatasetConfig(name=str(path), max_rows=8))
    assert (len(raw.train), len(raw.test)) == (8, 8)
    assert "split" not in raw.train.columns
    assert raw.test["source_row"].tolist() == list(range(20, 28))
    renamed = write(df.assign(split=["fit"] * 20 + ["eval"] * 10), tmp_path / "e.csv")
    raw = sources.fetch(DatasetConfig(name=str(renamed), train_split="fit", test_split="eval"))
    assert (len(raw.train), len(raw.test)) == (20, 10)


def test_json_with_split_keys(tmp_path: Path) -> None:
    rows = sample_rows(6).to_dict("records")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": rows[:4], "test": rows[4:]}))
    raw = sources.fetch(DatasetConfig(name=str(path)))
    assert (len(raw.train), len(raw.test)) == (4, 2)


def test_toy_source_and_manifest() -> None:
    cfg = DatasetConfig(toy=ToyConfig(n_train=120, n_test=30, seed=4))
    raw = sources.fetch(cfg)
    assert (len(raw.train), len(raw.test)) == (120, 30)
    m = raw.manifest()
    assert m["source"] == "builtin:toy" and m["kind"] == "builtin" and m["revision"] is None
    assert m["rows"] == {"train": 120, "test": 30}
    assert m["toy"]["seed"] == 4
    assert m["content_hash"] == sources.fetch(cfg).manifest()["content_hash"]


class FakeSplit:
    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df

    def to_pandas(self) -> pd.DataFrame:
        return self.df.copy()


def test_hub_revision_pinning(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[str, str | None]] = []

    def fake_load(name: str, revision: str | None = None) -> dict[str, FakeSplit]:
        calls.append((name, revision))
        return {"train": FakeSplit(sample_rows(30)), "test": FakeSplit(sample_rows(5))}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    raw = sources.fetch(DatasetConfig(name="PKU-Alignment/PKU-SafeRLHF"))
    assert calls[-1] == ("PKU-Alignment/PKU-SafeRLHF",
                         sources.PINNED_REVISIONS["PKU-Alignment/PKU-SafeRLHF"])
    assert raw.manifest()["revision"] == calls[-1][1] and raw.kind == "hub"
    sources.fetch(DatasetConfig(name="PKU-Alignment/PKU-SafeRLHF-30K", revision="abc123"))
    assert calls[-1] == ("PKU-Alignment/PKU-SafeRLHF-30K", "abc123")
    with pytest.raises(UserError, match=r"set dataset\.revision to a commit sha"):
        sources.fetch(DatasetConfig(name="PKU-Alignment/PKU-SafeRLHF-30K"))
    with pytest.raises(UserError, match="has no split 'fit'"):
        sources.fetch(DatasetConfig(name="a/b", revision="r1", train_split="fit"))


def test_hub_without_test_split_is_hash_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, revision=None: {"train": FakeSplit(sample_rows(200))})
    raw = sources.fetch(DatasetConfig(name="someone/pairs", revision="r", test_fraction=0.5))
    assert len(raw.test) > 0 and not set(raw.train["prompt"]) & set(raw.test["prompt"])
    assert "hash of prompt" in raw.manifest()["split_by"]


def test_arrow_safe_keeps_mixed_labels_readable() -> None:
    df = pd.DataFrame({"flag": [True, "yes", 1, None], "text": ["a", "b", "c", "d"]})
    out = sources.arrow_safe(df)
    assert out["flag"].tolist()[:3] == ["True", "yes", "1"] and pd.isna(out["flag"][3])
    assert out["text"].tolist() == df["text"].tolist()
    assert df["flag"].tolist()[:3] == [True, "yes", 1]  # the input is not modified
    pa.Table.from_pandas(out)  # Arrow can now write it


def test_download_stage_writes_declared_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    params = make_project(tmp_path, monkeypatch, toy={"n_train": 80, "n_test": 20})
    code, out, err = run_cli(monkeypatch, capsys, "download", "-p", str(params))
    assert code == 0, err
    assert sorted(p.name for p in Path("data/raw").iterdir()) == [
        "source.json", "test.parquet", "train.parquet"]
    source = json.loads(Path("data/raw/source.json").read_text())
    assert source["rows"] == {"train": 80, "test": 20}
    assert pq.read_metadata("data/raw/train.parquet").num_rows == 80
    assert "80 train, 20 test" in out


def test_atomic_write_leaves_no_partial_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out" / "t.parquet"
    artifacts.write_parquet(sample_rows(3), dest)
    before = dest.read_bytes()

    def explode(table: object, where: object) -> None:
        Path(str(where)).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.pq, "write_table", explode)
    with pytest.raises(OSError, match="disk full"):
        artifacts.write_parquet(sample_rows(10), dest)
    assert dest.read_bytes() == before  # the old file is intact
    assert [p.name for p in dest.parent.iterdir()] == ["t.parquet"]  # no temp file left
    fresh = tmp_path / "out" / "new.parquet"
    with pytest.raises(OSError):
        artifacts.write_parquet(sample_rows(10), fresh)
    assert not fresh.exists()


# --- bad input through the CLI: one line, exit 2 -------------------------------------------------

def _bad_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


BAD_FILES = {
    "malformed_jsonl": ("d.jsonl", b'{"prompt": "a"}\n{"prompt": "b",,}\n',
                        ["d.jsonl", "line 2", "malformed JSON line"]),
    "jsonl_not_objects": ("d.jsonl", b'{"prompt": "a"}\n[1, 2]\n', ["line 2", "JSON object"]),
    "malformed_json": ("d.json", b'[{"prompt": "a"},\n {"prompt": }]', ["d.json", "line 2"]),
    "json_scalar": ("d.json", b'"just a string"', ["d.json", "list of records"]),
    "non_utf8": ("d.csv", b"prompt,response_0\nok,fine\ncaf\xe9,bad\n",
                 ["d.csv", "line 3", "not valid UTF-8", "0xe9"]),
    "empty_file": ("d.jsonl", b"", ["d.jsonl", "file is empty"]),
    "blank_file": ("d.csv", b"\n\n  \n", ["d.csv", "file is empty"]),
    "header_only_csv": ("d.csv", b"prompt,response_0\n", ["d.csv", "no data rows"]),
    "bad_parquet": ("d.parquet", b"this is not parquet", ["d.parquet", "not a readable Parquet"]),
    "unsupported_type": ("d.txt", b"hello", ["d.txt", "unsupported file type '.txt'"]),
    "bad_split_values": ("d.jsonl",
                         b'{"prompt": "a", "split": "train"}\n{"prompt": "b", "split": "dev"}\n',
                         ["column 'split'", "'dev'", "neither dataset.train_split"]),
    "no_test_rows": ("d.jsonl", b'{"prompt": "a", "split": "train"}\n',
                     ["column 'split'", "no rows with split 'test'"]),
    "no_prompt_for_split": ("d.jsonl", b'{"question": "a"}\n', ["missing column 'prompt'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_cli_bad_file(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    name, content, fragments = BAD_FILES[case]
    path = _bad_file(tmp_path, name, content)
    params = make_project(tmp_path, monkeypatch, dataset={"name": str(path)})
    code, _, err = run_cli(monkeypatch, capsys, "download", "-p", str(params))
    assert_one_line_error(code, err, *fragments)
    assert not Path("data/raw/train.parquet").exists()


BAD_NAMES = {
    "missing_file": ("nowhere/data.jsonl", {}, ["nowhere/data.jsonl", "file not found"]),
    "unknown_builtin": ("builtin:huge", {}, ["unknown built-in data set 'builtin:huge'"]),
    "unknown_source": ("my data please", {}, ["'my data please'", "hub id"]),
    "unpinned_hub": ("PKU-Alignment/PKU-SafeRLHF-30K", {},
                     ["is no local file", "dataset.revision is null", "builtin:toy"]),
    "offline_hub": ("PKU-Alignment/PKU-SafeRLHF-30K", {"revision": "0123abc"},
                    ["could not load hub data set", "0123abc", "local file", "builtin:toy"]),
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_cli_bad_source_name(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    name, extra, fragments = BAD_NAMES[case]
    # Offline for sure, and fast: no retries against an unreachable hub. The libraries read
    # the variable at import, so an already imported one is switched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    params = make_project(tmp_path, monkeypatch, dataset={"name": name, **extra})
    code, _, err = run_cli(monkeypatch, capsys, "download", "-p", str(params))
    assert_one_line_error(code, err, *fragments)


def test_model_key_follows_a_local_directory_content(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import ModelConfig

    monkeypatch.chdir(tmp_path)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights one")
    (d / "training_summary.json").write_text("{}")  # notes: not part of the identity
    first = sources.model_key(ModelConfig(name=str(d)))
    assert first["kind"] == "local" and len(first["sha256"]) == 16
    (d / "training_summary.json").write_text('{"seconds": 3}')
    assert sources.model_key(ModelConfig(name=str(d))) == first
    (d / "model.safetensors").write_bytes(b"other weights")  # another size: no mtime race
    assert sources.model_key(ModelConfig(name=str(d)))["sha256"] != first["sha256"]
    hub = sources.model_key(ModelConfig(name="org/model", revision="abc"))
    assert hub == {"kind": "id", "name": "org/model", "revision": "abc"}
    # Pickled weights only: refused with what to do, before any stage loads them.
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"only pickled \.bin weights.*safetensors"):
        sources.model_key(ModelConfig(name=str(d)))


def test_model_hashes_are_kept_between_processes_in_a_dvc_project(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The always-run `source` stage and every stage fingerprinting a model would read a 7B
    model's ~15 GB each time: inside a DVC project each file is hashed once per content."""
    from pipeline import paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights one")
    first = artifacts.weights_hash(d)
    assert paths.HASH_CACHE.exists()
    artifacts._hash_files.cache_clear()  # as a new process would start
    read: list[Path] = []
    real = artifacts.file_sha256
    monkeypatch.setattr(artifacts, "file_sha256", lambda p: read.append(p) or real(p))
    assert artifacts.weights_hash(d) == first and read == []
    (d / "model.safetensors").write_bytes(b"other weights")
    assert artifacts.weights_hash(d) != first and len(read) == 1
    assert len(json.loads(paths.HASH_CACHE.read_text())) == 1  # the stale entry is gone
