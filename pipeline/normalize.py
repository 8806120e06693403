"""The `normalize` stage's logic: raw rows of any supported layout -> the one pairs schema.

Layouts (`dataset.layout`; `auto` picks by columns, v1 before 30K since it is a superset):

- `pku30k`: PKU-SafeRLHF-30K, `prompt, response_0, response_1, is_response_0_safe,
  is_response_1_safe, better_response_id, safer_response_id` (also what `builtin:toy` writes).
- `pku_v1`: PKU-SafeRLHF (v1), the 30K columns plus `prompt_source`, `response_*_source`,
  `response_*_sha256`, `response_*_harm_category` ({category: bool}) and
  `response_*_severity_level` (0-3). Severity is kept, and the categories flagged true in the
  harm-category dicts become `categories_0/1` (lists; empty for other layouts).
- `chosen_rejected`: a generic layout. `prompt, chosen, rejected` (text; `chosen` is the
  helpfulness-preferred response) and the safety of each side, either `chosen_unsafe,
  rejected_unsafe` (true = unsafe) or `is_chosen_safe, is_rejected_safe` (true = safe).
  Optional: `safer` (`chosen`/`rejected`, or 0/1 with 0 = chosen), `chosen_severity`,
  `rejected_severity`. Mapped to response_0 = chosen, response_1 = rejected, better_id = 0.
  Without a `safer` column the safe side is safer; if both sides have the same flag, the chosen
  one is taken as safer (the layout carries no other information).

Label coercion: bools; numbers 0/1; strings true/false, t/f, yes/no, y/n, 1/0 (any case, outer
spaces ignored); for safety flags also safe/unsafe, read by the column's polarity. Ids accept
0/1, "0"/"1" and "response_0"/"response_1". Text is stripped of outer whitespace.

Every input row ends up either in the output or rejected with the first reason of `REASONS`
that applies (see `REASONS` for their meaning). Duplicates: a pair seen earlier in the same
split, in either response order, is rejected as `duplicate_pair` (the first is kept); a test pair
that is also a train pair is rejected as `duplicate_of_train`, so test metrics never score
training pairs, and a test pair whose prompt is also a train prompt as `prompt_in_train`, so
they never score a prompt seen in training (unless `dataset.allow_seen_test_prompts`).
`report()` counts everything and keeps a bounded sample of rejected rows with their source row
numbers.

All checks are vectorised; the only per-row Python is the sha256 of `pair_id` / `prompt_id`,
which must match `pipeline.artifacts.text_hash` so ids agree across stages.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.selection import contradictions, pair_type_counts

LAYOUTS = ("pku30k", "pku_v1", "chosen_rejected")
PKU_COLUMNS = ["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
               "better_response_id", "safer_response_id"]
V1_MARKERS = ["response_0_severity_level", "response_1_severity_level",
              "response_0_harm_category", "response_1_harm_category", "prompt_source"]
CR_TEXT = ["prompt", "chosen", "rejected"]
CR_FLAGS = {"unsafe": ("chosen_unsafe", "rejected_unsafe"),
            "safe": ("is_chosen_safe", "is_rejected_safe")}

PAIRS_COLUMNS = ["pair_id", "prompt_id", "prompt", "response_0", "response_1", "unsafe_0",
                 "unsafe_1", "better_id", "safer_id", "severity_0", "severity_1",
                 "contradiction", "categories_0", "categories_1"]
PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("response_0", pa.string()), ("response_1", pa.string()),
    ("unsafe_0", pa.bool_()), ("unsafe_1", pa.bool_()),
    ("better_id", pa.int8()), ("safer_id", pa.int8()),
    ("severity_0", pa.int8()), ("severity_1", pa.int8()), ("contradiction", pa.bool_()),
    ("categories_0", pa.list_(pa.string())), ("categories_1", pa.list_(pa.string())),
])

#: Rejection reasons, in the order they are tested; a row gets the first that applies.
REASONS = {
    "null_text": "prompt or a response is null",
    "bad_text": "prompt or a response is not text",
    "empty_text": "prompt or a response is empty or whitespace",
    "null_label": "a safety flag or preference id is null",
    "bad_label": "a safety flag or preference id cannot be read as a label",
    "out_of_range_id": "a preference id is a number other than 0 or 1",
    "bad_severity": "a severity is not an integer from 0 to 3",
    "too_long": "prompt or a response is longer than dataset.max_text_chars",
    "identical_responses": "the two responses are the same text (ignoring case and spacing)",
    "duplicate_pair": "the same pair (either order) appeared earlier in this split",
    "duplicate_of_train": "this test pair is also a train pair",
    "prompt_in_train": "this test pair's prompt is also a train prompt (compared as the text "
                       "reads: NFKC, invisible characters, case and spacing aside); kept with "
                       "dataset.allow_seen_test_prompts: true",
}
SAMPLE_LIMIT = 50
#: Columns any layout reads as text. Where a raw file mixes non-text values into one of them
#: (numbers, lists, dicts), download stores them as text, which Arrow needs, and marks the rows
#: in a companion column, so normalize rejects them as `bad_text` instead of reading "5".
TEXT_COLUMNS = ("prompt", "response_0", "response_1", "chosen", "rejected")
NONTEXT_PREFIX = "_nontext_"


def is_text_or_null(value: object) -> bool:
    """A value a text column may hold: a string, or null (None or a float NaN)."""
    return isinstance(value, str) or value is None or (isinstance(value, float) and value != value)

_TRUE = ["true", "t", "yes", "y", "1", "1.0"]
_FALSE = ["false", "f", "no", "n", "0", "0.0"]
_ID_WORDS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "response_0": 0, "response_1": 1}


@dataclass
class Normalized:
    pairs: pd.DataFrame  # PAIRS_COLUMNS
    rejected: pd.DataFrame  # columns: row, reason, column, value
    layout: str
    rows_in: int
    keys: pd.DataFrame  # per kept pair: hashes of (prompt, {response_0, response_1})
    rows: np.ndarray  # per kept pair: its source row


def detect_layout(columns: list[str], layout: str = "auto", where: object = None) -> str:
    """The layout to use for a table with `columns`; a missing column is a `UserError`."""
    cols = set(columns)
    if layout not in ("auto", *LAYOUTS):
        raise UserError(f"unknown layout {layout!r}; expected auto or one of {list(LAYOUTS)}",
                        path=where)
    if layout == "auto":
        if set(PKU_COLUMNS) <= cols:
            return "pku_v1" if cols & set(V1_MARKERS) else "pku30k"
        if set(CR_TEXT) <= cols and any(set(f) <= cols for f in CR_FLAGS.values()):
            return "chosen_rejected"
        raise UserError(
            f"cannot tell the layout from columns {sorted(cols)[:12]}; expected the "
            f"PKU-SafeRLHF columns {PKU_COLUMNS} or the chosen/rejected columns {CR_TEXT} plus "
            f"{list(CR_FLAGS['unsafe'])} or {list(CR_FLAGS['safe'])}", path=where)
    need = PKU_COLUMNS if layout in ("pku30k", "pku_v1") else CR_TEXT
    missing = [c for c in need if c not in cols]
    if layout == "chosen_rejected" and not any(set(f) <= cols for f in CR_FLAGS.values()):
        missing += [f"{CR_FLAGS['unsafe']} or {CR_FLAGS['safe']}"]
    if missing:
        raise UserError(f"missing column(s) {missing} for layout {layout}", path=where)
    return layout


# --- coercion (vectorised) ----------------------------------------------------------------------

def _lower(s: pd.Series) -> pd.Series:
    return s.astype("string").str.strip().str.lower()


def coerce_flag(s: pd.Series, safe_means_true: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, valid, null) for a boolean label column; `safe_means_true` gives the polarity of
    the words "safe"/"unsafe" (true for `is_*_safe`, false for `*_unsafe`)."""
    null = s.isna().to_numpy()
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.fillna(False).to_numpy(dtype=bool), ~null, null
    if pd.api.types.is_numeric_dtype(s.dtype):
        f = s.to_numpy(dtype=float, na_value=np.nan)
        valid = (f == 0) | (f == 1)
        return f == 1, valid, null
    words = dict.fromkeys(_TRUE, True) | dict.fromkeys(_FALSE, False)
    words |= {"safe": safe_means_true, "unsafe": not safe_means_true}
    mapped = _lower(s).map(words)
    valid = mapped.notna().to_numpy()
    return mapped.fillna(False).to_numpy(dtype=bool), valid, null


def coerce_id(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(value, valid, null, out_of_range) for a 0/1 response-id column."""
    null = s.isna().to_numpy()
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.fillna(False).to_numpy(dtype=np.int8), ~null, null, np.zeros(len(s), bool)
    if pd.api.types.is_numeric_dtype(s.dtype):
        f = s.to_numpy(dtype=float, na_value=np.nan)
    else:
        low = _lower(s)
        mapped = low.map(_ID_WORDS).to_numpy(dtype=float, na_value=np.nan)
        numeric = pd.to_numeric(low, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        f = np.where(np.isnan(mapped), numeric, mapped)
    valid = (f == 0) | (f == 1)
    integral = np.isfinite(f) & (np.floor(f) == f)
    out_of_range = integral & ~valid
    return np.where(valid, f, 0).astype(np.int8), valid, null, out_of_range


def coerce_severity(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(value as float with nan for null, valid) for a 0-3 severity column (null is valid)."""
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        f = s.to_numpy(dtype=float, na_value=np.nan)
    else:
        f = pd.to_numeric(_lower(s), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        f = np.where(s.isna().to_numpy(), np.nan, f)
        unreadable = ~s.isna().to_numpy() & np.isnan(f)
        f = np.where(unreadable, -1.0, f)
    null = np.isnan(f)
    valid = null | (np.isin(f, [0, 1, 2, 3]))
    return f, valid


# --- mapping -------------------------------------------------------------------------------------

class _Rejections:
    """First-reason-wins bookkeeping over all rows, without a per-row loop."""

    def __init__(self, n: int) -> None:
        self.reason = np.full(n, None, dtype=object)
        self.column = np.full(n, None, dtype=object)

    def add(self, mask: np.ndarray, reason: str, column: str | None = None) -> None:
        new = mask & (self.reason == None)  # noqa: E711 (elementwise on an object array)
        self.reason[new] = reason
        self.column[new] = column

    @property
    def ok(self) -> np.ndarray:
        return self.reason == None  # noqa: E711


def _check_text(df: pd.DataFrame, col: str, rej: _Rejections, where: object) -> pd.Series:
    s = df[col]
    if not (pd.api.types.is_string_dtype(s.dtype) or s.dtype == object):
        raise UserError(f"expected text, got {s.dtype} (wrong layout or column?)",
                        path=where, column=col)
    null = s.isna().to_numpy()
    rej.add(null, "null_text", col)
    if NONTEXT_PREFIX + col in df.columns:
        rej.add(df[NONTEXT_PREFIX + col].fillna(False).to_numpy(bool), "bad_text", col)
    kind = pd.api.types.infer_dtype(s, skipna=True)
    if kind not in ("string", "empty"):
        # Python objects that are not text: lists and structs from Parquet, mixed frames.
        not_str = ~s.map(is_text_or_null).to_numpy(bool)
        rej.add(not_str, "bad_text", col)
        s = s.where(~pd.Series(not_str, index=s.index), None)
    text = s.astype("string").str.strip()
    rej.add((text.fillna("") == "").to_numpy(), "empty_text", col)
    return text


def _map_columns(df: pd.DataFrame, layout: str) -> dict[str, Any]:
    """Source columns -> (text columns, flag columns with polarity, ids, severities)."""
    if layout in ("pku30k", "pku_v1"):
        sev = (("response_0_severity_level", "response_1_severity_level")
               if layout == "pku_v1" else (None, None))
        return {"text": ("prompt", "response_0", "response_1"),
                "flags": (("is_response_0_safe", True), ("is_response_1_safe", True)),
                "better": "better_response_id", "safer": "safer_response_id",
                "severity": tuple(c if c in df.columns else None for c in sev),
                "categories": tuple(c if layout == "pku_v1" and c in df.columns else None
                                    for c in ("response_0_harm_category",
                                              "response_1_harm_category"))}
    polarity = "unsafe" if set(CR_FLAGS["unsafe"]) <= set(df.columns) else "safe"
    flags = tuple((c, polarity == "safe") for c in CR_FLAGS[polarity])
    return {"text": ("prompt", "chosen", "rejected"), "flags": flags, "better": None,
            "safer": "safer" if "safer" in df.columns else None,
            "severity": tuple(c if c in df.columns else None
                              for c in ("chosen_severity", "rejected_severity")),
            "categories": (None, None)}


def harm_categories(value: object) -> list[str]:
    """The harm categories flagged true in a PKU-SafeRLHF v1 `{category: bool}` value (sorted);
    none for anything else: categories describe, they never decide whether a row is kept."""
    if isinstance(value, dict):
        return sorted(str(k) for k, v in value.items() if v is True or v == 1)
    return []


def _safer_from_cr(s: pd.Series) -> pd.Series:
    """`safer` of the chosen/rejected layout: chosen/rejected words or 0/1 (0 = chosen)."""
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s
    return _lower(s).replace({"chosen": "0", "rejected": "1"})


def normalize_frame(df: pd.DataFrame, layout: str = "auto", where: object = None,
                    max_text_chars: int | None = None) -> Normalized:
    """Map one raw split to the pairs schema; rejected rows come back with their reason."""
    layout = detect_layout(list(df.columns), layout, where)
    df = df.reset_index(drop=True)
    n = len(df)
    m = _map_columns(df, layout)
    rej = _Rejections(n)
    prompt, r0, r1 = (_check_text(df, c, rej, where) for c in m["text"])
    if max_text_chars is not None:
        for col, text in zip(m["text"], (prompt, r0, r1), strict=True):
            rej.add((text.str.len().fillna(0) > max_text_chars).to_numpy(bool), "too_long", col)

    flags = []
    for col, safe_true in m["flags"]:
        value, valid, null = coerce_flag(df[col], safe_means_true=safe_true)
        rej.add(null, "null_label", col)
        rej.add(~valid & ~null, "bad_label", col)
        flags.append(value if not safe_true else ~value)  # stored as h = 1 unsafe
    u0, u1 = flags

    if m["better"] is None:
        better = np.zeros(n, dtype=np.int8)
    else:
        better = _id_column(df[m["better"]], m["better"], rej)
    if m["safer"] is None:
        # chosen/rejected without a safer column: the safe side, else the chosen one.
        safer = np.where(u0 & ~u1, 1, 0).astype(np.int8)
    elif layout == "chosen_rejected":
        safer = _id_column(_safer_from_cr(df[m["safer"]]), m["safer"], rej)
    else:
        safer = _id_column(df[m["safer"]], m["safer"], rej)

    severities = []
    for col in m["severity"]:
        if col is None:
            severities.append(np.full(n, np.nan))
            continue
        value, valid = coerce_severity(df[col])
        rej.add(~valid, "bad_severity", col)
        severities.append(np.where(valid, value, np.nan))

    rej.add((_canonical(r0) == _canonical(r1)).fillna(False).to_numpy(dtype=bool),
            "identical_responses")

    # Duplicates in either order: key on 64-bit hashes of (prompt, {r0, r1}); comparing three
    # integer columns is an order of magnitude faster than comparing the texts.
    hp, h0, h1 = (_hash_text(t) for t in (prompt, r0, r1))
    keys = pd.DataFrame({"p": hp, "lo": np.minimum(h0, h1), "hi": np.maximum(h0, h1)})
    # A row only counts as a duplicate of a row that is itself kept.
    dup = keys[rej.ok].duplicated(keep="first").reindex(keys.index, fill_value=False).to_numpy()
    rej.add(dup, "duplicate_pair")

    ok = rej.ok
    p_ok = prompt[ok].to_numpy(dtype=object)
    r0_ok, r1_ok = r0[ok].to_numpy(dtype=object), r1[ok].to_numpy(dtype=object)
    pairs = pd.DataFrame({
        "pair_id": _pair_ids(p_ok, r0_ok, r1_ok),
        "prompt_id": _prompt_ids(p_ok),
        "prompt": p_ok, "response_0": r0_ok, "response_1": r1_ok,
        "unsafe_0": u0[ok], "unsafe_1": u1[ok],
        "better_id": better[ok].astype(np.int8), "safer_id": safer[ok].astype(np.int8),
        "severity_0": pd.array(severities[0][ok], dtype="Int8"),
        "severity_1": pd.array(severities[1][ok], dtype="Int8"),
    })
    # Kept and flagged: only objectives that read `safer_id` leave them out (objectives.py).
    pairs["contradiction"] = contradictions(pairs)
    for i, col in enumerate(m["categories"]):
        values = df[col].to_numpy(dtype=object)[ok] if col else np.full(ok.sum(), None)
        pairs[f"categories_{i}"] = [harm_categories(v) for v in values]
    rows = (df["source_row"].to_numpy() if "source_row" in df.columns else np.arange(n))
    rejected = _rejected_table(df, rej, rows)
    return Normalized(pairs, rejected, layout, n, keys[ok].reset_index(drop=True), rows[ok])


@functools.cache
def _format_chars() -> str:
    """A regex class of Unicode's format characters (category Cf: zero-width space and
    joiners, BOM, soft hyphen, direction marks), computed once, when first needed."""
    cf = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"]
    return "[" + "".join(re.escape(c) for c in cf) + "]"


def _visible(s: pd.Series) -> pd.Series:
    """Text as it shows: NFKC-normalized (full-width, ligature and composed forms as their
    plain equivalents), invisible format characters removed. Two texts that differ only by a
    zero-width space are the same text to a reader, and to the duplicate checks."""
    return s.str.normalize("NFKC").str.replace(_format_chars(), "", regex=True)


def _canonical(s: pd.Series) -> pd.Series:
    """Text as a reader compares it: visible characters; case and runs of whitespace do not
    count."""
    return _visible(s).str.casefold().str.replace(r"\s+", " ", regex=True)


def _hash_text(s: pd.Series) -> np.ndarray:
    """Duplicate keys: hashes of the visible text."""
    return pd.util.hash_array(_visible(s).fillna("").to_numpy(dtype=object), categorize=False)


def _id_column(s: pd.Series, col: str, rej: _Rejections) -> np.ndarray:
    value, valid, null, out_of_range = coerce_id(s)
    rej.add(null, "null_label", col)
    rej.add(out_of_range, "out_of_range_id", col)
    rej.add(~valid & ~null, "bad_label", col)
    return value


def _pair_ids(p: np.ndarray, r0: np.ndarray, r1: np.ndarray) -> list[str]:
    # Same bytes as text_hash(p, r0, r1): each part then the 0x1f separator.
    sha = hashlib.sha256
    return [sha(f"{x}\x1f{y}\x1f{z}\x1f".encode()).hexdigest()[:16]
            for x, y, z in zip(p, r0, r1, strict=True)]


def _prompt_ids(p: np.ndarray) -> np.ndarray:
    codes, uniques = pd.factorize(p)
    sha = hashlib.sha256
    ids = np.array([sha(f"{u}\x1f".encode()).hexdigest()[:16] for u in uniques], dtype=object)
    return ids[codes] if len(codes) else np.array([], dtype=object)


def _rejected_table(df: pd.DataFrame, rej: _Rejections, rows: np.ndarray) -> pd.DataFrame:
    bad = ~rej.ok
    idx = np.flatnonzero(bad)
    reasons, cols = rej.reason[bad], rej.column[bad]
    values: list[str | None] = [None] * len(idx)
    # Only rows that can appear in the report's sample (the first SAMPLE_LIMIT of each reason)
    # get their offending value looked up, so this stays cheap however many rows are bad.
    in_sample = pd.Series(reasons).groupby(reasons).cumcount().to_numpy() < SAMPLE_LIMIT
    for k in np.flatnonzero(in_sample):
        col = cols[k]
        if col is not None and col in df.columns:
            values[k] = _short(df[col].iat[idx[k]])
    # object columns: a missing column or value must stay None (JSON null), never NaN.
    return pd.DataFrame({"row": rows[bad].astype(np.int64),
                         "reason": pd.Series(reasons, dtype=object),
                         "column": pd.Series(cols, dtype=object),
                         "value": pd.Series(values, dtype=object)})


def _short(v: object, limit: int = 60) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return None
    text = repr(v.item() if isinstance(v, np.generic) else v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject(res: Normalized, hit: np.ndarray, reason: str) -> Normalized:
    """`res` with the pairs where `hit` moved to its rejected rows, as `reason` (the value
    shown is the pair id)."""
    k = int(hit.sum())
    if k == 0:
        return res
    moved = pd.DataFrame({"row": res.rows[hit].astype(np.int64),
                          "reason": pd.Series([reason] * k, dtype=object),
                          "column": pd.Series([None] * k, dtype=object),
                          "value": pd.Series(res.pairs.loc[hit, "pair_id"].tolist(),
                                             dtype=object)})
    rejected = pd.concat([res.rejected, moved], ignore_index=True)
    return Normalized(res.pairs.loc[~hit].reset_index(drop=True), rejected, res.layout,
                      res.rows_in, res.keys.loc[~hit].reset_index(drop=True), res.rows[~hit])


def drop_train_duplicates(test: Normalized, train: Normalized) -> Normalized:
    """Move test pairs that are also train pairs (either order) to the rejected rows."""
    if len(test.keys) == 0 or len(train.keys) == 0:
        return test
    hit = pd.MultiIndex.from_frame(test.keys).isin(pd.MultiIndex.from_frame(train.keys))
    return _reject(test, np.asarray(hit, dtype=bool), "duplicate_of_train")


def prompts_in_train(test: pd.DataFrame, train: pd.DataFrame) -> np.ndarray:
    """Which test pairs have a prompt that is also a train prompt, compared as a reader compares
    text (`_canonical`): a prompt repeated with other case, spacing or a zero-width space is
    the same prompt, though its `prompt_id` differs."""
    seen = set(_canonical(train["prompt"].astype(str)))
    return _canonical(test["prompt"].astype(str)).isin(seen).to_numpy(dtype=bool)


def split_report(res: Normalized) -> dict[str, Any]:
    counts = res.rejected["reason"].value_counts()
    sample = []
    for reason in REASONS:
        part = res.rejected[res.rejected["reason"] == reason].head(SAMPLE_LIMIT)
        sample += part.to_dict("records")
    out = {
        "layout": res.layout,
        "rows_in": res.rows_in,
        "rows_out": len(res.pairs),
        "rows_rejected": len(res.rejected),
        "rejected_by_reason": {r: int(counts.get(r, 0)) for r in REASONS},
        "rejected_sample": sample,
        "pair_types": pair_type_counts(res.pairs),
        "unsafe_responses": int(res.pairs["unsafe_0"].sum() + res.pairs["unsafe_1"].sum()),
        # The safer response is labelled unsafe and the other safe. Kept; excluded only by the
        # objectives (and SFT choices) that read `safer_id`.
        "contradictions_flagged": int(res.pairs["contradiction"].sum()),
        "distinct_prompts": int(res.pairs["prompt_id"].nunique()),
    }
    if out["rows_in"] != out["rows_out"] + out["rows_rejected"]:
        raise RuntimeError(f"normalize lost rows: {out['rows_in']} in, {out['rows_out']} out, "
                           f"{out['rows_rejected']} rejected")
    return out


def normalize_splits(train_raw: pd.DataFrame, test_raw: pd.DataFrame, layout: str = "auto",
                     where: dict[str, object] | None = None,
                     allow_seen_test_prompts: bool = False, max_text_chars: int | None = None,
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Normalize both splits; returns (train pairs, test pairs, report).

    Fails early, with one line, where later stages would fail or mislead: a split that ends up
    empty, or a test split every prompt of which is also a train prompt (a held-out evaluation
    in name only) unless `allow_seen_test_prompts`. Test pairs whose prompt also occurs in
    train are left out (`prompt_in_train`), unless `allow_seen_test_prompts`; the report counts
    them either way."""
    where = where or {}
    train = normalize_frame(train_raw, layout, where.get("train"), max_text_chars)
    test = normalize_frame(test_raw, layout, where.get("test"), max_text_chars)
    test = drop_train_duplicates(test, train)
    for split, res in (("train", train), ("test", test)):
        if len(res.pairs) == 0:
            reasons = res.rejected["reason"].value_counts().to_dict()
            hint = ("; is the test split the train split?"
                    if set(reasons) == {"duplicate_of_train"} else "")
            raise UserError(f"no {split} pairs are left after normalization ({res.rows_in} rows "
                            f"in, rejected: {reasons or 'none'}){hint}", path=where.get(split))
    seen = prompts_in_train(test.pairs, train.pairs)
    if seen.all() and not allow_seen_test_prompts:
        raise UserError(f"every one of the {len(seen)} test pairs has a prompt that is also in "
                        "train, so the test split measures nothing held out; use another split, "
                        "or set dataset.allow_seen_test_prompts: true", path=where.get("test"))
    # Counted before they leave: evaluate reports them (`test_prompts_in_train_*`).
    overlap = {"pairs_with_prompt_in_train": int(seen.sum()),
               "prompts_in_train": int(test.pairs.loc[seen, "prompt_id"].nunique()),
               "prompts_in_train_left_out": not allow_seen_test_prompts}
    if not allow_seen_test_prompts:
        test = _reject(test, seen, "prompt_in_train")
    report = {"train": split_report(train), "test": split_report(test) | overlap}
    return _finish(train.pairs), _finish(test.pairs), report


def _finish(pairs: pd.DataFrame) -> pd.DataFrame:
    return pairs[PAIRS_COLUMNS].reset_index(drop=True)
