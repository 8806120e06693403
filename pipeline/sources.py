"""The `download` stage's logic: fetch the raw data set named by `dataset.name`.

Three kinds of source:

- `builtin:toy`: generated offline by `pipeline.toydata` from `dataset.toy`.
- a local file (`.jsonl`, `.json`, `.parquet`, `.csv`): split by its `split` column
  (`dataset.train_split` / `dataset.test_split`) if it has one, else by a seeded hash of the
  prompt, so one prompt never lands in both splits (`dataset.test_fraction`, `dataset.split_seed`).
- a hub data set (`owner/name`), read with `datasets.load_dataset(name, revision=...)`. The
  revision is pinned by default where a commit is known (`PINNED_REVISIONS`); otherwise the user
  must set `dataset.revision`, so a run never silently follows a moving branch.

Raw rows keep their original columns (normalize maps them) plus `source_row`, the row's position
in its source (0-based data row within the file, or within the hub split), so a rejected row can
be traced back. Errors while parsing a text file name its 1-based line instead, as editors count.
`dataset.max_rows` keeps the first rows of each split.

`source_key` and `model_key` identify the data set and the starting model before anything is
read, for the always-run `source` stage.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import file_sha256, frame_hash, refuse_broken_link, weights_hash
from pipeline.config import DatasetConfig, ModelConfig
from pipeline.errors import UserError
from pipeline.gguf import is_gguf
from pipeline.gguf import model_key as gguf_model_key
from pipeline.normalize import NONTEXT_PREFIX, TEXT_COLUMNS, is_text_or_null

TOY = "builtin:toy"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SOURCE_ROW = "source_row"
SPLIT_COLUMN = "split"

#: Hub revisions used when `dataset.revision` is null. Only commits seen on the hub are listed:
#: 8b87c33... is a commit of PKU-Alignment/PKU-SafeRLHF (the v1 release, data/Alpaca-*/); no
#: verified commit of PKU-Alignment/PKU-SafeRLHF-30K was found, so it requires an explicit
#: `dataset.revision` (see `_hub_revision`).
PINNED_REVISIONS: dict[str, str] = {
    "PKU-Alignment/PKU-SafeRLHF": "8b87c3304fe428df5ae84a5a00f9d3ef9e4f135e",
}
#: Known hub data sets without a verified pin, and where to find a commit to pin.
UNPINNED_KNOWN: dict[str, str] = {
    "PKU-Alignment/PKU-SafeRLHF-30K":
        "https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF-30K/commits/main",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HINT = ("set dataset.name to a local file (.jsonl, .json, .parquet, .csv) or to builtin:toy "
         "to run offline")


@dataclass
class RawData:
    """The two raw splits and what `source.json` records about them."""

    train: pd.DataFrame
    test: pd.DataFrame
    source: str
    kind: str
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        hashes = {"train": frame_hash(self.train), "test": frame_hash(self.test)}
        return {
            "source": self.source,
            "kind": self.kind,
            "revision": self.revision,
            "rows": {"train": len(self.train), "test": len(self.test)},
            "columns": list(self.train.columns),
            "content_hash": hashes,
            **self.extra,
        }


def fetch(cfg: DatasetConfig) -> RawData:
    """Resolve `cfg.name` to a source and return its capped train and test splits."""
    name = cfg.name.strip()
    refuse_broken_link(Path(name), "dataset.name")
    if name == TOY:
        raw = _fetch_toy(cfg)
    elif name.startswith("builtin:"):
        raise UserError(f"unknown built-in data set {name!r}; the only one is {TOY!r}")
    elif Path(name).suffix.lower() in FILE_SUFFIXES or Path(name).exists():
        raw = _fetch_file(Path(name), cfg)
    elif _HUB_ID.match(name):
        raw = _fetch_hub(name, cfg)
    else:
        raise UserError(f"dataset.name {name!r} is not {TOY!r}, an existing file "
                        f"({', '.join(FILE_SUFFIXES)}) or a hub id like owner/name")
    if cfg.max_rows is not None:
        raw.train = raw.train.head(cfg.max_rows).reset_index(drop=True)
        raw.test = raw.test.head(cfg.max_rows).reset_index(drop=True)
    for split, df in (("train", raw.train), ("test", raw.test)):
        if len(df) == 0:
            raise UserError(f"the {split} split of {raw.source} has no rows")
    return raw


def source_key(cfg: DatasetConfig) -> dict[str, Any]:
    """What identifies the raw data before it is read: the toy parameters, a local file's
    content hash, or a hub id at its pinned revision. The `source` stage writes it on every
    `dvc repro` (cheaply: no download), so editing a local file reruns `download` and everything
    after it, while an unchanged source leaves the file byte-identical and the stages cached."""
    name = cfg.name.strip()
    if name == TOY:
        return {"kind": "builtin", "name": name}
    refuse_broken_link(Path(name), "dataset.name")
    path = Path(name)
    if path.is_file():
        return {"kind": "file", "name": name, "sha256": file_sha256(path)}
    if _HUB_ID.match(name) and path.suffix.lower() not in FILE_SUFFIXES:
        return {"kind": "hub", "name": name, "revision": _hub_revision(name, cfg)}
    # Anything else fails in `download` with its own message; nothing to fingerprint here.
    return {"kind": "unknown", "name": name}


def model_key(cfg: ModelConfig) -> dict[str, Any]:
    """What identifies the starting model beyond its params: a local directory's content (weights,
    tokenizer, template files). A hub id is pinned by `model.revision` and `builtin:tiny` by
    `model.tiny`, both params of `sft`. Written by the `source` stage on every `dvc repro`, so
    weights re-saved into the same directory rerun `sft` and all after it."""
    refuse_broken_link(Path(cfg.name), "model.name")
    if is_gguf(cfg.name):
        return gguf_model_key(cfg.name)
    if Path(cfg.name).is_dir():
        return {"kind": "local", "name": cfg.name, "sha256": weights_hash(Path(cfg.name))}
    return {"kind": "id", "name": cfg.name, "revision": cfg.revision}


def _fetch_toy(cfg: DatasetConfig) -> RawData:
    from pipeline import toydata

    train, test = toydata.generate(cfg.toy)
    for df in (train, test):
        df[SOURCE_ROW] = np.arange(len(df), dtype=np.int64)
    toy = {k: getattr(cfg.toy, k) for k in cfg.toy.__dataclass_fields__}
    return RawData(train, test, TOY, "builtin", extra={"toy": toy})


# --- local files -------------------------------------------------------------------------------

def read_table(path: Path) -> pd.DataFrame:
    """Read a local .jsonl / .json / .csv / .parquet file; every problem is one `UserError`."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise UserError("file not found", path=path)
    if not path.is_file():
        raise UserError("not a file", path=path)
    if suffix not in FILE_SUFFIXES:
        raise UserError(f"unsupported file type {suffix or '(none)'!r}; "
                        f"use one of {', '.join(FILE_SUFFIXES)}", path=path)
    if path.stat().st_size == 0:
        raise UserError("file is empty", path=path)
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"not a readable Parquet file ({first_line(exc)})",
                            path=path) from None
        df = _parquet_frame(table, path)
    else:
        text = _decode(path)
        if not text.strip():
            raise UserError("file is empty", path=path)
        df = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix](text, path)
    if len(df) == 0:
        raise UserError("file has no data rows", path=path)
    return df


def _parquet_frame(table: pa.Table, path: Path) -> pd.DataFrame:
    """A Parquet table as plain columns: dictionary-encoded ones (what pandas writes for a
    `category` column) decoded to their values, and the file's pandas metadata ignored when it
    no longer fits the data (a column retyped after it was written: pandas then fails to
    rebuild it); normalize judges the values themselves, row by row."""
    for i, col in enumerate(table.schema):
        if pa.types.is_dictionary(col.type):
            table = table.set_column(i, pa.field(col.name, col.type.value_type),
                                     table.column(i).cast(col.type.value_type))
    try:
        df = table.to_pandas()
    except (pa.ArrowException, TypeError, ValueError, KeyError):
        try:
            df = table.to_pandas(ignore_metadata=True)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise UserError(f"Parquet columns pandas cannot read ({first_line(exc)})",
                            path=path) from None
    for col in df.columns:
        if isinstance(df[col].dtype, pd.CategoricalDtype):  # a category named by metadata only
            df[col] = df[col].astype(df[col].cat.categories.dtype)
    return df


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start}); save the file as UTF-8", path=path) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(ValueError):
    pass


def _mark_invalid_text(obj: dict[str, Any]) -> dict[str, Any]:
    """A JSON string with a lone surrogate escape (`"\\ud800"`) is no Unicode text: nothing can
    store it as UTF-8. Such a value becomes a non-text marker, so normalize rejects its row
    (`bad_text`) and keeps the others."""
    out = {}
    for k, v in obj.items():
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                v = {"invalid_unicode": v.encode("utf-8", "backslashreplace").decode("ascii")}
        out[k] = v
    return out


def _read_jsonl(text: str, path: Path) -> pd.DataFrame:
    """One JSON object per line; a malformed line, a non-object or a key given twice in one
    object (which JSON readers resolve silently) is an error naming its line."""
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise UserError(f"line {i}: key {exc.args[0]!r} appears twice in one object",
                            path=path) from None
        except json.JSONDecodeError as exc:
            raise UserError(f"line {i}: malformed JSON line ({exc.msg})", path=path) from None
        if not isinstance(obj, dict):
            raise UserError(f"line {i}: each line must be a JSON object", path=path)
        records.append(_mark_invalid_text(obj))
    try:
        return pd.DataFrame.from_records(records)
    except OverflowError:
        # An integer beyond int64 (a label of 10**30): keep the values as they are and let
        # normalize reject the row with its reason.
        return pd.DataFrame(records, dtype=object)


def _read_json(text: str, path: Path) -> pd.DataFrame:
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise UserError(f"key {exc.args[0]!r} appears twice in one object", path=path) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"line {exc.lineno}: malformed JSON ({exc.msg})", path=path) from None
    if isinstance(obj, dict) and all(isinstance(v, list) for v in obj.values()) and obj:
        # {"train": [...], "test": [...]}: the keys become the split column.
        for k, v in obj.items():
            bad = [i for i, r in enumerate(v) if not isinstance(r, dict)]
            if bad:
                raise UserError(f"split {k!r}: item {bad[0]} is {json.dumps(v[bad[0]])[:40]}, "
                                "not a JSON object (expected {split: [records]})", path=path)
        frames = [pd.DataFrame.from_records([_mark_invalid_text(r) for r in v])
                  .assign(**{SPLIT_COLUMN: k}) for k, v in obj.items()]
        obj_df = pd.concat(frames, ignore_index=True)
    elif isinstance(obj, list):
        bad = [i for i, r in enumerate(obj) if not isinstance(r, dict)]
        if bad:
            raise UserError("expected a list of JSON objects; item is not an object",
                            path=path, row=bad[0])
        obj_df = pd.DataFrame.from_records([_mark_invalid_text(r) for r in obj])
    else:
        raise UserError("expected a list of records or {split: [records]}", path=path)
    return obj_df


def _read_csv(text: str, path: Path) -> pd.DataFrame:
    header = next(csv.reader(io.StringIO(text)), [])
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise UserError(f"line 1: column(s) {twice} appear twice in the header", path=path)
    try:
        # Everything as text: normalize coerces labels itself and must see the raw strings.
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                           na_values=[""])
    except (pd.errors.ParserError, ValueError) as exc:
        raise UserError(f"malformed CSV ({first_line(exc)})", path=path) from None


def _fetch_file(path: Path, cfg: DatasetConfig) -> RawData:
    df = read_table(path)
    reserved = [c for c in df.columns if c == SOURCE_ROW or str(c).startswith(NONTEXT_PREFIX)]
    if reserved:
        raise UserError(f"column(s) {reserved} are reserved for the pipeline's bookkeeping; "
                        "rename them", path=path)
    df[SOURCE_ROW] = np.arange(len(df), dtype=np.int64)
    if SPLIT_COLUMN in df.columns:
        train, test = _split_by_column(df, cfg, path)
        how = f"column {SPLIT_COLUMN!r}"
    else:
        train, test = hash_split(df, cfg, path)
        how = f"hash of prompt (test_fraction={cfg.test_fraction}, split_seed={cfg.split_seed})"
    return RawData(train, test, str(path), "file", extra={"split_by": how})


def _split_by_column(df: pd.DataFrame, cfg: DatasetConfig, path: Path
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    split = df[SPLIT_COLUMN].astype("string")
    known = {cfg.train_split, cfg.test_split}
    other = sorted(set(split.dropna().unique()) - known)
    if other or split.isna().any():
        shown = other[:5] + (["<null>"] if split.isna().any() else [])
        raise UserError(f"values {shown} are neither dataset.train_split "
                        f"({cfg.train_split!r}) nor dataset.test_split ({cfg.test_split!r})",
                        path=path, column=SPLIT_COLUMN)
    parts = []
    for name in (cfg.train_split, cfg.test_split):
        part = df[split == name].drop(columns=[SPLIT_COLUMN]).reset_index(drop=True)
        if len(part) == 0:
            raise UserError(f"no rows with split {name!r}", path=path, column=SPLIT_COLUMN)
        parts.append(part)
    return parts[0], parts[1]


def hash_split(df: pd.DataFrame, cfg: DatasetConfig, where: object
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split by a seeded SipHash of the prompt, so every row of one prompt lands together."""
    if "prompt" not in df.columns:
        raise UserError("missing column 'prompt' (needed to split train/test without a "
                        f"{SPLIT_COLUMN!r} column)", path=where)
    key = format(cfg.split_seed & 0xFFFFFFFFFFFFFFFF, "016x")
    prompts = df["prompt"].astype("string").fillna("").to_numpy(dtype=object)
    h = pd.util.hash_array(prompts, hash_key=key, categorize=True)
    is_test = (h % np.uint64(1_000_000)) < np.uint64(round(cfg.test_fraction * 1_000_000))
    return (df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True))


# --- hub -----------------------------------------------------------------------------------------

def _hub_revision(name: str, cfg: DatasetConfig) -> str:
    if cfg.revision:
        return cfg.revision
    if name in PINNED_REVISIONS:
        return PINNED_REVISIONS[name]
    where = UNPINNED_KNOWN.get(name, f"https://huggingface.co/datasets/{name}/commits/main")
    raise UserError(f"{name!r} is no local file, and as a hub id it needs a pinned commit: "
                    f"dataset.revision is null and none is known; set dataset.revision to a "
                    f"commit sha (see {where}), or {_HINT}")


def _fetch_hub(name: str, cfg: DatasetConfig) -> RawData:
    revision = _hub_revision(name, cfg)
    try:
        import datasets

        ds = datasets.load_dataset(name, revision=revision)
    except Exception as exc:  # offline, unknown repo, bad revision: all end the same way
        raise UserError(f"could not load hub data set {name!r} at revision {revision} "
                        f"({type(exc).__name__}: {first_line(exc)}); {_HINT}") from None
    splits = list(ds.keys())
    if cfg.train_split not in splits:
        raise UserError(f"hub data set {name!r} has no split {cfg.train_split!r} "
                        f"(dataset.train_split); it has {splits}")
    train = ds[cfg.train_split].to_pandas()
    train[SOURCE_ROW] = np.arange(len(train), dtype=np.int64)
    extra: dict[str, Any] = {"splits": splits}
    if cfg.test_split in splits:
        test = ds[cfg.test_split].to_pandas()
        test[SOURCE_ROW] = np.arange(len(test), dtype=np.int64)
    else:
        train, test = hash_split(train, cfg, name)
        extra["split_by"] = f"hash of prompt (no {cfg.test_split!r} split on the hub)"
    return RawData(train, test, name, "hub", revision=revision, extra=extra)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --- writing -------------------------------------------------------------------------------------

def arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Columns Arrow cannot type (a JSON label column mixing true, 1 and "yes") become text.

    Only columns that fail are touched, and nulls stay null, so normalize still sees every value
    and can coerce or reject it with a reason.
    """
    out = df
    for col in df.columns:
        if df[col].dtype != object:
            continue
        try:
            pa.array(df[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            if out is df:
                out = df.copy()
            if col in TEXT_COLUMNS:
                out[NONTEXT_PREFIX + col] = ~df[col].map(is_text_or_null).astype(bool)
            out[col] = df[col].map(lambda v: v if v is None or v != v else _text(v))
    return out


def _text(v: object) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
