"""DVC stage `source` (always runs): the content keys of `dataset.name` -> data/source_key.json
and of `model.name` -> data/model_key.json.

`download` depends on the first, `sft` on the second, so an edited local data file or model
directory reruns what reads it; an unchanged source rewrites the same bytes and leaves
everything cached (see `pipeline.sources.source_key` and `model_key`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.artifacts import write_json
from pipeline.config import load_params
from pipeline.sources import model_key, source_key


def run(params_file: Path = paths.PARAMS) -> None:
    params = load_params(params_file)
    data, model = source_key(params.dataset), model_key(params.model)
    write_json(data, paths.SOURCE_KEY)
    write_json(model, paths.MODEL_KEY)
    print(f"source: {data['kind']} {data['name']} -> {paths.SOURCE_KEY}; model {model['kind']} "
          f"{model['name']} -> {paths.MODEL_KEY}")
