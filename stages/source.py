"""DVC stage `source` (always runs): the key of `dataset.name`'s content -> data/source_key.json.

`download` depends on this file, so an edited local data file reruns it; an unchanged source
rewrites the same bytes and leaves everything cached (see `pipeline.sources.source_key`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.artifacts import write_json
from pipeline.config import load_params
from pipeline.sources import source_key


def run(params_file: Path = paths.PARAMS) -> None:
    key = source_key(load_params(params_file).dataset)
    write_json(key, paths.SOURCE_KEY)
    print(f"source: {key['kind']} {key['name']} -> {paths.SOURCE_KEY}")
