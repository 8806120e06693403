"""Models and tokenizers: `builtin:tiny`, `builtin:gemma3-270m` or a local `.gguf` file
(`pipeline.gguf`), a hub id or a local directory; loading and saving.

`builtin:tiny` trains a byte-level BPE tokenizer on the training texts and builds a small
Llama-style `transformers` model, so the whole pipeline runs offline. Everything is saved with
`save_pretrained` (safetensors), so any HF tool loads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from torch.distributed.tensor import DTensor
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

from pipeline.artifacts import atomic_dir, refuse_broken_link, weights_hash, write_json
from pipeline.config import ModelConfig, TinyModelConfig
from pipeline.encoding import Encoder, Template, load_template
from pipeline.errors import UserError
from pipeline.gguf import GEMMA_270M, converted, is_gguf
from pipeline.paths import SUMMARY_FILE

BUILTIN_TINY = "builtin:tiny"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
#: The key of `training_summary.json` that holds the hash of the files saved beside it.
WRITTEN_KEY = "weights_hash"

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
    dtype: torch.dtype | str = torch.float32, weights: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    `weights=False` builds the model from its config with parameters on the meta device (no
    memory; buffers such as rotary frequencies are computed): the ranks of a sharded run
    other than rank 0, which receive their shards from it (`sharding.load_sharded`).

    `dtype` is explicit because transformers 5 reads `dtype=None` as "auto": a checkpoint saved
    in bf16 would load as bf16 parameters, and AdamW steps at lr 1e-6 on bf16 weights mostly
    round away. Training always loads fp32 (master weights; bf16 comes from autocast); "auto"
    keeps the checkpoint's dtype (a pass-through copy)."""
    # The per-tensor "Loading weights" bar is noise next to the stages' own progress bars.
    hf_logging.disable_progress_bar()
    name = str(name)
    local = Path(name)
    refuse_broken_link(local, "the model directory")
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
        if weights:
            # Safetensors only: a pickled `pytorch_model.bin` can run code when loaded.
            model = AutoModelForCausalLM.from_pretrained(
                name, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                use_safetensors=True)
        else:
            config = AutoConfig.from_pretrained(name, revision=revision,
                                                trust_remote_code=trust_remote_code)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(
                    config, trust_remote_code=trust_remote_code, dtype=dtype)
            # accelerate's meta registration gives the tied head a parameter of its own.
            model.tie_weights()
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
    if is_gguf(str(name)):
        name = converted(str(name), log=False)  # dequantized into fp32
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
    if is_gguf(cfg.name):
        return load_pretrained(converted(cfg.name))
    if cfg.name.startswith("builtin:"):
        raise UserError(f"parameter model.name: unknown built-in model {cfg.name!r}; "
                        f"the built-in ones are {BUILTIN_TINY!r} and {GEMMA_270M!r}")
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
               out_dir: Path, summary: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None,
               dtype: torch.dtype | None = None) -> None:
    """`save_pretrained` (+ the prompt template and the stage's `summary`) into a temporary
    sibling folder, then swap it into place.

    The summary records the hash of what was written (`weights_hash`), which `load_saved`
    checks: a model directory edited after its stage wrote it is refused. `state_dict`, when
    given, is what gets written (a full state dict gathered from sharded training); otherwise
    the model's own. `dtype`, when given, is the dtype the floating weights are written in (and
    the config names); the model in memory is left as it is."""
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
        write_json({**(summary or {}), WRITTEN_KEY: weights_hash(tmp)}, tmp / SUMMARY_FILE)


def load_saved(model_dir: Path, stage: str, dtype: torch.dtype | str = torch.float32
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model directory the pipeline wrote (`data/sft`, `data/policy`) after checking its
    files are still those its stage `stage` wrote."""
    check_saved(model_dir, stage)
    return load_pretrained(model_dir, dtype=dtype)


def load_for_scoring(model_dir: Path, stage: str, *, dtype: torch.dtype | str, max_length: int,
                     device: torch.device | str | None = None
                     ) -> tuple[PreTrainedModel, Encoder]:
    """A model directory the pipeline wrote, ready to score or sample from: its files checked
    (`check_saved`), weights in `dtype`, in eval mode (dropout inactive), on `device` (None:
    left on the CPU, for a caller that moves it once memory is free), with the `Encoder` of the
    template it was trained with. What `ref_logps`, `generate` and `evaluate` load; a judge's
    model (score model, guard) loads through `score_models.load_judge_model`."""
    model, tokenizer = load_saved(model_dir, stage, dtype=dtype)
    model.eval()
    if device is not None:
        model.to(device)
    return model, Encoder(tokenizer, load_template(model_dir), max_length)


def check_saved(model_dir: Path, stage: str) -> None:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no saved model (has `{stage}` run? `dvc repro {stage}`)",
                        path=model_dir)
    summary = model_dir / SUMMARY_FILE
    try:
        recorded = json.loads(summary.read_text()).get(WRITTEN_KEY)
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, str):
        raise UserError(f"no record of the files `{stage}` wrote ({SUMMARY_FILE}, key "
                        f"{WRITTEN_KEY!r}); rerun `dvc repro {stage}`", path=model_dir)
    now = weights_hash(model_dir)
    if now != recorded:
        raise UserError(f"its files were changed after `{stage}` wrote them (hash {now}, "
                        f"recorded {recorded}): a weight, config or tokenizer file was edited "
                        f"or replaced; rerun `dvc repro {stage}`", path=model_dir)


def max_abs_weight(model: PreTrainedModel) -> float:
    """The largest |weight| of the model; of all processes' shards for a sharded one (every
    process takes part, so all of them stop, or none)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    with torch.no_grad():
        big = max((float(p.detach().abs().max()) for p in local if p.numel()), default=0.0)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        t = torch.tensor(big, device=local[0].device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        big = float(t)
    return big


def check_weights(model: PreTrainedModel, what: str, start: float, max_growth: float) -> None:
    """Refuse to save non-finite or exploded weights: a learning rate far too high can leave
    them after a last step whose loss was still finite (one step at lr 1e10 moves every weight
    by ~1e10 under Adam).

    Exploded means the largest |weight| grew more than `max_growth` times over `start`, the
    largest at the start taken as at least 1 (a model's norm weights start at 1). Sound runs
    stay far below: Adam moves a weight by about the learning rate per step."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            # A sharded parameter is checked whole (every process takes part).
            if not torch.isfinite(p.full_tensor() if isinstance(p, DTensor) else p).all():
                raise UserError(f"{what} produced non-finite weights ({name}); lower the "
                                f"learning rate ({what}.lr)")
        now = max_abs_weight(model)
    limit = max_growth * max(start, 1.0)
    if now > limit:
        raise UserError(f"{what} diverged: the largest |weight| is {now:.3g}, more than "
                        f"{what}.max_weight_growth {max_growth:g} x {max(start, 1.0):.3g} (the "
                        f"start's); nothing was saved; lower the learning rate ({what}.lr)")


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
