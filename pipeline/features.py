"""Text features of the offline judges (`pipeline/offline_judge.py`): hashed word n-grams, rows in
CSR form, and dense fluency features read against the training responses' vocabulary.

A (prompt, response) becomes its prompt n-grams, its response n-grams and, optionally, prompt-word
x response-word pairs, each hashed (crc32 words, splitmix64 mixing: stable from run to run) into
one of `n_features` buckets with a hashed sign; with `dense`, the `DENSE_FEATURES` follow.
`FeatureSpec` says how and is stored with the weights; `HASH_SCHEME` names this code's version.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.config import OfflineJudgeConfig

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_U64 = np.uint64
_P = _U64(0x9E3779B97F4A7C15)
# One seed per namespace so that the same n-gram in the prompt and in the response (or a
# prompt x response word pair, or a vocabulary entry) lands in different buckets.
_NS = {"p": _U64(0x5EED0001), "r": _U64(0x5EED0002), "x": _U64(0x5EED0003),
       "c": _U64(0x5EED0004), "s": _U64(0x5EED0005), "f": _U64(0x5EED0006)}
# v2: rows are L2-normalised counts. v1 scaled by 1/sqrt(n-gram count), which lets a repeated
# n-gram's value grow as sqrt(repeats): "the" x 30 outscored every real answer.
HASH_SCHEME = "crc32-words+splitmix64-v2"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads crc32 word ids over 64 bits (uint64 arithmetic wraps)."""
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> _U64(33))


def _segment_arange(lengths: np.ndarray) -> np.ndarray:
    """Concatenated 0..len-1 for each length."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


@dataclass(frozen=True)
class Csr:
    """A sparse row matrix: row i holds `index[indptr[i]:indptr[i+1]]` with `value`s."""

    indptr: np.ndarray  # int64, n_rows + 1
    index: np.ndarray  # int64 bucket ids
    value: np.ndarray  # float32

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def take(self, rows: np.ndarray) -> Csr:
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        pos = np.repeat(self.indptr[rows], lengths) + _segment_arange(lengths)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return Csr(indptr, self.index[pos], self.value[pos])

    @staticmethod
    def hstack(blocks: Sequence[Csr]) -> Csr:
        """Row-wise concatenation: row i of the result holds row i of every block."""
        lens = np.stack([b.lengths for b in blocks])
        total = lens.sum(axis=0)
        indptr = np.concatenate([[0], np.cumsum(total)]).astype(np.int64)
        index = np.empty(int(total.sum()), dtype=np.int64)
        value = np.empty(int(total.sum()), dtype=np.float32)
        before = indptr[:-1].copy()
        for b, lb in zip(blocks, lens, strict=True):
            dest = np.repeat(before, lb) + _segment_arange(lb)
            index[dest] = b.index
            value[dest] = b.value
            before += lb
        return Csr(indptr, index, value)

    def dot(self, weight: np.ndarray) -> np.ndarray:
        rows = np.repeat(np.arange(self.n_rows), self.lengths)
        contrib = weight[self.index].astype(np.float64) * self.value
        return np.bincount(rows, weights=contrib, minlength=self.n_rows)

    def torch_dot(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable row sums of `weight[index] * value` (EmbeddingBag, fast on CPU)."""
        return F.embedding_bag(
            torch.from_numpy(self.index), weight.unsqueeze(1),
            offsets=torch.from_numpy(self.indptr[:-1]), mode="sum",
            per_sample_weights=torch.from_numpy(self.value),
        ).squeeze(1)


#: Dense features of `FeatureSpec.dense`, per (prompt, response), after the hashed buckets. A
#: bucket no training text filled has weight zero, so hashed n-grams say nothing about gibberish;
#: these carry over to any text, yet stay near 0 on real text the judge never saw (unlike the
#: share of unseen words or word pairs, which new but fluent answers have plenty of, or length,
#: which would punish concise answers):
#: - nonwords: share of the response's words most of whose letter trigrams (with the word's
#:   edges) no training response has: random letters, keyboard mash;
#: - unseen_shapes: share of its adjacent token pairs, as "shapes" (a word kept if among the
#:   training responses' `FREQUENT_WORDS`, else one placeholder; punctuation kept; the text's
#:   start and end marked), that no training response has: word salad, text cut off mid-way,
#:   the empty text;
#: - repeated_bigrams: share of its word pairs that repeat an earlier one: loops;
#: - echo: share of its words that occur in the prompt. Real answers restate part of the task
#:   (0.1-0.6 on the toy data); a parroted prompt scores 1;
#: - parroting: echo ** 4, so that a linear model can punish near-total echo without punishing
#:   the partial restatement of real answers (0.5 -> 0.06, 0.9 -> 0.66).
#: Changing any of these or the constants below changes the features: bump `HASH_SCHEME`.
DENSE_FEATURES: tuple[str, ...] = ("nonwords", "unseen_shapes", "repeated_bigrams", "echo",
                                   "parroting")
NONWORD_UNSEEN = 0.5
FREQUENT_WORDS = 30
#: Folds of the cross-fitted training vocabulary (`CrossFit`).
VOCAB_FOLDS = 5
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[.,!?;:]")
# Shape ids outside crc32's range: any infrequent word, text start, text end.
_SHAPE_OTHER, _SHAPE_START, _SHAPE_END = _U64(1 << 32), _U64((1 << 32) + 1), _U64((1 << 32) + 2)


@dataclass(frozen=True)
class _Words:
    """The tokens of some texts. `tokens` are the distinct words and punctuation marks, `ids`
    their crc32; per text, `seq` holds all its tokens and `occ` only its words (positions into
    `tokens`); (`char_word`, `char_hash`) are the letter trigrams of every distinct word."""

    tokens: list[str]
    ids: np.ndarray  # uint64
    punct: np.ndarray  # bool
    seq: Csr
    occ: Csr
    char_word: np.ndarray  # int64
    char_hash: np.ndarray  # uint64

    @classmethod
    def of(cls, texts: Sequence[str]) -> _Words:
        pos: dict[str, int] = {}
        seqs = [[pos.setdefault(w, len(pos))
                 for w in _TOKEN.findall(str(t).lower().replace("\u2019", "'"))] for t in texts]
        tokens = list(pos)
        punct = np.array([not w[0].isalnum() for w in tokens], dtype=bool)
        occs = [[i for i in seq if not punct[i]] for seq in seqs]
        ids = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in tokens), dtype=np.uint64,
                          count=len(tokens))
        char_word, char_crc = [], []
        for i, w in enumerate(tokens):
            edged = f"<{w}>"
            for j in range(0 if punct[i] else len(edged) - 2):
                char_word.append(i)
                char_crc.append(zlib.crc32(edged[j:j + 3].encode("utf-8")))
        return cls(tokens, ids, punct, _lists_to_csr(seqs), _lists_to_csr(occs),
                   np.array(char_word, dtype=np.int64),
                   _mix(np.array(char_crc, dtype=np.uint64) ^ _NS["c"]))

    def subset(self, rows: np.ndarray) -> _Words:
        return replace(self, seq=self.seq.take(rows), occ=self.occ.take(rows))

    def frequent_words(self, k: int) -> np.ndarray:
        """Flags of the `k` most frequent words of the texts (ties by spelling: order-free)."""
        counts = np.bincount(self.occ.index, minlength=len(self.tokens))
        words = np.flatnonzero(~self.punct & (counts > 0))
        top = sorted(words.tolist(), key=lambda i: (-counts[i], self.tokens[i]))[:k]
        flags = np.zeros(len(self.tokens), dtype=bool)
        flags[top] = True
        return flags

    def shape_bigrams(self, frequent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(text row, hash) of every adjacent pair of token shapes, start and end included;
        `frequent` flags the distinct words that keep their identity."""
        n, lengths = self.seq.n_rows, self.seq.lengths
        shape = np.where(frequent | self.punct, self.ids, _SHAPE_OTHER)[self.seq.index]
        seq = np.empty(len(shape) + 2 * n, dtype=np.uint64)
        starts = self.seq.indptr[:-1] + 2 * np.arange(n)
        ends = starts + lengths + 1
        inner = np.ones(len(seq), dtype=bool)
        inner[starts] = inner[ends] = False
        seq[starts], seq[ends], seq[inner] = _SHAPE_START, _SHAPE_END, shape
        left = np.ones(len(seq), dtype=bool)
        left[ends] = False  # a pair never spans two texts
        at = np.flatnonzero(left)
        rows = np.repeat(np.arange(n), lengths + 1)
        return rows, _mix(_mix(seq[at] ^ _NS["s"]) * _P + seq[at + 1])


@dataclass(frozen=True)
class Vocabulary:
    """What the dense features compare a response with: the letter trigrams, word-pair shapes
    and frequent words of the training responses, one bit per hashed bucket (packed uint8, in
    `np.packbits` order). Stored beside the weights as a plain tensor: no strings, no pickle."""

    bits: np.ndarray

    @property
    def buckets(self) -> int:
        return 8 * len(self.bits)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.bits, dtype=np.uint8).tobytes()).hexdigest()

    @classmethod
    def from_texts(cls, texts: Sequence[str], buckets: int) -> Vocabulary:
        return cls.from_words(_Words.of(list(dict.fromkeys(texts))), buckets)

    @classmethod
    def from_words(cls, table: _Words, buckets: int) -> Vocabulary:
        """The vocabulary of `table`'s texts (its distinct tokens may include others')."""
        present = np.zeros(len(table.tokens), dtype=bool)
        present[table.occ.index] = True
        frequent = table.frequent_words(FREQUENT_WORDS)
        flags = np.zeros(buckets, dtype=bool)
        for hashes in (_mix(table.ids[frequent] ^ _NS["f"]),
                       table.char_hash[present[table.char_word]],
                       table.shape_bigrams(frequent)[1]):
            flags[_buckets_of(hashes, buckets)] = True
        return cls(np.packbits(flags))

    def has(self, hashes: np.ndarray) -> np.ndarray:
        keys = _buckets_of(hashes, self.buckets)
        return ((self.bits[keys >> 3] >> (7 - (keys & 7)).astype(np.uint8)) & 1).astype(bool)


@dataclass(frozen=True)
class CrossFit:
    """The training-time stand-in for `Vocabulary`: a training response (its fold by text hash)
    is compared with the vocabulary of the other folds' responses. Against the full vocabulary
    every training response would be fully covered, the dense features 0 on all real text, and
    their weights learnt from the augmented gibberish alone; cross-fitting shows the model how
    much novelty real, unseen text has."""

    folds: tuple[Vocabulary, ...]

    @classmethod
    def from_texts(cls, texts: Sequence[str], buckets: int) -> CrossFit:
        uniq = list(dict.fromkeys(texts))
        table, fold = _Words.of(uniq), _folds(uniq)
        return cls(tuple(Vocabulary.from_words(table.subset(np.flatnonzero(fold != k)), buckets)
                         for k in range(VOCAB_FOLDS)))


def _folds(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((zlib.crc32(str(t).encode("utf-8")) % VOCAB_FOLDS for t in texts),
                       dtype=np.int64, count=len(texts))


def _buckets_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    return (hashes % _U64(buckets)).astype(np.int64)


def _dense_values(table: _Words, vocab: Vocabulary) -> np.ndarray:
    """The first three `DENSE_FEATURES` of each text of `table` against `vocab`, (n, 3)."""
    n, occ = table.occ.n_rows, table.occ
    doc = np.repeat(np.arange(n), occ.lengths)
    n_words = occ.lengths.astype(np.float64)
    # A distinct word is a non-word when most of its letter trigrams are unseen.
    n_tok = len(table.tokens)
    unseen = np.bincount(table.char_word, weights=~vocab.has(table.char_hash), minlength=n_tok)
    total = np.bincount(table.char_word, minlength=n_tok)
    nonword = unseen > NONWORD_UNSEEN * total
    nonwords = np.bincount(doc, weights=nonword[occ.index], minlength=n) / np.maximum(n_words, 1)
    rows, shapes = table.shape_bigrams(vocab.has(_mix(table.ids ^ _NS["f"])))
    unseen_shapes = (np.bincount(rows, weights=~vocab.has(shapes), minlength=n)
                     / np.bincount(rows, minlength=n))  # >= 1 pair each: start, end
    # Word pairs that repeat: distinct pairs per text by sorting (text, pair hash).
    ids = table.ids[occ.index]
    at = (np.flatnonzero(doc[1:] == doc[:-1]) if len(doc) >= 2
          else np.empty(0, dtype=np.int64))
    pr, ph = doc[at], _mix(ids[at] * _P + ids[at + 1])
    order = np.lexsort((ph, pr))
    pr, ph = pr[order], ph[order]
    new = np.ones(len(pr), dtype=bool)
    new[1:] = (pr[1:] != pr[:-1]) | (ph[1:] != ph[:-1])
    n_pairs = np.maximum(n_words - 1, 0)
    repeated = np.where(n_pairs > 0, 1.0 - np.bincount(pr, weights=new, minlength=n)
                        / np.maximum(n_pairs, 1), 0.0)
    return np.stack([nonwords, unseen_shapes, repeated], axis=1).astype(np.float32)


def _dense(texts: Sequence[str], vocab: Vocabulary | CrossFit) -> np.ndarray:
    """The vocabulary's dense features (the first three) of each text."""
    table = _Words.of(texts)
    if isinstance(vocab, Vocabulary):
        return _dense_values(table, vocab)
    out = np.empty((len(texts), 3), dtype=np.float32)
    fold = _folds(texts)
    for k, v in enumerate(vocab.folds):
        rows = np.flatnonzero(fold == k)
        out[rows] = _dense_values(table.subset(rows), v)
    return out


def _dense_rows(p_codes: np.ndarray, p_words: Csr, r_codes: np.ndarray, r_words: Csr,
                r_texts: list[str], vocab: Vocabulary | CrossFit | None) -> np.ndarray:
    """`DENSE_FEATURES` per row, given the rows' unique prompts / responses (codes into their
    word lists, as in `FeatureSpec.featurize`)."""
    if vocab is None:
        raise ValueError("dense features need the training vocabulary")
    per_response = _dense(r_texts, vocab)
    # Echo is per (prompt, response): is each response word among the prompt's words?
    pairs, row_pair = np.unique(np.stack([p_codes, r_codes], axis=1), axis=0, return_inverse=True)
    prompt_keys = np.unique(np.repeat(np.arange(p_words.n_rows), p_words.lengths) * (1 << 32)
                            + p_words.index)
    lengths = r_words.lengths[pairs[:, 1]]
    occ = r_words.take(pairs[:, 1]).index
    hit = np.isin(np.repeat(pairs[:, 0], lengths) * (1 << 32) + occ, prompt_keys)
    pair_of = np.repeat(np.arange(len(pairs)), lengths)
    echo = (np.bincount(pair_of, weights=hit, minlength=len(pairs)) / np.maximum(lengths, 1))
    out = np.concatenate([per_response[pairs[:, 1]], echo[:, None], echo[:, None] ** 4], axis=1)
    return out[row_pair.ravel()].astype(np.float32)


@dataclass(frozen=True)
class FeatureSpec:
    """How text becomes features. Stored with the weights: a mismatch must fail, not mis-score.
    `vocab_sha256` ties the spec to the stored vocabulary that the dense features read."""

    n_features: int
    ngram: int
    interactions: bool
    max_interaction_words: int = 16
    scheme: str = HASH_SCHEME
    dense: bool = False
    vocab_buckets: int = 0
    vocab_sha256: str = ""

    @classmethod
    def from_config(cls, cfg: OfflineJudgeConfig) -> FeatureSpec:
        return cls(n_features=cfg.n_features, ngram=cfg.ngram, interactions=cfg.interactions,
                   dense=cfg.dense, vocab_buckets=cfg.vocab_buckets if cfg.dense else 0)

    @property
    def n_weights(self) -> int:
        return self.n_features + (len(DENSE_FEATURES) if self.dense else 0)

    def featurize(self, prompts: Sequence[str], responses: Sequence[str],
                  vocab: Vocabulary | CrossFit | None = None) -> Csr:
        """One row per (prompt, response): prompt n-grams, response n-grams, prompt-word x
        response-word pairs (which let a linear model see "harmful request AND compliance"),
        and with `dense` the `DENSE_FEATURES` against `vocab` (columns n_features + j)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        # Unique texts are featurised once: every prompt appears twice, once per response.
        p_codes, p_uniq = pd.factorize(pd.Series(list(prompts), dtype=object), sort=False)
        r_codes, r_uniq = pd.factorize(pd.Series(list(responses), dtype=object), sort=False)
        p_words, p_first = _tokenize(p_uniq, self.max_interaction_words)
        r_words, r_first = _tokenize(r_uniq, self.max_interaction_words)
        blocks = [self._ngrams(p_words, "p").take(p_codes),
                  self._ngrams(r_words, "r").take(r_codes)]
        if self.interactions:
            blocks.append(self._interactions(p_first.take(p_codes), r_first.take(r_codes)))
        if self.dense:
            blocks.append(self._dense_block(
                _dense_rows(p_codes, p_words, r_codes, r_words, list(r_uniq), vocab)))
        return Csr.hstack(blocks)

    def dense_features(self, prompts: Sequence[str], responses: Sequence[str],
                       vocab: Vocabulary) -> np.ndarray:
        """The `DENSE_FEATURES` of each (prompt, response), (n, len(DENSE_FEATURES)) float32."""
        p_codes, p_uniq = pd.factorize(pd.Series(list(prompts), dtype=object), sort=False)
        r_codes, r_uniq = pd.factorize(pd.Series(list(responses), dtype=object), sort=False)
        return _dense_rows(p_codes, _tokenize(p_uniq, 0)[0], r_codes, _tokenize(r_uniq, 0)[0],
                           list(r_uniq), vocab)

    def _dense_block(self, values: np.ndarray) -> Csr:
        k = values.shape[1]
        return Csr(np.arange(0, k * len(values) + 1, k, dtype=np.int64),
                   np.tile(np.arange(self.n_features, self.n_features + k), len(values)),
                   values.ravel())

    def _ngrams(self, words: Csr, ns: str) -> Csr:
        h = words.index.astype(np.uint64)
        doc = np.repeat(np.arange(words.n_rows), words.lengths)
        rows, hashes = [], []
        for n in range(1, self.ngram + 1):
            ok = (np.flatnonzero(doc[n - 1:] == doc[: len(doc) - n + 1]) if len(doc) >= n
                  else np.empty(0, dtype=np.int64))
            g = h[ok]
            for j in range(1, n):
                g = _mix(g * _P + h[ok + j])
            rows.append(doc[ok])
            hashes.append(_mix(g ^ (_NS[ns] + _U64(n))))
        return self._bucket(np.concatenate(rows), np.concatenate(hashes), words.n_rows)

    def _interactions(self, p: Csr, r: Csr) -> Csr:
        lp, lr = p.lengths, r.lengths
        counts = lp * lr
        e = _segment_arange(counts)
        lr_rep = np.repeat(lr, counts)
        pw = p.index[np.repeat(p.indptr[:-1], counts) + e // np.maximum(lr_rep, 1)]
        rw = r.index[np.repeat(r.indptr[:-1], counts) + e % np.maximum(lr_rep, 1)]
        g = _mix(_mix(pw.astype(np.uint64) ^ _NS["x"]) * _P + rw.astype(np.uint64))
        return self._bucket(np.repeat(np.arange(p.n_rows), counts), g, p.n_rows)

    def _bucket(self, rows: np.ndarray, hashes: np.ndarray, n_rows: int) -> Csr:
        """Signed hashing of each row's n-gram counts, the row scaled to unit L2 norm, so that
        neither a long response nor a loop gets a larger score for its length."""
        order = np.lexsort((hashes, rows))
        rows, hashes = rows[order], hashes[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (hashes[1:] != hashes[:-1])
        tf = np.bincount(np.cumsum(first) - 1).astype(np.float64)
        rows, hashes = rows[first], hashes[first]
        norm = np.sqrt(np.bincount(rows, weights=tf**2, minlength=n_rows))
        sign = np.where((hashes >> _U64(63)) == 1, -1.0, 1.0)
        index = (hashes % _U64(self.n_features)).astype(np.int64)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
        return Csr(indptr.astype(np.int64), index,
                   (sign * tf / np.maximum(norm[rows], 1e-12)).astype(np.float32))


def _tokenize(texts: Sequence[str], k: int) -> tuple[Csr, Csr]:
    """Lower-case word ids (crc32: stable across runs, unlike `hash`) of every text, and its first
    `k` distinct words."""
    ids: dict[str, int] = {}
    seqs: list[list[int]] = []
    firsts: list[list[int]] = []
    for t in texts:
        words = _WORD.findall(str(t).lower().replace("\u2019", "'"))
        for w in words:
            if w not in ids:
                ids[w] = zlib.crc32(w.encode("utf-8"))
        seq = [ids[w] for w in words]
        seqs.append(seq)
        firsts.append(list(dict.fromkeys(seq))[:k])
    return _lists_to_csr(seqs), _lists_to_csr(firsts)


def _lists_to_csr(lists: list[list[int]]) -> Csr:
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Csr(indptr, flat, np.ones(len(flat), dtype=np.float32))
