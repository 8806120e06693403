"""GGUF models (`pipeline/gguf.py`) refused in one line: a missing extra, a `.gguf` path that is
a directory or missing, an assembled file whose sha256 is not the pinned one, an architecture
transformers cannot read. (The real conversion of Gemma 3 270M runs in tests/test_gemma.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import gguf
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.sources import model_key


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAFEDPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_gguf(path: Path, arch: str) -> Path:
    import gguf as gguf_pkg

    w = gguf_pkg.GGUFWriter(str(path), arch=arch)
    w.add_name("test")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_names_and_the_model_key_of_a_local_gguf(tmp_path: Path) -> None:
    assert gguf.is_gguf("builtin:gemma3-270m") and gguf.is_gguf("models/x.Q4_K_M.GGUF")
    assert not gguf.is_gguf("builtin:tiny") and not gguf.is_gguf("owner/name")
    path = _tiny_gguf(tmp_path / "m.gguf", "llama")
    key = model_key(ModelConfig(name=str(path)))
    import hashlib

    assert key == {"kind": "gguf", "name": str(path),
                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    builtin = model_key(ModelConfig(name=gguf.GEMMA_270M))
    assert builtin["sha256"] == \
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_bad_gguf_inputs_each_give_one_line(tmp_path: Path, cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(UserError, match="must be a file, not a directory"):
        gguf.converted(str(tmp_path / "dir.gguf"))
    with pytest.raises(UserError, match="GGUF file not found"):
        gguf.model_key(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="architecture foo is not supported"):
        gguf.converted(str(_tiny_gguf(tmp_path / "foo.gguf", "foo")))
    assert not (cache / "hf").exists() or not any((cache / "hf").glob("*/conversion.json"))
    # An assembled file that is not the pinned one (a truncated copy, a bad disk) is refused.
    target = cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF not the model")
    with pytest.raises(UserError, match="does not have the sha256"):
        gguf.locate(gguf.GEMMA_270M)
    # Without the extra: what to install.
    monkeypatch.setitem(sys.modules, gguf.GEMMA_PACKAGE, None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[gemma\]'"):
        gguf.model_key(gguf.GEMMA_270M)
