"""Models and tokenizers: `builtin:tiny`, a hub id or a local directory; loading and saving.

`builtin:tiny` trains a byte-level BPE tokenizer on the training texts and builds a small
Llama-style `transformers` model, so the whole pipeline runs offline. Everything is saved with
`save_pretrained` (safetensors), so any HF tool loads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from pipeline.artifacts import atomic_dir
from pipeline.config import ModelConfig, TinyModelConfig
from pipeline.encoding import Template
from pipeline.errors import UserError

BUILTIN_TINY = "builtin:tiny"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    # It puts BOS in front of every text, as Llama's does (the encoder follows the tokenizer).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
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
    dtype: torch.dtype | str = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    `dtype` is explicit because transformers 5 reads `dtype=None` as "auto": a checkpoint saved
    in bf16 would load as bf16 parameters, and AdamW steps at lr 1e-6 on bf16 weights mostly
    round away. Training always loads fp32 (master weights; bf16 comes from autocast); "auto"
    keeps the checkpoint's dtype (a pass-through copy)."""
    # The per-tensor "Loading weights" bar is noise next to the stages' own progress bars.
    hf_logging.disable_progress_bar()
    name = str(name)
    local = Path(name)
    if local.exists() and not (local / "config.json").exists():
        raise UserError("not a Hugging Face model directory (no config.json)", path=local)
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError("model directory not found (a hub id is owner/name)", path=local)
    if not local.exists() and revision is None:
        # A hub branch moves: the same params must give the same model next month.
        raise UserError(f"model {name!r} is not a local directory; as a hub id it needs "
                        "model.revision set to a commit sha")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code)
        # Safetensors only: a pickled `pytorch_model.bin` can run code when loaded.
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
            use_safetensors=True)
    except SafetensorError as exc:
        raise UserError(f"unreadable weights ({str(exc).splitlines()[0][:200]}); rerun the stage "
                        "that wrote them", path=name) from None
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None
    if tokenizer.pad_token_id is None:
        # Causal LMs often ship without a pad token; EOS is safe because labels mask padding.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def stored_dtype(name: str | Path, *, revision: str | None = None,
                 trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, from its config (read after the model
    itself loaded, so from the local directory or the hub cache): float32 where it names none
    (`builtin:tiny`, older configs)."""
    if str(name) == BUILTIN_TINY:
        return torch.float32
    config = AutoConfig.from_pretrained(str(name), revision=revision,
                                        trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


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


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype`; tensors that share storage (tied embeddings) still share
    it afterwards, so `save_pretrained` writes them once."""
    done: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for key, t in state_dict.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[key] = t
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape))
        if ident not in done:
            done[ident] = t.detach().to(dtype)
        out[key] = done[ident]
    return out


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: Template,
               out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None,
               dtype: torch.dtype | None = None) -> None:
    """`save_pretrained` (+ the prompt template) into a temporary sibling folder, then swap it
    into place.

    `state_dict`, when given, is what gets written (a full state dict gathered from sharded
    training); otherwise the model's own. `dtype`, when given, is the dtype the floating
    weights are written in (and the config names); the model in memory is left as it is."""
    hf_logging.disable_progress_bar()
    cast = dtype is not None and any(t.is_floating_point() and t.dtype != dtype
                                     for t in (state_dict or model.state_dict()).values())
    if cast:
        state_dict = _cast(state_dict if state_dict is not None else model.state_dict(), dtype)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if cast:
            # save_pretrained names the dtype of the model's parameters, not of what it wrote.
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        template.save(tmp)


def check_finite_weights(model: PreTrainedModel, what: str) -> None:
    """Refuse to save non-finite weights (a learning rate far too high can leave them after a
    last step whose loss was still finite)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"{what} produced non-finite weights ({name}); lower the learning "
                            "rate")


def disable_dropout(model: PreTrainedModel) -> int:
    """Set every dropout probability to 0 (modules and attention-dropout config fields), as TRL
    does for DPO: the policy is then scored like its eval-mode reference. Returns how many
    dropout modules had p > 0."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            n += 1
        # Attention modules copy their dropout rate from the config at init (Llama, Mistral).
        for attr in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr) > 0:
                setattr(module, attr, 0.0)
                n += 1
    for cfg in {id(c): c for c in (model.config, getattr(model.config, "text_config", None))
                if c is not None}.values():
        for key in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop",
                    "resid_pdrop", "embd_pdrop", "hidden_dropout_prob",
                    "attention_probs_dropout_prob"):
            if isinstance(getattr(cfg, key, None), float) and getattr(cfg, key) > 0:
                setattr(cfg, key, 0.0)
                n += 1
    return n
