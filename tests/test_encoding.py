"""Templates, in-context tokenization and the pair truncation rule (pipeline/encoding.py), on a
Llama-2-style SentencePiece tokenizer with a chat template and PKU-length texts."""

from __future__ import annotations

from pathlib import Path

import pytest
from real_models import CHAT_TEMPLATE, corpus, metaspace_tokenizer, pku_v1_rows

from pipeline.encoding import (
    IGNORE,
    NAMED_TEMPLATES,
    Encoder,
    Template,
    TruncationStats,
    load_template,
    resolve_template,
)
from pipeline.errors import UserError

ROWS = pku_v1_rows(6, seed=3)


@pytest.fixture(scope="module")
def tok():
    return metaspace_tokenizer(corpus(ROWS))


def test_template_resolution(tok, tmp_path: Path) -> None:
    auto = resolve_template("auto", tok)
    assert auto.kind == "chat" and auto.text == CHAT_TEMPLATE
    assert auto.render(tok, "hi") == "<s>[INST] hi [/INST]"
    assert resolve_template("safe_rlhf", tok).render(tok, "hi") == \
        "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"
    assert resolve_template("Q: {prompt}\nA:", tok).render(tok, "{x}") == "Q: {x}\nA:"
    no_chat = metaspace_tokenizer(corpus(ROWS[:2]), chat_template=None)
    assert resolve_template("auto", no_chat).render(no_chat, "hi") == "User: hi\nAssistant:"
    with pytest.raises(UserError, match="no chat template"):
        resolve_template("chat", no_chat)
    with pytest.raises(UserError, match=r"model\.template"):
        resolve_template("no field", tok)
    # Each template is its own fingerprint, and travels with the model directory.
    assert len({auto.id, resolve_template("plain", tok).id,
                resolve_template("safe_rlhf", tok).id}) == 3
    auto.save(tmp_path)
    assert load_template(tmp_path) == auto


@pytest.mark.parametrize("spec", ["safe_rlhf", "plain", "auto"])
def test_response_is_tokenized_in_context_with_no_spurious_token(tok, spec: str) -> None:
    enc = Encoder(tok, resolve_template(spec, tok), 100_000)
    prompt, response = ROWS[0]["prompt"], ROWS[0]["response_0"]
    (e,) = enc.sequences([prompt], [response])
    rendered = enc.template.render(tok, prompt)
    sep = "" if rendered[-1].isspace() else " "
    whole = tok(rendered + sep + response, add_special_tokens=False)["input_ids"]
    if whole[0] != tok.bos_token_id:
        whole = [tok.bos_token_id, *whole]
    # Exactly the tokenization of the whole text, then EOS; labels start at the response.
    assert e.input_ids == [*whole, tok.eos_token_id]
    n_prompt = len(enc.prompt_ids([prompt])[0])
    assert e.labels[:n_prompt] == [IGNORE] * n_prompt
    assert e.labels[n_prompt:] == e.input_ids[n_prompt:]
    # What the old code did, " " + response on its own, adds a lone "▁" with this tokenizer.
    alone = tok(" " + response, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone[:1]) == ["▁"]
    assert e.input_ids[n_prompt:-1] == alone[1:]


def test_a_pair_is_cut_once_and_a_cut_response_has_no_eos(tok) -> None:
    enc = Encoder(tok, resolve_template("safe_rlhf", tok), 192)
    stats = TruncationStats()
    prompts = [r["prompt"] for r in ROWS]
    short = ["Sorry, I cannot help with that."] * len(ROWS)
    pairs = enc.pairs(prompts, [r["response_0"] for r in ROWS], short, stats)
    assert stats.items == len(ROWS) and stats.truncated == len(ROWS)
    assert stats.prompt_tokens_cut > 0 and stats.response_tokens_cut > 0
    for (a, b), full in zip(pairs, enc.prompt_ids(prompts), strict=True):
        pa = [t for t, lab in zip(a.input_ids, a.labels, strict=True) if lab == IGNORE]
        pb = [t for t, lab in zip(b.input_ids, b.labels, strict=True) if lab == IGNORE]
        assert pa == pb  # the same prompt tokens on both sides
        assert len(pa) >= min(len(full), 192 // 2)
        assert pa[1:] == full[len(full) - len(pa) + 1:]  # BOS + the prompt's end
        for e in (a, b):
            assert len(e.input_ids) <= 192 and e.input_ids[0] == tok.bos_token_id
        # The short side is whole and ends with EOS; the long one fills the budget with
        # response tokens and no EOS: its end was cut, not reached.
        assert b.input_ids[-1] == tok.eos_token_id and b.n_response_tokens < 20
        assert len(a.input_ids) == 192 and tok.eos_token_id not in a.input_ids
    # The cut depends on the pair, not on the order of its sides.
    swapped = enc.pairs(prompts, short, [r["response_0"] for r in ROWS])
    assert [(b, a) for a, b in pairs] == swapped


def test_generation_sees_the_prompt_tokens_training_sees(tok) -> None:
    enc = Encoder(tok, resolve_template("auto", tok), 256)
    prompt = ROWS[1]["prompt"] * 3  # longer than the budget
    cut = TruncationStats()
    gen, whole = enc.generation_prompts([prompt, "hi"], max_new_tokens=128, stats=cut)
    (pair,) = enc.pairs([prompt], ["x " * 127], ["y"])
    trained = [t for t, lab in zip(pair[0].input_ids, pair[0].labels, strict=True)
               if lab == IGNORE]
    assert gen == trained and gen[0] == tok.bos_token_id and len(gen) == 128
    n = len(enc.prompt_ids([prompt])[0])
    assert cut.as_dict() == {"items": 2, "truncated": 1, "prompt_tokens_cut": n - 128,
                             "response_tokens_cut": 0, "max_prompt_cut": n - 128}
    # A prompt that fits is fed whole.
    assert whole == enc.prompt_ids(["hi"])[0]


def test_template_kinds_are_explicit() -> None:
    assert Template("format", "A {prompt} B").render(None, "x") == "A x B"
    with pytest.raises(ValueError, match="tokenizer"):
        Template("chat", CHAT_TEMPLATE).render(None, "x")


def test_a_chat_template_that_prints_the_date_renders_a_fixed_one(
        tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama 3.x's templates print today's date unless `date_string` is given, Mistral Small's
    call `strftime_now` regardless: both render at a fixed date, so the reference log-probs of
    one day score the same tokens the next. A template that reads the clock in a way that
    cannot be pinned (a format in a variable) moves with the day, and so does its id."""
    import datetime

    from transformers.utils import chat_template_utils

    llama31 = ("{%- if not date_string is defined %}{%- if strftime_now is defined %}"
               "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}"
               "{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
               "Today Date: {{ date_string }}\n" + CHAT_TEMPLATE)
    mistral = 'Now: {{ strftime_now("%Y-%m-%d") }}\n' + CHAT_TEMPLATE
    variable = "{% set f = '%Y-%m-%d' %}Now: {{ strftime_now(f) }}\n" + CHAT_TEMPLATE

    class Day(datetime.datetime):
        day = datetime.datetime(2031, 5, 17)

        @classmethod
        def now(cls, tz: object = None) -> datetime.datetime:  # type: ignore[override]
            return cls.day

    monkeypatch.setattr(chat_template_utils, "datetime", Day)
    ids = {}
    for when in (datetime.datetime(2031, 5, 17), datetime.datetime(2031, 5, 18)):
        Day.day = when
        encoders = [Encoder(tok, Template("chat", t), 64) for t in (llama31, mistral, variable)]
        first, second, moving = (e.render(["hi"])[0] for e in encoders)
        assert "Today Date: 26 Jul 2024" in first and "Now: 2024-07-26" in second
        assert f"Now: {when:%Y-%m-%d}" in moving
        ids[when.day] = [e.template_id for e in encoders]
    assert ids[17][:2] == ids[18][:2] and ids[17][2] != ids[18][2]


def test_bos_goes_first_only_where_the_tokenizer_puts_it(tok) -> None:
    """Llama-style tokenizers put BOS in front of a text, GPT-NeoX-style ones (bos = eos =
    <|endoftext|>) do not: the encoder follows the tokenizer, and a BOS the template renders is
    kept, once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(ROWS), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    neox = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")
    end = neox.eos_token_id
    plain = Encoder(neox, resolve_template("plain", neox), 64)
    seq = plain.sequences(["hi there"], ["hello"])[0]
    assert not plain.add_bos and seq.input_ids[0] != end and seq.input_ids[-1] == end
    assert seq.input_ids[:seq.n_prompt_tokens] == neox("User: hi there\nAssistant:")["input_ids"]
    rendered = Encoder(neox, Template("format", "<|endoftext|>User: {prompt}\nAssistant:"), 64)
    ids = rendered.prompt_ids(["hi"])[0]
    assert ids[0] == end and ids[1] != end
    llama = Encoder(tok, resolve_template("plain", tok), 64)
    ids = llama.prompt_ids(["hi"])[0]
    assert llama.add_bos and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_a_template_ending_in_a_space_tokenizes_as_one_text(tok) -> None:
    """`ASSISTANT: ` would tokenize its space alone, and the response's first word brings its
    own `▁`: prompt + response must be the tokens of the whole text, once."""
    for template in ("USER: {prompt} ASSISTANT: ", "USER: {prompt} ASSISTANT:"):
        enc = Encoder(tok, Template("format", template), 256)
        seq = enc.sequences(["how can i bake bread"], ["first mix the water"])[0]
        whole = tok("USER: how can i bake bread ASSISTANT: first mix the water")["input_ids"]
        assert seq.input_ids == [*whole, tok.eos_token_id], template
        assert enc.prompt_ids(["how can i bake bread"])[0] == seq.input_ids[:seq.n_prompt_tokens]


def test_a_template_describes_itself_for_the_log() -> None:
    assert Template("format", NAMED_TEMPLATES["safe_rlhf"]).describe() == (
        "format safe_rlhf 'BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:'")
    long = Template("format", "### Instruction: answer this carefully and kindly\n{prompt}\n"
                              "### Response:")
    text = long.describe(width=40)
    assert text.startswith("format '### Instruction: answer this car") and text.endswith("...'")
    assert len(text) == len("format ") + 40
    chat = Template("chat", "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert chat.describe() == f"chat (the tokenizer's chat template, 50 chars, id {chat.id})"


def test_truncation_warns_past_a_tenth_and_names_the_length_that_keeps_95_percent(tok) -> None:
    rows = pku_v1_rows(40, seed=5, words=(20, 300))
    prompts = [r["prompt"] for r in rows]
    first, second = [r["response_0"] for r in rows], [r["response_1"] for r in rows]
    stats = TruncationStats()
    Encoder(tok, resolve_template("plain", tok), 128).pairs(prompts, first, second, stats)
    assert stats.truncated > 0.1 * stats.items
    keep = stats.length_to_keep()
    line = stats.warning("train pairs", "train.max_length", 128)
    assert line == (f"warning: {stats.truncated} of 40 train pairs "
                    f"({100 * stats.truncated / 40:.1f}%) truncated at train.max_length 128 "
                    f"({stats.prompt_tokens_cut} prompt and {stats.response_tokens_cut} "
                    f"response tokens cut); train.max_length {keep} would keep 95% of them whole")
    # At that length at most 5% of the pairs are cut (2 of 40), one token less cuts more.
    at_keep, below = TruncationStats(), TruncationStats()
    Encoder(tok, resolve_template("plain", tok), keep).pairs(prompts, first, second, at_keep)
    Encoder(tok, resolve_template("plain", tok), keep - 1).pairs(prompts, first, second, below)
    assert at_keep.truncated <= 2 < below.truncated
    assert at_keep.warning("train pairs", "train.max_length", keep) is None
    # Up to a tenth cut is no warning.
    few = TruncationStats()
    for i in range(10):
        few.count(5 if i == 0 else 0, needed=300 if i == 0 else 100)
    assert few.warning("SFT examples", "sft.max_length", 128) is None
