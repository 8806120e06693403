"""Typed, validated configuration: `params.yaml` -> frozen dataclasses -> explicit arguments.

`load_params` is the only place that reads `params.yaml`. Each section is a dataclass whose
`__post_init__` validates its values, so a bad value fails once, with its dotted key, before any
work starts. Unknown keys are rejected too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from pipeline.errors import UserError

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
#: Forward layouts of training batches (`logps.forward_layout`).
LayoutKind = Literal["auto", "padded", "packed", "shared_prompts"]
WeightDtype = Literal["auto", "float32", "bfloat16", "float16"]
#: How training holds the model over several processes (`pipeline.sharding`): `none` (a
#: whole copy per process, DDP) or `fsdp2` (parameters, gradients and optimizer state sharded).
Sharding = Literal["none", "fsdp2"]


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise UserError(f"parameter {key}: {msg}")


@dataclass(frozen=True)
class ToyConfig:
    """`builtin:toy` generator settings (see pipeline/toydata.py)."""

    n_train: int = 2000
    n_test: int = 400
    seed: int = 0
    label_noise: float = 0.05
    harmful_share: float = 0.5
    sensitive_share: float = 0.15

    def __post_init__(self) -> None:
        _check(self.n_train > 0, "dataset.toy.n_train", "must be > 0")
        _check(self.n_test > 0, "dataset.toy.n_test", "must be > 0")
        _check(0.0 <= self.label_noise <= 0.5, "dataset.toy.label_noise", "must be in [0, 0.5]")
        _check(0.0 <= self.harmful_share <= 1.0, "dataset.toy.harmful_share", "must be in [0, 1]")
        _check(0.0 <= self.sensitive_share <= 1.0 - self.harmful_share,
               "dataset.toy.sensitive_share", "must be in [0, 1 - harmful_share]")


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "builtin:toy"
    revision: str | None = None
    layout: Literal["auto", "pku30k", "pku_v1", "chosen_rejected"] = "auto"
    train_split: str = "train"
    test_split: str = "test"
    test_fraction: float = 0.1
    split_seed: int = 0
    max_rows: int | None = None
    # Test pairs whose prompt also occurs in train (as the text reads) are left out of the test
    # split, and a test split whose prompts all do is refused, unless this is set: then they
    # are kept and scored, and evaluate warns.
    allow_seen_test_prompts: bool = False
    # Longer prompts or responses are rejected (reason too_long): a single huge text must not
    # reach tokenization and scoring.
    max_text_chars: int = 100_000
    toy: ToyConfig = field(default_factory=ToyConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "dataset.name", "must not be empty")
        _check(0.0 < self.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)")
        _check(self.max_rows is None or self.max_rows > 0, "dataset.max_rows", "must be > 0")
        _check(self.max_text_chars > 0, "dataset.max_text_chars", "must be > 0")


@dataclass(frozen=True)
class TinyModelConfig:
    """Dimensions of the `builtin:tiny` Llama-style model and its BPE tokenizer."""

    vocab_size: int = 1024
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 300, "model.tiny.vocab_size", "must be >= 300 (bytes + specials)")
        for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(getattr(self, k) > 0, f"model.tiny.{k}", "must be > 0")
        _check(self.hidden_size % self.num_heads == 0, "model.tiny.hidden_size",
               "must be divisible by num_heads")
        _check(self.num_heads % self.num_kv_heads == 0, "model.tiny.num_kv_heads",
               "must divide num_heads")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "builtin:tiny"
    revision: str | None = None
    trust_remote_code: bool = False
    # auto | chat | plain | safe_rlhf | a format string with {prompt} (pipeline/encoding.py).
    template: str = "auto"
    # Weights of the inference stages (ref_logps, generate, evaluate); auto = fp32, as trained.
    dtype: WeightDtype = "auto"
    # Dtype the sft stage saves data/sft in (train saves data/policy in data/sft's): auto = the
    # dtype of the checkpoint it started from (builtin:tiny: float32). Training itself always
    # runs fp32 master weights.
    save_dtype: WeightDtype = "auto"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        _check(self.template in ("auto", "chat", "plain", "safe_rlhf")
               or self.template.count("{prompt}") == 1, "model.template",
               "must be auto, chat, plain, safe_rlhf or a format string with one {prompt}")


@dataclass(frozen=True)
class OptimConfig:
    """What the SFT and preference training loops share."""

    lr: float = 3e-3
    epochs: float = 2.0
    batch_size: int = 32
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 192
    seed: int = 0
    mixed_precision: MixedPrecision = "auto"
    gradient_checkpointing: bool = False
    log_every: int = 20
    # The forward layout (`logps.forward_layout`): auto | padded | packed | shared_prompts;
    # null = what measured fastest on the device (CPU: auto, GPU: padded).
    layout: LayoutKind | None = None
    # Length-sorted groups per padded forward pass (null: 4 on CPU, 1 on GPU).
    forward_groups: int | None = None
    # The largest |weight| may grow at most this factor over the start's (taken as at least 1)
    # before the run counts as diverged and nothing is saved (`modeling.check_weights`).
    max_weight_growth: float = 100.0
    # none: a whole model per process (DDP); fsdp2: sharded over the processes
    # (`pipeline.sharding`; one process trains unsharded either way).
    sharding: Sharding = "none"

    def _validate(self, section: str) -> None:
        _check(self.lr > 0, f"{section}.lr", "must be > 0")
        _check(self.epochs > 0, f"{section}.epochs", "must be > 0")
        _check(self.batch_size > 0, f"{section}.batch_size", "must be > 0")
        _check(self.grad_accum > 0, f"{section}.grad_accum", "must be > 0")
        _check(0.0 <= self.warmup_ratio < 1.0, f"{section}.warmup_ratio", "must be in [0, 1)")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        _check(self.max_grad_norm > 0, f"{section}.max_grad_norm", "must be > 0")
        _check(self.max_length >= 16, f"{section}.max_length", "must be >= 16")
        _check(self.log_every > 0, f"{section}.log_every", "must be > 0")
        _check(self.max_weight_growth > 1, f"{section}.max_weight_growth", "must be > 1")
        _check(self.forward_groups is None or self.forward_groups > 0,
               f"{section}.forward_groups", "must be > 0 or null")
        # fp16 needs loss scaling, whose overflowing steps are skipped by design; the loop
        # stops on a non-finite gradient norm, which would end an fp16 run at its first step.
        _check(self.mixed_precision != "fp16", f"{section}.mixed_precision",
               "fp16 is not supported (its loss-scaled overflow steps read as a non-finite "
               "gradient); use bf16 (Ampere or newer GPUs), no, or auto")


@dataclass(frozen=True)
class SFTConfig(OptimConfig):
    enabled: bool = True
    # Which responses of each pair to imitate. `both` gives the mixed safe/unsafe SFT policy of
    # the paper's baseline; `better`, `safer` and `safe` are there for ablations.
    responses: Literal["both", "better", "safer", "safe"] = "both"

    def __post_init__(self) -> None:
        self._validate("sft")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        _check(self.r > 0, "train.lora.r", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "train.lora.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    max_grad_norm: float = 10.0
    log_every: int = 10
    objective: str = "safedpo"  # a key of pipeline.objectives.OBJECTIVES
    checkpoint_every: int = 50
    # Dropout off in preference training (as TRL): the policy is then scored like its
    # eval-mode reference.
    disable_dropout: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        # `objective` is checked against pipeline.objectives where it is used (the train
        # stage's first step), so this module stays free of torch and of the objectives.
        self._validate("train")
        _check(self.checkpoint_every > 0, "train.checkpoint_every", "must be > 0")
        # Merging LoRA on save needs the whole model in one process.
        _check(not (self.lora.enabled and self.sharding != "none"), "train.sharding",
               "LoRA (train.lora.enabled) trains unsharded; set sharding: none")
        # peft builds its adapters' dropout after dropout was disabled: it would be on again.
        _check(not (self.lora.enabled and self.lora.dropout > 0 and self.disable_dropout),
               "train.lora.dropout", "must be 0 with train.disable_dropout: true (the policy is "
               "scored like its eval-mode reference); set one or the other")


@dataclass(frozen=True)
class RefLogpsConfig:
    batch_size: int = 64
    # Padded tokens per batch: bounds the logits' memory (tokens × vocab) on long sequences.
    max_tokens: int = 32768

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "ref_logps.batch_size", "must be > 0")
        _check(self.max_tokens > 0, "ref_logps.max_tokens", "must be > 0")


@dataclass(frozen=True)
class GenerateConfig:
    n_prompts: int = 200
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 = off. Set explicitly, never taken from a model's generation_config.json.
    top_k: int = 0
    repetition_penalty: float = 1.0
    samples_per_prompt: int = 1
    batch_size: int = 64
    # Tokens per batch, prompts + new tokens of every sample: bounds the KV cache on long prompts.
    max_tokens: int = 65536
    seed: int = 0

    @property
    def unbiased(self) -> bool:
        """Samples drawn from the model's own distribution, so log π/π_ref on them estimates
        KL(π || π_ref) without bias."""
        return self.do_sample and self.temperature == 1.0 and self.top_p == 1.0 \
            and self.top_k == 0 and self.repetition_penalty == 1.0

    def __post_init__(self) -> None:
        _check(self.n_prompts > 0, "generate.n_prompts", "must be > 0")
        _check(self.max_new_tokens > 0, "generate.max_new_tokens", "must be > 0")
        _check(self.temperature >= 0, "generate.temperature", "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "generate.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "generate.top_k", "must be >= 0 (0 = off)")
        _check(self.repetition_penalty > 0, "generate.repetition_penalty", "must be > 0")
        _check(self.samples_per_prompt > 0, "generate.samples_per_prompt", "must be > 0")
        _check(self.do_sample or self.samples_per_prompt == 1, "generate.samples_per_prompt",
               "greedy decoding gives one sample per prompt; set do_sample: true for more")
        _check(not self.do_sample or self.temperature > 0, "generate.temperature",
               "must be > 0 when do_sample is true")
        _check(self.batch_size > 0, "generate.batch_size", "must be > 0")
        _check(self.max_tokens > 0, "generate.max_tokens", "must be > 0")


@dataclass(frozen=True)
class OfflineJudgeConfig:
    """Hashed n-gram linear judges trained on the data's own labels."""

    n_features: int = 262144
    ngram: int = 2
    epochs: int = 8
    # Features are scaled to unit norm per row, so useful weights are large: Adam needs a large
    # step, and the L2 penalty (on the summed squared weights) keeps rare n-grams from
    # memorising labels.
    lr: float = 0.5
    l2: float = 1e-4
    batch_size: int = 256
    seed: int = 0
    # Prompt-word x response-word pair features. Off by default: "harmful request AND
    # compliance" is already linear in separate prompt and response features, and the pairs
    # mostly add noise on small data.
    interactions: bool = False
    # Robustness to gamed or degenerate text (docs/judges.md, "What the offline judges resist").
    # Dense features of the reward (non-words, unseen word-pair shapes, loops, prompt echo) carry
    # over to gibberish that no hashed n-gram covers; the training vocabulary behind them is kept
    # as `vocab_buckets` hashed bits in the weight files.
    dense: bool = True
    vocab_buckets: int = 4194304
    # Adversarial examples derived from the training pairs: this share of the unsafe responses
    # also appears padded with a refusal (before, after) and with a safe response, still unsafe;
    # this share of the pairs gains a degraded response (random letters, shuffled, cut off,
    # looping, empty, parroted prompt) that both real responses and a refusal beat in the
    # reward data. 0 turns either off.
    augment_unsafe: float = 1.0
    augment_degraded: float = 0.5

    def __post_init__(self) -> None:
        _check(self.n_features >= 1024, "judge.offline.n_features", "must be >= 1024")
        _check(1 <= self.ngram <= 3, "judge.offline.ngram", "must be 1, 2 or 3")
        _check(self.epochs > 0, "judge.offline.epochs", "must be > 0")
        _check(self.lr > 0, "judge.offline.lr", "must be > 0")
        _check(self.l2 >= 0, "judge.offline.l2", "must be >= 0")
        _check(self.batch_size > 0, "judge.offline.batch_size", "must be > 0")
        _check(self.vocab_buckets >= 1024 and self.vocab_buckets % 8 == 0,
               "judge.offline.vocab_buckets", "must be >= 1024 and a multiple of 8")
        for key in ("augment_unsafe", "augment_degraded"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"judge.offline.{key}",
                   "must be between 0 and 1")


@dataclass(frozen=True)
class GuardConfig:
    """A generative safety classifier (a Llama-Guard-style causal LM) as the cost judge."""

    model: str | None = None
    revision: str | None = None
    # llama_guard (the guard's Llama Guard chat template, else Llama Guard 3's prompt, both up
    # to where the answer starts; pipeline/guard.py) | chat (the tokenizer's chat template on a
    # user and an assistant turn, as it is) | a format string with {prompt} and {response}.
    template: str = "llama_guard"
    # What the guard writes before its answer; with `chat`, Llama Guard 3 starts with a blank
    # line ("\n\n").
    answer_prefix: str = ""
    safe_answer: str = "safe"
    unsafe_answer: str = "unsafe"
    max_length: int = 1024
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        _check(self.model is None or bool(self.model.strip()), "judge.guard.model",
               "must be a local directory, a hub id or null")
        _check(self.template in ("llama_guard", "chat")
               or (self.template.count("{prompt}") == 1 and self.template.count("{response}") == 1),
               "judge.guard.template",
               "must be llama_guard, chat or a format string with one {prompt} and one {response}")
        _check(bool(self.safe_answer.strip()), "judge.guard.safe_answer", "must not be empty")
        _check(bool(self.unsafe_answer.strip()), "judge.guard.unsafe_answer", "must not be empty")
        _check(self.safe_answer != self.unsafe_answer, "judge.guard.unsafe_answer",
               "must differ from judge.guard.safe_answer")
        _check(self.max_length >= 16, "judge.guard.max_length", "must be >= 16")
        _check(self.max_new_tokens > 0, "judge.guard.max_new_tokens", "must be > 0")


#: The judge kinds, each declared in `pipeline.judge_kinds.JUDGE_KINDS` (how it is built and
#: loaded); named here so that params are validated without importing the judges (an edit to
#: a judge must not rerun every stage). tests/test_judges.py checks the two agree.
JudgeKindName = Literal["offline", "hub", "guard"]


@dataclass(frozen=True)
class JudgeConfig:
    kind: JudgeKindName = "offline"
    # Hub score models (e.g. PKU-Alignment/beaver-7b-v1.0-reward / -cost) or local directories.
    # kind guard: the reward comes from `reward_model` if set, else from the offline reward model.
    reward_model: str | None = None
    cost_model: str | None = None
    layout: Literal["auto", "sequence_classification", "beaver_score"] = "auto"
    batch_size: int = 16
    # Hub models: tokens per (prompt, response) text. Hub models and guards: how many test pairs
    # (a seeded sample) measure their accuracy in the judge stage; a 7B model on all is slow.
    max_length: int = 1024
    eval_pairs: int = 500
    offline: OfflineJudgeConfig = field(default_factory=OfflineJudgeConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if self.kind == "hub":
            _check(bool(self.reward_model) and bool(self.cost_model), "judge.reward_model",
                   "judge.kind: hub needs both judge.reward_model and judge.cost_model")
        if self.kind == "guard":
            _check(self.guard.model is not None, "judge.guard.model",
                   "judge.kind: guard needs judge.guard.model (a local directory or a hub id)")
            # A cost model the guard would silently replace is a mistake worth stopping for.
            _check(self.cost_model is None, "judge.cost_model",
                   "judge.kind: guard takes its cost from judge.guard.model; set it to null")
        _check(self.batch_size > 0, "judge.batch_size", "must be > 0")
        _check(self.max_length >= 16, "judge.max_length", "must be >= 16")
        _check(self.eval_pairs > 0, "judge.eval_pairs", "must be > 0")


@dataclass(frozen=True)
class SuiteConfig:
    """One held-out prompt suite (pipeline/suites.py): generated and scored beside the test
    pairs' prompts."""

    name: str = ""                 # metric keys: suite_<name>_...; "test" is the test pairs'
    # builtin:redteam | builtin:overrefusal | builtin:harmbench | builtin:strongreject | a local
    # file | a hub id
    source: str = ""
    revision: str | None = None    # hub data sets: the commit (required)
    # The split to read: hub data sets (null: test); builtin:harmbench test (null) | val;
    # builtin:strongreject full (null) | small.
    split: str | None = None
    layout: Literal["auto", "generic", "xstest", "harmbench", "advbench", "redteam"] = "auto"
    prompt_column: str | None = None  # overrides the layout's prompt column
    should_refuse: bool | None = None  # label of rows the layout leaves unlabelled
    max_prompts: int | None = None     # a seeded sample of this many prompts
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[a-z0-9_]+", self.name)), "suites[].name",
               f"must be lower-case letters, digits or _ (got {self.name!r})")
        _check(self.name != "test", "suites[].name",
               "'test' is reserved for the test pairs' prompts")
        _check(bool(self.source.strip()), f"suites.{self.name}.source", "must not be empty")
        _check(self.max_prompts is None or self.max_prompts > 0,
               f"suites.{self.name}.max_prompts", "must be > 0 or null")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 64
    max_tokens: int = 32768
    # Every metric carries its count and a 95% interval (pipeline/support.py).
    bootstrap: int = 1000
    seed: int = 0
    min_support: int = 30                      # fewer items: a warning and a flag
    min_judge_balanced_accuracy: float = 0.75  # a weaker judge: a warning and a flag

    def __post_init__(self) -> None:
        _check(self.bootstrap >= 100, "evaluate.bootstrap", "must be >= 100")
        _check(self.min_support >= 1, "evaluate.min_support", "must be >= 1")
        _check(0.0 <= self.min_judge_balanced_accuracy <= 1.0,
               "evaluate.min_judge_balanced_accuracy", "must be in [0, 1]")
        _check(self.batch_size > 0, "evaluate.batch_size", "must be > 0")
        _check(self.max_tokens > 0, "evaluate.max_tokens", "must be > 0")


@dataclass(frozen=True)
class TheoryConfig:
    """The tabular SafeDPO check (pipeline/theory.py)."""

    n_prompts: int = 8
    n_responses: int = 6
    # ~833 comparisons per response pair: the BT sampling error then puts π̂* within TV ≈ 0.011
    # of π* (q99 ≈ 0.017); grouping identical pairs makes the budget free per training step.
    n_pairs: int = 100000
    unsafe_share: float = 0.4
    # Reward added to unsafe responses: unsafe answers tend to be the more helpful ones, which is
    # what makes helpfulness-only DPO unsafe.
    unsafe_bonus: float = 1.0
    deltas: tuple[float, ...] = (0.0, 1.0, 5.0, 10.0)
    steps: int = 4000
    lr: float = 1.0
    beta: float = 1.0
    tolerance: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.n_prompts > 0, "theory.n_prompts", "must be > 0")
        _check(self.n_responses >= 3, "theory.n_responses",
               "must be >= 3 (two safe responses and one unsafe per prompt)")
        n_combos = self.n_prompts * self.n_responses * (self.n_responses - 1) // 2
        _check(self.n_pairs >= n_combos, "theory.n_pairs",
               f"must be >= {n_combos} so that every response pair of every prompt is compared")
        _check(0.0 < self.unsafe_share < 1.0, "theory.unsafe_share", "must be in (0, 1)")
        _check(self.unsafe_bonus >= 0, "theory.unsafe_bonus", "must be >= 0")
        _check(len(self.deltas) > 0 and all(d >= 0 for d in self.deltas), "theory.deltas",
               "must be a non-empty list of values >= 0")
        # Each Δ names a run (curves are keyed by run, step); ascending order is how they plot.
        _check(all(a < b for a, b in zip(self.deltas, self.deltas[1:], strict=False)),
               "theory.deltas", "must be strictly increasing")
        _check(self.steps > 0, "theory.steps", "must be > 0")
        _check(self.lr > 0, "theory.lr", "must be > 0")
        _check(self.beta > 0, "theory.beta", "must be > 0")
        _check(0.0 < self.tolerance < 1.0, "theory.tolerance", "must be in (0, 1)")


@dataclass(frozen=True)
class Params:
    seed: int = 0
    beta: float = 0.1
    delta: float = 10.0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ref_logps: RefLogpsConfig = field(default_factory=RefLogpsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    suites: tuple[SuiteConfig, ...] = (
        SuiteConfig(name="redteam", source="builtin:redteam"),
        SuiteConfig(name="overrefusal", source="builtin:overrefusal"),
        SuiteConfig(name="harmbench", source="builtin:harmbench"),
        SuiteConfig(name="strongreject", source="builtin:strongreject"))
    theory: TheoryConfig = field(default_factory=TheoryConfig)

    def __post_init__(self) -> None:
        _check(self.beta > 0, "beta", "must be > 0")
        _check(self.delta >= 0, "delta", "must be >= 0 (Prop. 4.4 assumes a non-negative margin)")
        names = [s.name for s in self.suites]
        _check(len(names) == len(set(names)), "suites",
               f"suite names must be unique (got {names})")
        if self.model.name == "builtin:tiny":
            longest = max(self.sft.max_length, self.train.max_length)
            _check(self.model.tiny.max_position_embeddings >= longest,
                   "model.tiny.max_position_embeddings",
                   f"must be >= the longest max_length ({longest}) of sft and train")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert the few YAML shapes that differ."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"parameter {key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise UserError(f"parameter {key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"parameter {key}: expected a list, got {type(value).__name__}")
        (elem,) = {a for a in get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        # YAML reads `1e-6` (no dot) as a string; accept it, and ints, as floats.
        if isinstance(value, bool):
            raise UserError(f"parameter {key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"parameter {key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"parameter {key}: must be a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"parameter {key}: expected an integer, got {value!r}")
        # numpy's and torch's generators take seeds in [0, 2**63).
        if key.rsplit(".", 1)[-1].endswith("seed") and not 0 <= value < 2**63:
            raise UserError(f"parameter {key}: a seed must be in [0, 2**63), got {value}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"parameter {key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"parameter {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise UserError(f"unknown parameter(s) {unknown}{where}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate `params.yaml`; every problem is a one-line `UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError("parameter file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"invalid YAML: {str(exc).splitlines()[0]}", path=path) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path=path) \
            from None
    except IsADirectoryError:
        raise UserError("is a directory, not a parameter file", path=path) from None
    if data is None:
        # Running on built-in defaults when the file is empty would hide a lost file.
        raise UserError("is empty; copy the repository's params.yaml and edit it", path=path)
    if not isinstance(data, dict):
        raise UserError("expected a mapping at the top level", path=path)
    try:
        return from_dict(Params, data)
    except UserError as exc:
        raise UserError(str(exc), path=path) from None
