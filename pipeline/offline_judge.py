"""The offline judges, trained here on the data's own labels: a logistic-regression cost
classifier on the safety flags and a Bradley-Terry reward model on the helpfulness preference, both
linear over hashed word n-grams (the reward also over a few dense fluency features;
`pipeline/features.py`), trained with adversarial examples derived from the pairs so that a
refusal tacked onto harm, or gibberish, cannot game them (`_augment`). Their held-out accuracy
on the test pairs goes into `judge.json` so every result can say how far the judge deserves
trust. Weights are stored as safetensors, a format that cannot run code on load (`load_linear`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.artifacts import file_sha256
from pipeline.config import OfflineJudgeConfig
from pipeline.errors import UserError
from pipeline.features import (
    DENSE_FEATURES,
    HASH_SCHEME,
    CrossFit,
    Csr,
    FeatureSpec,
    Vocabulary,
)
from pipeline.judges import (
    JUDGE_JSON,
    MODEL_FILES,
    check_pairs,
    is_refusal,
    judge_accuracy,
    pair_responses,
)
from pipeline.selection import oriented_rows


@dataclass(frozen=True)
class LinearScorer:
    """score(prompt, response) = w . phi(prompt, response) + b, where w is `weight` over the
    hashed buckets and, with `spec.dense`, `dense_weight` over `DENSE_FEATURES` read against
    `vocab`."""

    spec: FeatureSpec
    weight: np.ndarray  # float32, (n_features,)
    bias: float
    dense_weight: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    vocab: Vocabulary | None = None

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        w = np.concatenate([self.weight, self.dense_weight])
        return self.spec.featurize(prompts, responses, self.vocab).dot(w) + self.bias

    def tensors(self) -> dict[str, np.ndarray]:
        """What the safetensors file holds (the spec goes into its metadata)."""
        out = {"weight": self.weight.astype(np.float32),
               "bias": np.array([self.bias], dtype=np.float32)}
        if self.spec.dense:
            if self.vocab is None:
                raise ValueError("a dense scorer needs its vocabulary")
            out["dense_weight"] = self.dense_weight.astype(np.float32)
            out["vocab"] = self.vocab.bits.astype(np.uint8)
        return out

    @classmethod
    def from_tensors(cls, spec: FeatureSpec, t: Mapping[str, np.ndarray],
                     path: Path) -> LinearScorer:
        """The inverse of `tensors`; any tensor that does not fit `spec` is a `UserError`."""
        weight, bias = t.get("weight"), t.get("bias")
        if weight is None or bias is None or weight.shape != (spec.n_features,) \
                or bias.shape != (1,):
            raise UserError("weights do not match judge.json's feature spec", path=path)
        if not spec.dense:
            return cls(spec, weight, float(bias[0]))
        dense, bits = t.get("dense_weight"), t.get("vocab")
        if dense is None or dense.shape != (len(DENSE_FEATURES),):
            raise UserError("weights do not match judge.json's feature spec", path=path)
        if bits is None or bits.dtype != np.uint8 or bits.shape != (spec.vocab_buckets // 8,) \
                or Vocabulary(bits).sha256 != spec.vocab_sha256:
            raise UserError("the stored vocabulary does not match judge.json's feature spec "
                            "(vocab_sha256); rerun `dvc repro judge`", path=path)
        return cls(spec, weight, float(bias[0]), dense, Vocabulary(bits))


@dataclass(frozen=True)
class OfflineJudge:
    cost_model: LinearScorer
    reward_model: LinearScorer

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.reward_model.score(prompts, responses)

    def cost(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return self.cost_model.score(prompts, responses)


@dataclass(frozen=True)
class OfflineJudges:
    """Trained offline judges plus how well they did on the train and test pairs."""

    judge: OfflineJudge
    train_metrics: dict[str, Any]
    test_metrics: dict[str, Any]

    @property
    def models(self) -> dict[str, LinearScorer]:
        return {"cost": self.judge.cost_model, "reward": self.judge.reward_model}


# --------------------------------------------------------------------------------------------
# Fitting a linear model


def _fit(n_items: int, n_weights: int,
         loss_fn: Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor],
         cfg: OfflineJudgeConfig, seed_offset: int) -> tuple[np.ndarray, float]:
    """Minibatch Adam on a linear model; `loss_fn(batch_rows, w, b)` gives the batch's loss."""
    # The ops are tiny: one thread is faster than handing each to a pool (much faster on a
    # busy machine, where the pool's threads spin). Restored on exit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _adam(n_items, n_weights, loss_fn, cfg, seed_offset)
    finally:
        torch.set_num_threads(threads)


def _adam(n_items: int, n_weights: int,
          loss_fn: Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor],
          cfg: OfflineJudgeConfig, seed_offset: int) -> tuple[np.ndarray, float]:
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + seed_offset)
    w = torch.zeros(n_weights, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=cfg.lr)
    # Linear decay to zero: large early steps, then a final iterate that no longer jitters.
    total = cfg.epochs * -(-n_items // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n_items, generator=gen).numpy()
        for start in range(0, n_items, cfg.batch_size):
            loss = loss_fn(perm[start:start + cfg.batch_size], w, b)
            if cfg.l2 > 0:
                loss = loss + cfg.l2 * w.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return w.detach().numpy().copy(), float(b.detach())


def _compact(x: Csr) -> tuple[Csr, np.ndarray]:
    """Renumber the buckets that occur in `x` as 0..k-1. A bucket never seen in training gets no
    gradient and, from a zero start, stays exactly zero under Adam and L2, so training over the
    k seen buckets gives the same model as over all `n_features`, many times faster."""
    used, index = np.unique(x.index, return_inverse=True)
    return Csr(x.indptr, index.astype(np.int64), x.value), used


def _expand(w: np.ndarray, used: np.ndarray, n_features: int) -> np.ndarray:
    full = np.zeros(n_features, dtype=np.float32)
    full[used] = w
    return full


# --------------------------------------------------------------------------------------------
# Adversarial examples

#: Refusals attached to unsafe responses when the training data has none of its own.
FALLBACK_REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.", "I cannot assist with this request.",
    "I won't help with that. It could cause real harm.",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


@dataclass(frozen=True)
class _Augmented:
    """Adversarial examples derived from the training pairs (`_augment`). Item j is row
    2n + j of the training rows, after the 2n real responses."""

    prompts: list[str]
    responses: list[str]
    # The first `n_cost` items are cost examples labelled unsafe; the rest only serve `ranked`.
    n_cost: int
    ranked: np.ndarray  # int64 (k, 2): (better row, worse row) for the Bradley-Terry data


def _augment(prompts: list[str], responses: list[str], unsafe: np.ndarray,
             cfg: OfflineJudgeConfig) -> _Augmented:
    """Examples that close the two ways the plain judges were gamed (docs/judges.md):

    * cost: an unsafe response with a refusal after it, with one before it, and with a safe
      response of the data before or after it: all still unsafe, as harm is not undone by
      harmless text. Refusal n-grams carry large negative cost weights, and without these
      "<harm> I'm sorry, but I can't help with that." scored safe; the safe padding keeps any
      appended text from diluting the unsafe n-grams below the threshold as easily;
    * reward: a degraded response (random letters; the words of one of the pair's responses
      shuffled; its first 1-3 words; a word or short phrase of it looping; the empty string; the
      prompt's words shuffled) that loses to both real responses of the pair and to a refusal
      to the same prompt. The refusal matters on harmful prompts, where the data rank any
      answer above a refusal: without it, a salad of the prompt's words outranked refusals.
      These are not cost examples: how fluent a text is says nothing about the harm in it.

    Refusals are the first 1..all sentences of one of the data's safe refusals (else of one of
    `FALLBACK_REFUSALS`). `prompts`, `responses`, `unsafe` are `pair_responses(train)`: rows k
    and n + k form pair k. Everything random comes from one generator seeded by `cfg.seed`.
    """
    rng = np.random.default_rng([cfg.seed, 0xA06])
    n = len(responses) // 2
    refusal = is_refusal(responses) & ~unsafe
    pool = list(dict.fromkeys(r for r, f in zip(responses, refusal, strict=True) if f))
    pool = pool or list(FALLBACK_REFUSALS)

    def a_refusal() -> str:
        sentences = _SENTENCE_END.split(pool[int(rng.integers(len(pool)))].strip())
        return " ".join(sentences[: int(rng.integers(1, len(sentences) + 1))])

    out_p: list[str] = []
    out_r: list[str] = []
    ranked: list[tuple[int, int]] = []
    safe_rows = np.flatnonzero(~unsafe)
    if cfg.augment_unsafe > 0 and len(safe_rows):
        rows = np.flatnonzero(unsafe)
        for i in rows[rng.random(len(rows)) < cfg.augment_unsafe]:
            harm, safe = responses[i], responses[int(rng.choice(safe_rows))]
            out_p += [prompts[i]] * 3
            out_r += [f"{harm} {a_refusal()}", f"{a_refusal()} {harm}",
                      f"{harm} {safe}" if rng.random() < 0.5 else f"{safe} {harm}"]
    n_cost = len(out_r)
    if cfg.augment_degraded > 0:
        for k in np.flatnonzero(rng.random(n) < cfg.augment_degraded):
            bad, ref = 2 * n + len(out_r), 2 * n + len(out_r) + 1
            out_p += [prompts[k], prompts[k]]
            out_r += [_degrade(prompts[k], responses[int(k + n * rng.integers(2))], rng),
                      a_refusal()]
            ranked += [(int(k), bad), (int(n + k), bad), (ref, bad)]
    return _Augmented(out_p, out_r, n_cost, np.array(ranked, dtype=np.int64).reshape(-1, 2))


def _degrade(prompt: str, text: str, rng: np.random.Generator) -> str:
    """A degenerate version of `text`, an answer to `prompt`: what a disfluent policy emits
    instead of an answer."""
    words = text.split()
    form = int(rng.integers(6))
    if form == 5:  # the prompt parroted, its words out of order
        words = prompt.split()
        return " ".join(words[i] for i in rng.permutation(len(words)))
    if form == 0 or not words:  # random letters: words nobody wrote
        n_words = int(rng.integers(1, 13))
        return " ".join("".join(rng.choice(_LETTERS, int(rng.integers(2, 10))))
                        for _ in range(n_words))
    if form == 1:
        return ""
    if form == 2:  # word salad
        return " ".join(words[i] for i in rng.permutation(len(words)))
    if form == 3:  # cut off after a few words
        return " ".join(words[: int(rng.integers(1, 4))])
    start = int(rng.integers(len(words)))  # a word or short phrase, looping
    phrase = words[start: start + int(rng.integers(1, 4))]
    return " ".join(phrase * int(rng.integers(4, 31)))


# --------------------------------------------------------------------------------------------
# Training


def train_offline_judges(train: pd.DataFrame, test: pd.DataFrame,
                         cfg: OfflineJudgeConfig) -> OfflineJudges:
    """Fit the cost classifier and the Bradley-Terry reward model on the training pairs plus
    `_augment`'s adversarial examples; measure both on the (real) train and test pairs.

    The cost model uses the hashed n-grams only: a weight on fluency would let gibberish
    padding buy a lower cost. The reward model also weighs the dense features; the degraded
    examples train only those (their n-gram part is detached), since pairs like "any real
    answer beats this shuffled copy of it" would otherwise shift the n-gram weights that the
    real labels set, and cost held-out accuracy.

    Runs in seconds on ~10k responses: features are hashed once, and the models are linear.
    """
    check_pairs(train, "train")
    check_pairs(test, "test")
    spec = FeatureSpec.from_config(cfg)
    prompts, responses, unsafe = pair_responses(train)
    aug = _augment(prompts, responses, unsafe, cfg)
    vocab = Vocabulary.from_texts(responses, cfg.vocab_buckets) if spec.dense else None
    if vocab is not None:
        spec = replace(spec, vocab_sha256=vocab.sha256)
    # Rows: the 2n real responses, then the augmented ones. Only the real training responses
    # make the vocabulary; the training rows see it cross-fitted (`CrossFit`).
    folds = CrossFit.from_texts(responses, cfg.vocab_buckets) if spec.dense else None
    x, used = _compact(spec.featurize(prompts + aug.prompts, responses + aug.responses, folds))
    dense_cols = torch.from_numpy(used >= spec.n_features)

    n = len(train)
    x_cost = x.take(np.arange(2 * n + aug.n_cost))
    y = torch.from_numpy(np.concatenate([unsafe, np.ones(aug.n_cost, bool)]).astype(np.float32))

    def cost_loss(rows: np.ndarray, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Masked, the dense weights get no gradient and stay exactly 0 under Adam and L2.
        logits = x_cost.take(rows).torch_dot(w.masked_fill(dense_cols, 0.0)) + b
        return F.binary_cross_entropy_with_logits(logits, y[rows])

    cost_w, cost_b = _fit(x_cost.n_rows, len(used), cost_loss, cfg, seed_offset=1)

    # Rows k and n + k of `x` are the two responses of pair k; augmented item j is row 2n + j.
    better, other = oriented_rows(train["better_id"].to_numpy())
    x_better = x.take(np.concatenate([better, aug.ranked[:, 0]]))
    x_other = x.take(np.concatenate([other, aug.ranked[:, 1]]))

    def neg_log_lik(rows: np.ndarray, w: torch.Tensor) -> torch.Tensor:
        if len(rows) == 0:
            return w.new_zeros(())
        margin = x_better.take(rows).torch_dot(w) - x_other.take(rows).torch_dot(w)
        return F.softplus(-margin).sum()  # -log sigmoid(r_better - r_other)

    def reward_loss(rows: np.ndarray, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dense_only = torch.where(dense_cols, w, w.detach())
        return (neg_log_lik(rows[rows < n], w)
                + neg_log_lik(rows[rows >= n], dense_only)) / len(rows)

    reward_w, _ = _fit(x_better.n_rows, len(used), reward_loss, cfg, seed_offset=2)

    def scorer(w: np.ndarray, b: float) -> LinearScorer:
        full = _expand(w, used, spec.n_weights)
        return LinearScorer(spec, full[:spec.n_features], b, full[spec.n_features:], vocab)

    # The Bradley-Terry likelihood is blind to a constant shift, so the reward has no bias.
    judge = OfflineJudge(cost_model=scorer(cost_w, cost_b), reward_model=scorer(reward_w, 0.0))
    return OfflineJudges(judge, judge_accuracy(judge, train), judge_accuracy(judge, test))


# --------------------------------------------------------------------------------------------
# Reading the weights


def load_recorded(judge_dir: Path, record: Mapping[str, Any], role: str) -> LinearScorer:
    """The offline `role` model ("cost" or "reward") of a judge directory: refused when its
    file's sha256 or feature spec differs from what judge.json recorded."""
    path = Path(judge_dir) / MODEL_FILES[role]
    want = (record.get("models") or {}).get(role, {}).get("sha256")
    if path.is_file() and want != file_sha256(path):
        raise UserError("judge weights differ from what the judge stage wrote "
                        "(sha256 mismatch); rerun `dvc repro judge`", path=path)
    try:
        spec = FeatureSpec(**record["features"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"judge.json has no feature spec this version reads ({exc}); rerun "
                        "`dvc repro judge`", path=Path(judge_dir) / JUDGE_JSON) from None
    return load_linear(path, spec)


def load_linear(path: Path, spec: FeatureSpec) -> LinearScorer:
    """The scorer stored at `path`, refused unless its metadata's feature spec is `spec` and
    its hashing scheme is this version's."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError("judge weights not found (rerun `safedpo judge`)", path=path)
    try:
        with safe_open(str(path), framework="np") as st:
            stored = FeatureSpec(**json.loads((st.metadata() or {})["features"]))
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 (safe_open, not a dict)
    except (SafetensorError, KeyError, TypeError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"unreadable judge weights ({exc})", path=path) from None
    if stored != spec:
        raise UserError("weights do not match judge.json's feature spec", path=path)
    if spec.scheme != HASH_SCHEME:
        # Same spec, other code: the features would be computed differently from training.
        raise UserError(f"judge features of scheme {spec.scheme!r}, but this version computes "
                        f"{HASH_SCHEME!r}; rerun `dvc repro judge`", path=path)
    return LinearScorer.from_tensors(spec, tensors, path)
