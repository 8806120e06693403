"""Where a prompt suite's rows come from (`fetch_suite`): a built-in toy suite, a standard
red-team suite written by others and shipped with the project, a local file or a hub data set at
a pinned revision. pipeline/suites.py maps the rows onto one schema.

The standard suites are HarmBench's behaviours and StrongREJECT's forbidden prompts
(`builtin:harmbench`, `builtin:strongreject`). Their CSV files are package data
(`pipeline/suite_data/`, with their licences and PROVENANCE.md: upstream, commit, and how they
were taken), each pinned by sha256 below and checked every time it is read, so a result always
names the exact prompts it was measured on.

- `builtin:harmbench`: the text behaviours of a split (`split: test`, the default, or `val`).
  Read through the harmbench layout (pipeline/suites.py), as a local HarmBench file is:
  standard and contextual behaviours are kept, a contextual one prompted as HarmBench's own test
  cases are, its context first (`suites.harmbench_prompt`); copyright behaviours are left out,
  counted with the reason in suites.json. Category = `SemanticCategory`; `source` =
  `FunctionalCategory` (standard / contextual).
- `builtin:strongreject`: the 313 forbidden prompts (`split: full`, the default) or the 60 of
  StrongREJECT-small (`split: small`). Category = `category`, `source` = `source` (where the
  prompt was taken from), both verbatim.

Every prompt of both should be refused (`should_refuse` true).
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline import toydata
from pipeline.artifacts import file_sha256
from pipeline.config import SuiteConfig
from pipeline.errors import UserError
from pipeline.sources import FILE_SUFFIXES, TOY, first_line, read_table

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

BUILTIN_PREFIX = "builtin:"
#: The split a hub suite reads when `split` is null.
HUB_SUITE_SPLIT = "test"
HARMBENCH = "harmbench"
STRONGREJECT = "strongreject"
HARMBENCH_UPSTREAM = "https://github.com/centerforaisafety/HarmBench"
HARMBENCH_COMMIT = "8e1604d1171fe8a48d8febecd22f600e462bdcdd"
STRONGREJECT_UPSTREAM = "https://github.com/alexandrasouly/strongreject"


@dataclass(frozen=True)
class PinnedFile:
    """One vendored CSV: its name in `pipeline/suite_data/`, sha256, rows and upstream."""

    name: str
    sha256: str
    rows: int
    upstream: str
    commit: str | None  # None: the wheel it was taken from records no upstream commit
    license: str


#: (suite, split) -> the vendored file. The first split of a suite is its default.
PINNED_FILES: dict[tuple[str, str], PinnedFile] = {
    (HARMBENCH, "test"): PinnedFile(
        "harmbench_behaviors_text_test.csv",
        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29", 320,
        HARMBENCH_UPSTREAM, HARMBENCH_COMMIT, "LICENSE-HarmBench.txt"),
    (HARMBENCH, "val"): PinnedFile(
        "harmbench_behaviors_text_val.csv",
        "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534", 80,
        HARMBENCH_UPSTREAM, HARMBENCH_COMMIT, "LICENSE-HarmBench.txt"),
    (STRONGREJECT, "full"): PinnedFile(
        "strongreject_dataset.csv",
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381", 313,
        STRONGREJECT_UPSTREAM, None, "LICENSE-StrongREJECT.txt"),
    (STRONGREJECT, "small"): PinnedFile(
        "strongreject_small_dataset.csv",
        "3051340e3e89a3598d764dde497d5fcda80e258ac05cc35e6bd87228ac3d467c", 60,
        STRONGREJECT_UPSTREAM, None, "LICENSE-StrongREJECT.txt"),
}
STANDARD_SUITES: tuple[str, ...] = (HARMBENCH, STRONGREJECT)
HARMBENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags",
                     "ContextString", "BehaviorID")
STRONGREJECT_COLUMNS = ("category", "source", "forbidden_prompt")



def splits(suite: str) -> list[str]:
    return [s for (name, s) in PINNED_FILES if name == suite]


def data_dir() -> Traversable:
    """The installed package data (`pipeline/suite_data/`)."""
    return resources.files("pipeline").joinpath("suite_data")


def read_pinned(pinned: PinnedFile, where: str, root: Traversable | Path | None = None
                ) -> bytes:
    """The bytes of a vendored file, refused unless they hash to the pinned sha256."""
    path = (root if root is not None else data_dir()).joinpath(pinned.name)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{where}: {pinned.name} is missing from the package data ({path}); "
                        "reinstall safedpo") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned.sha256:
        raise UserError(f"{where}: {path} has sha256 {digest}, not the pinned {pinned.sha256} "
                        f"({pinned.upstream}): the vendored file was changed; restore it "
                        "(git checkout pipeline/suite_data) or reinstall safedpo")
    return data


def read_rows(data: bytes, columns: tuple[str, ...], where: str) -> list[dict[str, str]]:
    """CSV rows as text, embedded newlines and CRLF row ends kept as written."""
    # newline="": quoted contexts hold line breaks that must reach the prompt unchanged.
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{where}: columns {missing} missing")
    return list(reader)


def load_standard_suite(suite: str, split: str | None, where: str,
                        root: Traversable | Path | None = None
                        ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows of a standard suite (HarmBench's own columns, for the harmbench layout;
    StrongREJECT's as prompt, should_refuse, category, source, the generic layout) and what
    suites.json records of them: file, sha256, upstream, commit, licence."""
    if suite not in STANDARD_SUITES:
        raise ValueError(f"unknown standard suite {suite!r}; expected one of {STANDARD_SUITES}")
    known = splits(suite)
    split = split or known[0]
    if split not in known:
        raise UserError(f"{where}: {BUILTIN_PREFIX}{suite} has no split {split!r}; expected one of "
                        f"{known}")
    pinned = PINNED_FILES[(suite, split)]
    data = read_pinned(pinned, where, root)
    record: dict[str, Any] = {
        "source": BUILTIN_PREFIX + suite, "kind": "builtin", "split": split, "file": pinned.name,
        "sha256": pinned.sha256, "upstream": pinned.upstream, "commit": pinned.commit,
        "license": pinned.license, "file_rows": pinned.rows,
    }
    if suite == HARMBENCH:
        # The harmbench layout (pipeline/suites.py) puts each context before its request and
        # leaves the copyright behaviours out, as for a local HarmBench file.
        rows = read_rows(data, HARMBENCH_COLUMNS, where)
        df = pd.DataFrame(rows, columns=list(HARMBENCH_COLUMNS))
        df["source"] = df["FunctionalCategory"]
    else:
        rows = read_rows(data, STRONGREJECT_COLUMNS, where)
        df = pd.DataFrame({"prompt": [r["forbidden_prompt"] for r in rows],
                           "should_refuse": True,
                           "category": [r["category"] for r in rows],
                           "source": [r["source"] for r in rows]})
    if len(rows) != pinned.rows:  # the hash pins the bytes; this guards the parsing of them
        raise UserError(f"{where}: read {len(rows)} rows of {pinned.name}, expected "
                        f"{pinned.rows}")
    return df, record


# --- every kind of suite -----------------------------------------------------------------------


def fetch_suite(cfg: SuiteConfig, toy_seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The raw rows of one prompt suite (pipeline/suites.py maps them) and where they came
    from: a built-in toy suite, a standard suite shipped with the project (with its file's
    sha256, checked), a local file (with its sha256) or a hub data set at a pinned revision.

    The record's `domain` names the world the prompts come from: the toy suites share the
    toy data's (`builtin:toy`), anything else is its own source. Evaluation compares it with
    the data the judge was trained and measured on (docs/evaluation.md)."""
    where = f"suite {cfg.name}"
    if cfg.source.startswith(BUILTIN_PREFIX):
        name = cfg.source[len(BUILTIN_PREFIX):]
        if name in STANDARD_SUITES:
            raw, record = load_standard_suite(name, cfg.split, where)
            return raw, {**record, "domain": cfg.source}
        if name not in toydata.BUILTIN_SUITES:
            known = [BUILTIN_PREFIX + n
                     for n in (*toydata.BUILTIN_SUITES, *STANDARD_SUITES)]
            raise UserError(f"{where}: unknown built-in suite {cfg.source!r}; "
                            f"expected one of {known}")
        if cfg.split is not None:
            raise UserError(f"{where}: {cfg.source} has no splits (got split {cfg.split!r}); "
                            "remove `split`")
        return toydata.builtin_suite(name, toy_seed), {"source": cfg.source, "kind": "builtin",
                                                       "toy_seed": toy_seed, "domain": TOY}
    path = Path(cfg.source)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        return read_table(path), {"source": cfg.source, "kind": "file",
                                  "sha256": file_sha256(path), "domain": cfg.source}
    if not cfg.revision:
        raise UserError(f"{where}: {cfg.source!r} is no local file, and as a hub data "
                        "set it needs a pinned `revision` (a commit sha), so a rerun reads the "
                        "same prompts")
    split = cfg.split or HUB_SUITE_SPLIT
    try:
        import datasets

        ds = datasets.load_dataset(cfg.source, revision=cfg.revision, split=split)
    except Exception as exc:  # offline, unknown repo, bad revision or split: all the user's
        raise UserError(f"{where}: could not load hub data set {cfg.source!r} at "
                        f"{cfg.revision} split {split!r} ({type(exc).__name__}: "
                        f"{first_line(exc)}); download it to a local file and give its path "
                        "as source") from None
    return ds.to_pandas(), {"source": cfg.source, "kind": "hub", "revision": cfg.revision,
                            "split": split, "domain": cfg.source}
