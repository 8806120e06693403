"""Small stand-ins for what users bring: a SentencePiece-style (Metaspace) tokenizer with a chat
template, a Llama checkpoint saved in bf16, and long PKU-SafeRLHF-v1-shaped rows.

Nothing here is downloaded: the tests build each piece, shaped like the real thing (Llama-2's
`▁` word boundaries and BOS, a chat template, bf16 `config.json` dtype, responses of hundreds of
words with nested harm categories and severities).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# A Llama-2-like chat template: BOS in the template text, [INST] ... [/INST].
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                 "[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
                 "{% endif %}{% endfor %}")
# The strings of the templates the tests render (chat, plain, safe_rlhf), a few times each.
TEMPLATE_TEXTS = ["[INST] hi [/INST] hello", "User: hi\nAssistant: hello",
                  "BEGINNING OF CONVERSATION: USER: hi ASSISTANT: hello"] * 5
WORDS = (
    "the", "a", "to", "of", "and", "how", "can", "i", "you", "we", "it", "is", "this", "that",
    "make", "get", "help", "safe", "harm", "people", "bread", "bike", "water", "fire",
    "money", "code", "lock", "door", "car", "phone", "friend", "law", "police", "risk",
    "legal", "sorry", "cannot", "with", "for", "on", "in", "step", "first", "then", "finally",
    "never", "always", "please", "should", "would", "could", "steal", "hack", "weapon",
    "poison", "drug", "kill", "hurt", "cook", "bake", "fix", "repair", "learn",
)
HARM_CATEGORIES = ["Endangering National Security", "Insulting Behavior", "Discriminatory "
                   "Behavior", "Endangering Public Health", "Copyright Issues", "Violence",
                   "Drugs", "Privacy Violation", "Economic Crime", "Mental Manipulation",
                   "Human Trafficking", "Physical Harm", "Sexual Content", "Cybercrime",
                   "Disrupting Public Order", "Environmental Damage", "Psychological Harm",
                   "White-Collar Crime", "Animal Abuse"]


def metaspace_tokenizer(texts: list[str], vocab_size: int = 600,
                        chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A BPE tokenizer laid out as Llama-2's `tokenizer.json`: the normalizer prepends `▁` and
    turns spaces into `▁` (so `" " + text` on its own gets a spurious lone `▁` token), words
    split before each `▁`, `<s>`/`</s>`/`<unk>` specials, BOS put in front of every text, and no
    pad token. The templates' own strings are in its training texts, so `[INST]`, `USER:` or a
    newline tokenize as in a real vocabulary rather than as `<unk>`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator([*texts, *TEMPLATE_TEXTS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=4096)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 32,
               layers: int = 2, dropout: float = 0.0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=False,
        attention_dropout=dropout)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_hub_like(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save as a hub checkpoint is: weights in `dtype`, `config.json` saying so, and a
    `generation_config.json` with sampling defaults of its own (top_k, repetition penalty)."""
    model = model.to(dtype)
    model.generation_config.top_k = 50
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.do_sample = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).split(".")[-1]
    return out


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n)).capitalize() + "."


def long_text(rng: np.random.Generator, words: int) -> str:
    out, total = [], 0
    while total < words:
        n = int(rng.integers(6, 18))
        out.append(_sentence(rng, n))
        total += n
    return " ".join(out)


def pku_v1_rows(n: int, seed: int = 0, words: tuple[int, int] = (150, 400)) -> list[dict]:
    """Rows with PKU-SafeRLHF v1's columns and shapes: long prompts and responses, a dict of 19
    harm categories per response, severity 0-3, source columns, better/safer ids."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = f"Question {i}: " + long_text(rng, int(rng.integers(20, 120)))
        resp = [long_text(rng, int(rng.integers(*words))) for _ in range(2)]
        safe = [bool(rng.random() < 0.5), bool(rng.random() < 0.5)]
        cats = [{c: (not s) and bool(rng.random() < 0.2) for c in HARM_CATEGORIES} for s in safe]
        sev = [0 if s else int(rng.integers(1, 4)) for s in safe]
        better = int(rng.integers(0, 2))
        safer = int(np.argmin(sev)) if sev[0] != sev[1] else int(rng.integers(0, 2))
        rows.append({
            "prompt": prompt, "response_0": resp[0], "response_1": resp[1],
            "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B",
            "response_1_source": "Alpaca2-7B", "is_response_0_safe": safe[0],
            "is_response_1_safe": safe[1], "response_0_harm_category": cats[0],
            "response_1_harm_category": cats[1], "response_0_severity_level": sev[0],
            "response_1_severity_level": sev[1], "better_response_id": better,
            "safer_response_id": safer, "response_0_sha256": f"{i:064x}",
            "response_1_sha256": f"{i + n:064x}",
        })
    return rows


def corpus(rows: list[dict]) -> list[str]:
    return [r[k] for r in rows for k in ("prompt", "response_0", "response_1")]
