"""Models and tokenizers: `builtin:tiny`, a hub id or a local directory; one prompt template.

`builtin:tiny` trains a byte-level BPE tokenizer on the training texts and builds a small
Llama-style `transformers` model, so the whole pipeline runs offline. Everything is saved with
`save_pretrained` (safetensors), so any HF tool loads it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from pipeline.config import ModelConfig, TinyModelConfig
from pipeline.errors import UserError

BUILTIN_TINY = "builtin:tiny"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# Used when a tokenizer has no chat template (the tiny model, base models). The response is
# appended after "Assistant:" with a leading space, and EOS closes it.
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1_000_000,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM with the dimensions of `cfg`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    # Weight init draws from the global torch RNG; fork it so the seed stays local.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model


def _hub_error(name: str, exc: Exception) -> UserError:
    return UserError(
        f"could not load model {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        "Offline? Point model.name at a local HF directory, or use model.name: builtin:tiny."
    )


def load_pretrained(
    name: str | Path, *, revision: str | None = None, trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id."""
    # The per-tensor "Loading weights" bar is noise next to the stages' own progress bars.
    hf_logging.disable_progress_bar()
    name = str(name)
    local = Path(name)
    if local.exists() and not (local / "config.json").exists():
        raise UserError("not a Hugging Face model directory (no config.json)", path=local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None
    if tokenizer.pad_token_id is None:
        # Causal LMs often ship without a pad token; EOS is safe because labels mask padding.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def initial_model(
    cfg: ModelConfig, tokenizer_texts: Iterable[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model SFT starts from: a fresh `builtin:tiny`, or a pretrained hub/local model."""
    if cfg.name == BUILTIN_TINY:
        tokenizer = train_tiny_tokenizer(tokenizer_texts, cfg.tiny.vocab_size)
        return build_tiny_model(cfg.tiny, tokenizer), tokenizer
    if cfg.name.startswith("builtin:"):
        raise UserError(f"parameter model.name: unknown built-in model {cfg.name!r}; "
                        f"the built-in one is {BUILTIN_TINY!r}")
    return load_pretrained(cfg.name, revision=cfg.revision,
                           trust_remote_code=cfg.trust_remote_code)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`save_pretrained` into a temporary sibling folder, then swap it into place.

    `state_dict`, when given, is what gets written (a full state dict gathered from sharded
    training); otherwise the model's own."""
    out_dir = Path(out_dir)
    hf_logging.disable_progress_bar()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The one prompt template: the tokenizer's chat template where it has one, else plain."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(prompt=prompt)


def template_id(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identifies the template in fingerprints: a change of template invalidates log-probs."""
    source = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Encoded:
    """One tokenized (prompt, response): ids of both, and labels with the prompt masked."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != -100)


def encode_many(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str],
    max_length: int,
) -> list[Encoded]:
    """Tokenize each prompt + response + EOS; labels are -100 on the prompt.

    Over `max_length`, the prompt is cut from the left (keeping the template's end, which the
    response depends on) down to half the budget, then the response is cut from the right.
    """
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    if not prompts:
        return []
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    # Batched calls run in the Rust tokenizer; one call per text would dominate SFT set-up.
    p_all = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    r_all = tokenizer([" " + r.strip() for r in responses], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for p_ids, r_ids in zip(p_all, r_all, strict=True):
        if bos is not None and (not p_ids or p_ids[0] != bos):
            p_ids = [bos, *p_ids]
        r_ids = [*r_ids, eos]
        if len(p_ids) + len(r_ids) > max_length:
            keep_p = max(max_length // 2, max_length - len(r_ids))
            p_ids = p_ids[max(0, len(p_ids) - keep_p):]
            r_ids = r_ids[: max_length - len(p_ids)]
        out.append(Encoded(input_ids=p_ids + r_ids, labels=[-100] * len(p_ids) + r_ids))
    return out


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts, exactly as `encode_many` starts each sequence."""
    ids = tokenizer([render_prompt(tokenizer, p) for p in prompts],
                    add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [x if bos is None or (x and x[0] == bos) else [bos, *x] for x in ids]


def weights_hash(model_dir: Path) -> str:
    """A hash of the saved weights and tokenizer files of a model directory."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir()
                   if p.suffix in {".safetensors", ".json", ".model", ".txt"})
    if not any(p.suffix == ".safetensors" for p in files):
        raise UserError("no .safetensors weights found", path=model_dir)
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
