"""Parameters: the repository's params.yaml loads, and each bad value is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from data_cli import REPO, assert_one_line_error, run_cli

from pipeline.config import DatasetConfig, Params, ToyConfig, load_params
from pipeline.errors import UserError


def test_repository_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.dataset.name == "builtin:toy"
    assert params.dataset.layout == "auto"
    assert isinstance(params.dataset.toy, ToyConfig)


def test_params_yaml_is_the_one_source_of_defaults() -> None:
    """Every key of params.yaml equals the dataclass default, so code and file cannot drift."""
    assert load_params(REPO / "params.yaml") == Params()


def test_dataset_defaults_are_valid() -> None:
    cfg = DatasetConfig()
    assert cfg.toy.n_train > 0 and 0 < cfg.test_fraction < 1


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"n_train": 0}, "dataset.toy.n_train"),
    ({"n_test": -1}, "dataset.toy.n_test"),
    ({"label_noise": 0.7}, "dataset.toy.label_noise"),
    ({"harmful_share": 0.9, "sensitive_share": 0.2}, "dataset.toy.sensitive_share"),
])
def test_toy_config_validation(kwargs: dict, key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ToyConfig(**kwargs)


def _params_with(tmp_path: Path, text: str | None = None, **dataset: object) -> Path:
    path = tmp_path / "params.yaml"
    if text is None:
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        for key, value in dataset.items():
            section = data["dataset"]
            *parents, leaf = key.split("__")
            for p in parents:
                section = section[p]
            section[leaf] = value
        text = yaml.safe_dump(data)
    path.write_text(text)
    return path


BAD_PARAMS = {
    "bad_yaml": ({"text": "dataset: [unclosed\n"}, ["params.yaml", "invalid YAML"]),
    "not_a_mapping": ({"text": "- just\n- a list\n"}, ["expected a mapping at the top level"]),
    "unknown_key": ({"nmae": "x"}, ["unknown parameter(s) ['nmae'] in dataset"]),
    "negative_size": ({"toy__n_train": -5}, ["dataset.toy.n_train", "must be > 0"]),
    "wrong_type": ({"toy__n_test": "ten"}, ["dataset.toy.n_test", "expected an integer"]),
    "unknown_layout": ({"layout": "hh_rlhf"}, ["dataset.layout", "'hh_rlhf' is not one of"]),
    "bad_fraction": ({"test_fraction": 1.5}, ["dataset.test_fraction", "(0, 1)"]),
    "zero_max_rows": ({"max_rows": 0}, ["dataset.max_rows", "must be > 0"]),
    "empty_name": ({"name": "  "}, ["dataset.name", "must not be empty"]),
    "noise_too_high": ({"toy__label_noise": 0.9}, ["dataset.toy.label_noise"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
@pytest.mark.parametrize("stage", ["download", "normalize"])
def test_cli_bad_params(case: str, stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    spec, fragments = BAD_PARAMS[case]
    path = _params_with(tmp_path, **spec)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, stage, "-p", str(path))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "data").exists()  # nothing written before the parameters are valid


def test_cli_missing_params_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "download", "-p", "nope.yaml")
    assert_one_line_error(code, err, "nope.yaml", "parameter file not found")


def test_fp16_is_refused_with_what_to_use() -> None:
    from pipeline.config import TrainConfig

    with pytest.raises(UserError, match=r"train\.mixed_precision.*fp16 is not supported.*bf16"):
        TrainConfig(mixed_precision="fp16")


def test_lora_dropout_contradicting_disable_dropout_is_refused() -> None:
    """peft adds its adapters' dropout after `disable_dropout` ran: dropout > 0 would switch
    dropout back on in a policy meant to be scored like its eval-mode reference."""
    from pipeline.config import LoraConfig, TrainConfig

    with pytest.raises(UserError, match=r"train\.lora\.dropout.*disable_dropout"):
        TrainConfig(lora=LoraConfig(enabled=True, dropout=0.1))
    TrainConfig(lora=LoraConfig(enabled=True, dropout=0.1), disable_dropout=False)
    TrainConfig(lora=LoraConfig(enabled=True, dropout=0.0))
    TrainConfig(lora=LoraConfig(enabled=False, dropout=0.1))
