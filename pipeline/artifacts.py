"""Reading and writing artifacts: Parquet tables, JSON metrics, atomically.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted stage never leaves a half-written file that a later stage could mistake for output.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.paths import HASH_CACHE, TEMPLATE_FILE


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds.

    The temporary name is fixed (`.NAME.tmp`), so what a killed run leaves is overwritten by
    the next one instead of piling up under random names."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = dest.with_name(f".{dest.name}.tmp")
    tmp_path.unlink(missing_ok=True)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dest`; if the block succeeds, swap it into place
    of `dest` (the old folder is moved aside first and put back if the swap fails), so a crash
    never leaves a folder that mixes two runs. Leftovers of a killed run are hidden dot-folders
    that the next call removes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = dest.with_name(f".{dest.name}.tmp"), dest.with_name(f".{dest.name}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if old.exists():
                os.replace(old, dest)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_parquet(df: pd.DataFrame, dest: Path, schema: pa.Schema | None = None,
                  metadata: dict[str, Any] | None = None) -> None:
    """Write `df` atomically; `metadata` is stored as JSON in the file's key-value metadata."""
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({f"safedpo.{k}".encode(): json.dumps(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: Path, required: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet artifact; a missing file or column is a `UserError` naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError("file not found (has the stage that writes it run?)", path=path)
    try:
        df = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"not a readable Parquet file ({exc}); rerun the stage that writes it",
                        path=path) from None
    missing = [c for c in required or [] if c not in df.columns]
    if missing:
        raise UserError(f"missing column(s) {missing}", path=path)
    return df


def read_parquet_metadata(path: Path) -> dict[str, Any]:
    """The `metadata` that `write_parquet` stored, without reading the data."""
    path = Path(path)
    if not path.exists():
        raise UserError("file not found (has the stage that writes it run?)", path=path)
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"not a readable Parquet file ({exc}); rerun the stage that writes it",
                        path=path) from None
    return {k.decode()[len("safedpo."):]: json.loads(v) for k, v in raw.items()
            if k.startswith(b"safedpo.")}


def write_json(obj: Any, dest: Path) -> None:
    """Strict JSON (what every reader accepts): NaN and infinities, which `json` would write as
    bare `NaN`/`Infinity`, become null."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default,
                      allow_nan=False)
    with atomic_path(dest) as tmp:
        tmp.write_text(text + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError("file not found (has the stage that writes it run?)", path=path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid JSON ({exc})", path=path) from None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def refuse_broken_link(path: Path, what: str) -> None:
    """A path that is a symbolic link resolving to nothing (a loop, a deleted target) looks like
    no file at all, and a name that is no local file is then taken for a hub id: say what it
    is instead."""
    path = Path(path).expanduser()
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{what} is a symbolic link loop (a link that points back to "
                            "itself); point it at a real file or directory", path=path) from None
        if path.is_symlink():
            raise UserError(f"{what} is a symbolic link to {os.readlink(path)!r}, which does "
                            "not exist", path=path) from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

#: What identifies a saved model: weights, tokenizer (SentencePiece `.model`, BPE `vocab.json`
#: and `merges.txt`), template, the EOS ids of `generation_config.json` and remote code (`.py`).
#: Not `training_summary.json` or other notes, so re-saving identical weights keeps the
#: reference log-probs valid.
_IDENTITY_SUFFIXES = {".safetensors", ".model", ".txt", ".py"}
_IDENTITY_FILES = {"config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", TEMPLATE_FILE}


def weights_hash(model_dir: Path) -> str:
    """A hash of the saved weights, tokenizer and template files of a model directory.

    Several stages fingerprint the same directory (source on every `dvc repro`, ref_logps,
    train, evaluate), and the weights of a 7B model are ~15 GB to read: each file's hash is
    cached on its path, size and modification time, within a process and, inside a DVC project,
    across processes (`paths.HASH_CACHE`), as DVC caches its own."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir()
                   if p.suffix in _IDENTITY_SUFFIXES or p.name in _IDENTITY_FILES)
    if not any(p.suffix == ".safetensors" for p in files):
        if any(model_dir.glob("*.bin")):
            raise UserError("holds only pickled .bin weights, which are refused (loading them "
                            "can run code); convert them to safetensors with "
                            "`save_pretrained(dir)` where you trust the file", path=model_dir)
        raise UserError("no .safetensors weights found", path=model_dir)
    stats = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(stats)


@functools.lru_cache(maxsize=16)
def _hash_files(stats: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for (path, _, _), digest in zip(stats, _file_hashes(stats), strict=True):
        h.update(Path(path).name.encode())
        h.update(digest.encode())
    return h.hexdigest()[:16]


def cached_sha256(path: Path) -> str:
    """The sha256 of one file, cached on its path, size and modification time as
    `weights_hash` caches a model's files (a 250 MB GGUF is read once, not by every stage)."""
    st = Path(path).stat()
    return _file_hashes(((str(Path(path).resolve()), st.st_size, st.st_mtime_ns),))[0]


def _file_hashes(stats: tuple[tuple[str, int, int], ...]) -> list[str]:
    """sha256 of each (path, size, mtime), from `paths.HASH_CACHE` where known."""
    cache = HASH_CACHE if HASH_CACHE.parent.parent.is_dir() else None  # in a DVC project
    try:
        known = json.loads(cache.read_text()) if cache is not None else {}
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    seen = {}
    for path, size, mtime in stats:
        key = f"{path}|{size}|{mtime}"
        stored = known.get(key)
        seen[key] = stored if isinstance(stored, str) else file_sha256(Path(path))
    if cache is not None and not seen.keys() <= known.keys():
        # Older entries of these paths and entries of files gone are stale; concurrent writers
        # may drop each other's entries (atomic replace), which costs a re-hash, never a wrong
        # one.
        paths = {k.rsplit("|", 2)[0] for k in seen}
        kept = {k: v for k, v in known.items()
                if k.rsplit("|", 2)[0] not in paths and Path(k.rsplit("|", 2)[0]).exists()}
        cache.parent.mkdir(exist_ok=True)
        write_json({**kept, **seen}, cache)
    return list(seen.values())


def frame_hash(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A content hash of a table that ignores its row order and index."""
    cols = columns or sorted(df.columns)
    hashed = pd.util.hash_pandas_object(df[cols].astype(str), index=False).sort_values()
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()[:16]


def text_hash(*parts: str) -> str:
    """A stable 16-hex-digit id for a tuple of strings (pair ids, prompt ids)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]
