"""Text to tokens, in one place: the prompt template, the tokenization of prompt + response, and
the truncation rule of a pair. SFT, reference log-probs, training, generation and evaluation all
go through `Encoder`, so a response is scored on exactly the prompt tokens it was trained and
generated on.

Templates (`model.template`):
- `auto`: the tokenizer's chat template if it has one, else `plain`;
- `chat`: the tokenizer's chat template (an error if it has none);
- `plain`: ``User: {prompt}\\nAssistant:``;
- `safe_rlhf`: ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:``, the format of the
  models that wrote PKU-SafeRLHF's responses and of the beaver score models;
- any other string containing ``{prompt}``: a format string.
The resolved template is saved in every model directory (`prompt_template.json`), so a model
carries the template it was trained with to every later stage.
A response ends with the token its template closes an assistant turn with (`turn_end`: Gemma's
`<end_of_turn>`, Llama 3's `<|eot_id|>`), else with EOS; that token is "EOS" below.

Tokenization: the response is tokenized *in context* (rendered prompt + separator + response in
one call) and cut from it by character offsets, because tokenizing ``" " + response`` on its own
adds a spurious leading token with SentencePiece/Metaspace tokenizers. The prompt tokens are
those of the rendered prompt alone, which is what generation feeds the model.

Truncation of a pair (the rule TRL applies): when prompt + the *longer* response + EOS exceeds
`max_length`, the prompt is cut once for the pair, from the left, to
``max(max_length // 2, max_length - longest)`` tokens, keeping BOS; then each response that
still does not fit is cut from the right, without EOS (as TRL cuts: an EOS after a cut would
teach the model to stop mid-sentence). Both sides of a pair thus see the same prompt tokens,
every sequence starts with BOS (where the tokenizer adds one itself, or the template renders
it), and every whole response ends with EOS.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from pipeline.errors import UserError
from pipeline.paths import TEMPLATE_FILE

NAMED_TEMPLATES = {
    "plain": "User: {prompt}\nAssistant:",
    "safe_rlhf": "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:",
}
IGNORE = -100
#: The day chat templates that print a date see (Llama 3.x: "Today Date: ...", Mistral Small:
#: `strftime_now("%Y-%m-%d")`), so a prompt's tokens do not change with the day it is rendered
#: on: reference log-probs of one day must score the training sequences of the next. It is the
#: date Llama 3.x's templates fall back to.
TEMPLATE_DAY = datetime.date(2024, 7, 26)
TEMPLATE_DATE = TEMPLATE_DAY.strftime("%d %b %Y")
_STRFTIME_NOW = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def fixed_date(chat_template: str) -> str:
    """`chat_template` with each `strftime_now('<format>')` call replaced by `TEMPLATE_DAY` in
    that format, as a string literal (transformers renders templates with plain data only, so
    the clock cannot be replaced by a function)."""
    return _STRFTIME_NOW.sub(lambda m: repr(TEMPLATE_DAY.strftime(m.group(2))), chat_template)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *,
                chat_template: str | None = None, add_generation_prompt: bool = False) -> str:
    """`messages` rendered by `chat_template` (None: the tokenizer's) at `TEMPLATE_DAY`: given
    as `date_string` and in place of every `strftime_now` with a literal format. Every chat
    rendering of the pipeline (prompts, score models, guard judges) goes through here. A
    template that still reads the clock (a format held in a variable) is caught by
    `Encoder.template_id`."""
    template = chat_template if chat_template is not None else tokenizer.chat_template
    return tokenizer.apply_chat_template(
        messages, chat_template=fixed_date(template) if isinstance(template, str) else None,
        tokenize=False, add_generation_prompt=add_generation_prompt, date_string=TEMPLATE_DATE)


@dataclass(frozen=True)
class Template:
    """A resolved prompt template: a chat template (`kind="chat"`, `text` its Jinja source) or
    a format string with one `{prompt}` field."""

    kind: str
    text: str

    def render(self, tokenizer: PreTrainedTokenizerBase | None, prompt: str) -> str:
        """`prompt` in the template, without trailing spaces: a prompt ending in one would
        tokenize it alone (`▁` / `Ġ`), and the response's first word brings its own, so the
        sequence would hold the space twice. The response follows after one (`joined`)."""
        if self.kind == "chat":
            if tokenizer is None:
                raise ValueError("a chat template needs its tokenizer to render")
            text = render_chat(tokenizer, [{"role": "user", "content": prompt}],
                               chat_template=self.text, add_generation_prompt=True)
        else:
            text = self.text.replace("{prompt}", prompt)
        return text.rstrip(" \t")

    @property
    def id(self) -> str:
        """Identifies the template's source (`Encoder.template_id`, which fingerprints hold, adds
        what it renders)."""
        return hashlib.sha256(f"{self.kind}\0{self.text}".encode()).hexdigest()[:16]

    def describe(self, width: int = 60) -> str:
        """For the log: `chat` (the tokenizer's), or the format string, by name where it is a
        named one, its text abbreviated to `width` characters."""
        if self.kind == "chat":
            return f"chat (the tokenizer's chat template, {len(self.text)} chars, id {self.id})"
        name = next((k for k, v in NAMED_TEMPLATES.items() if v == self.text), None)
        text = repr(self.text)
        if len(text) > width:
            text = text[:width - 4] + "...'"
        return f"format {name} {text}" if name else f"format {text}"

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / TEMPLATE_FILE).write_text(
            json.dumps({"kind": self.kind, "text": self.text}, indent=2) + "\n")


def joined(rendered: str, response: str) -> str:
    """A rendered prompt and its response as one text, the response starting at
    `len(rendered)`: after a space, unless the prompt ends in whitespace (a newline)."""
    sep = "" if not rendered or rendered[-1].isspace() else " "
    return rendered + sep + response.strip()


def template_corpus(template: Template, prompts: Sequence[str], responses: Sequence[str]
                    ) -> list[str]:
    """The texts a tokenizer yet to be trained (`builtin:tiny`) learns from: each response
    after its prompt in `template` (a format template: a chat one needs a tokenizer), exactly
    as `Encoder` will tokenize them."""
    return [joined(template.render(None, p), r) for p, r in zip(prompts, responses, strict=True)]


def resolve_template(spec: str, tokenizer: PreTrainedTokenizerBase | None) -> Template:
    """The template `spec` (a `model.template` value) means for `tokenizer` (None: a tokenizer
    yet to be trained, which has no chat template)."""
    chat = getattr(tokenizer, "chat_template", None)
    if isinstance(chat, dict):  # several named templates: the default one is the chat one
        chat = chat.get("default")
    if spec == "auto":
        return Template("chat", chat) if chat else Template("format", NAMED_TEMPLATES["plain"])
    if spec == "chat":
        if not chat:
            raise UserError("parameter model.template: chat, but the tokenizer has no chat "
                            "template; use plain, safe_rlhf or a format string with {prompt}")
        return Template("chat", chat)
    if spec in NAMED_TEMPLATES:
        return Template("format", NAMED_TEMPLATES[spec])
    if spec.count("{prompt}") != 1:
        raise UserError(f"parameter model.template: {spec!r} is not auto, chat, plain, "
                        "safe_rlhf or a format string with exactly one {prompt}")
    return Template("format", spec)


_TURN_PROBE = "SAFEDPO_PROBE_ANSWER"


def turn_end(template: Template, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token a chat template closes an assistant turn with, read off a rendered turn: the
    first token after the answer, if it is a special token (Gemma's `<end_of_turn>`, Llama 3's
    `<|eot_id|>`, ChatML's `<|im_end|>`, or EOS itself). None for format templates and for chat
    templates that close a turn with plain text: the response then ends with EOS."""
    if template.kind != "chat":
        return None
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": _TURN_PROBE}],
                           chat_template=template.text)
    except (TemplateError, TypeError, ValueError):  # it refuses the probe: no turn token
        return None
    if _TURN_PROBE not in text:
        return None
    tail = text[text.rindex(_TURN_PROBE) + len(_TURN_PROBE):].lstrip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def load_template(model_dir: Path) -> Template:
    """The template saved with a model by the stage that wrote it."""
    path = Path(model_dir) / TEMPLATE_FILE
    if not path.exists():
        raise UserError(f"no {TEMPLATE_FILE}: not a model written by this pipeline; rerun "
                        "`dvc repro sft`", path=model_dir)
    data = json.loads(path.read_text())
    return Template(kind=data["kind"], text=data["text"])


@dataclass(frozen=True)
class Encoded:
    """One tokenized (prompt, response): ids of both, and labels with the prompt masked."""

    input_ids: list[int]
    labels: list[int]

    @classmethod
    def join(cls, prompt: Sequence[int], response: Sequence[int]) -> Encoded:
        return cls([*prompt, *response], [IGNORE] * len(prompt) + list(response))

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def n_prompt_tokens(self) -> int:
        """Tokens before the first label (all of them when nothing is labelled)."""
        return next((t for t, lab in enumerate(self.labels) if lab != IGNORE), len(self.labels))


#: More than this share of items cut draws a warning (`TruncationStats.warning`).
WARN_TRUNCATED_SHARE = 0.10
#: The warning names the max_length that keeps this share of the items whole.
KEEP_WHOLE_SHARE = 0.95


@dataclass
class TruncationStats:
    """How many items (pairs or single sequences) the length rule cut, and by how much; and the
    length each item needed to stay whole."""

    items: int = 0
    truncated: int = 0
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0
    max_prompt_cut: int = 0
    needed: list[int] = field(default_factory=list)

    def count(self, prompt_cut: int, response_cut: int = 0, *, needed: int) -> None:
        """One item, of which `prompt_cut` prompt and `response_cut` response tokens were cut;
        it would have fitted whole in `needed` tokens."""
        self.items += 1
        self.needed.append(needed)
        if prompt_cut or response_cut:
            self.truncated += 1
            self.prompt_tokens_cut += prompt_cut
            self.response_tokens_cut += response_cut
            self.max_prompt_cut = max(self.max_prompt_cut, prompt_cut)

    def as_dict(self) -> dict[str, int]:
        return {"items": self.items, "truncated": self.truncated,
                "prompt_tokens_cut": self.prompt_tokens_cut,
                "response_tokens_cut": self.response_tokens_cut,
                "max_prompt_cut": self.max_prompt_cut}

    def length_to_keep(self, share: float = KEEP_WHOLE_SHARE) -> int:
        """The smallest max_length that leaves at least `share` of the items whole."""
        if not self.needed:
            return 0
        k = max(1, math.ceil(share * len(self.needed)))
        return sorted(self.needed)[k - 1]

    def warning(self, what: str, key: str, max_length: int) -> str | None:
        """A `warning:` line when more than `WARN_TRUNCATED_SHARE` of the items were cut at
        `max_length` (the parameter `key`), with the max_length that keeps 95% of them whole;
        None otherwise."""
        if self.truncated <= WARN_TRUNCATED_SHARE * self.items:
            return None
        return (f"warning: {self.truncated} of {self.items} {what} "
                f"({100 * self.truncated / self.items:.1f}%) truncated at {key} {max_length} "
                f"({self.prompt_tokens_cut} prompt and {self.response_tokens_cut} response tokens "
                f"cut); {key} {self.length_to_keep()} would keep "
                f"{KEEP_WHOLE_SHARE:.0%} of them whole")

    def describe(self, what: str = "pairs") -> str:
        # Generation cuts prompts only: no response count there.
        responses = (f", {self.response_tokens_cut} response tokens" if what != "prompts"
                     else "")
        return (f"{self.truncated} of {self.items} {what} truncated "
                f"({self.prompt_tokens_cut} prompt tokens{responses} cut; at most "
                f"{self.max_prompt_cut} from one prompt)")


def prompt_keep(n_prompt: int, longest: int, max_length: int) -> int:
    """Prompt tokens kept when followed by `longest` tokens (the longer response + EOS, or the
    new tokens of generation): all that fit, and never fewer than half the budget."""
    if n_prompt + longest <= max_length:
        return n_prompt
    return min(n_prompt, max(max_length // 2, max_length - longest))


class Encoder:
    """Tokenizer + template + `max_length`: every sequence the pipeline scores comes from here."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: Template,
                 max_length: int) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.bos = tokenizer.bos_token_id
        # BOS goes first where the tokenizer puts it there itself (Llama, Mistral, Gemma), as
        # the model saw in pretraining; not where it only names one (GPT-2, Pythia, OLMo:
        # bos = eos = <|endoftext|>, a document separator never put in front of a text).
        probe = tokenizer("a")["input_ids"]
        self.add_bos = self.bos is not None and bool(probe) and probe[0] == self.bos
        # What closes a response: the token the chat template ends an assistant turn with
        # (Gemma's <end_of_turn>), else EOS. Generation stops on it as on every EOS id.
        self.eos = turn_end(template, tokenizer)
        if self.eos is None:
            self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise UserError("the tokenizer has no EOS token; responses cannot be terminated")

    def require_room(self, param: str) -> None:
        """Refuse a `max_length` (named `param`) that cannot hold the prompt template around an
        empty prompt plus one response token and EOS: every sequence would be cut, the
        template's head first, and training would learn from nothing but truncations."""
        overhead = len(self.prompt_ids([""])[0])
        if overhead + 2 > self.max_length:
            raise UserError(f"parameter {param}: {self.max_length} tokens cannot hold the prompt "
                            f"template ({self.template.kind}: {overhead} tokens around an empty "
                            f"prompt) plus a response; raise it above {overhead + 2} (far above, "
                            "for real prompts)")

    @property
    def template_id(self) -> str:
        """The template and what it renders (a probe prompt): a template whose output moves
        with the day (`strftime_now`) gives another id on another day."""
        probe = self.render(["{prompt}"])[0]
        return hashlib.sha256(f"{self.template.id}\0{probe}".encode()).hexdigest()[:16]

    # -- pieces ---------------------------------------------------------------------------

    def render(self, prompts: Sequence[str]) -> list[str]:
        return [self.template.render(self.tokenizer, p) for p in prompts]

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of the rendered prompts, BOS first where the tokenizer adds one (or the
        template renders it)."""
        return self._ids_of(self.render(prompts))

    def _ids_of(self, rendered: Sequence[str]) -> list[list[int]]:
        if not rendered:
            return []
        ids = self.tokenizer(list(rendered), add_special_tokens=False)["input_ids"]
        return [x if not self.add_bos or (x and x[0] == self.bos) else [self.bos, *x]
                for x in ids]

    def _cut_prompt(self, p: list[int], keep: int) -> list[int]:
        """The last `keep` tokens of prompt `p`, its BOS kept in front."""
        if keep >= len(p):
            return p
        head = [p[0]] if self.bos is not None and p and p[0] == self.bos else []
        return head + p[len(p) - (keep - len(head)):]

    def response_ids(self, rendered: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Tokens of each response as they fall in context after its rendered prompt (no EOS)."""
        texts = [joined(text, r) for text, r in zip(rendered, responses, strict=True)]
        starts = [len(text) for text in rendered]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, start in zip(enc["input_ids"], enc["offset_mapping"], starts,
                                       strict=True):
            # The first token that covers any character after the prompt starts the response.
            k = next((i for i, (_, end) in enumerate(offsets) if end > start), len(ids))
            out.append(list(ids[k:]))
        return out

    # -- sequences --------------------------------------------------------------------------

    def _cut(self, p: list[int], responses: list[list[int]], stats: TruncationStats
             ) -> list[Encoded]:
        longest = max(len(r) for r in responses) + 1  # + EOS
        keep = prompt_keep(len(p), longest, self.max_length)
        n_p = len(p)
        p = self._cut_prompt(p, keep)
        room = self.max_length - len(p)  # response tokens + EOS
        stats.count(n_p - len(p), sum(max(0, len(r) + 1 - room) for r in responses),
                    needed=n_p + longest)
        # A response cut short gets no EOS (as TRL cuts): closing it would teach the model to
        # stop mid-sentence. One that fits ends with EOS.
        return [Encoded.join(p, [*r, self.eos] if len(r) < room else r[:room])
                for r in responses]

    def sequences(self, prompts: Sequence[str], responses: Sequence[str],
                  stats: TruncationStats | None = None) -> list[Encoded]:
        """One (prompt, response) sequence each, cut by the pair rule with one response."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        stats = stats if stats is not None else TruncationStats()
        rendered = self.render(prompts)
        r_ids = self.response_ids(rendered, responses) if prompts else []
        return [self._cut(p, [r], stats)[0]
                for p, r in zip(self._ids_of(rendered), r_ids, strict=True)]

    def pairs(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
              stats: TruncationStats | None = None) -> list[tuple[Encoded, Encoded]]:
        """Both responses of each pair on the same (once-truncated) prompt tokens."""
        if not len(prompts) == len(first) == len(second):
            raise ValueError("prompts and responses differ in length")
        if not prompts:
            return []
        stats = stats if stats is not None else TruncationStats()
        rendered = self.render(prompts)
        a = self.response_ids(rendered, first)
        b = self.response_ids(rendered, second)
        out = []
        for p, ra, rb in zip(self._ids_of(rendered), a, b, strict=True):
            ea, eb = self._cut(p, [ra, rb], stats)
            out.append((ea, eb))
        return out

    def generation_prompts(self, prompts: Sequence[str], max_new_tokens: int,
                           stats: TruncationStats | None = None) -> list[list[int]]:
        """Prompt ids for generation, cut by the same rule as in training, with the new tokens
        in place of the longer response; `stats` counts the prompts cut."""
        stats = stats if stats is not None else TruncationStats()
        out = []
        for p in self.prompt_ids(prompts):
            kept = self._cut_prompt(p, prompt_keep(len(p), max_new_tokens, self.max_length))
            stats.count(len(p) - len(kept), needed=len(p) + max_new_tokens)
            out.append(kept)
        return out
