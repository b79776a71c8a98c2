"""CIDEr-D (Vedantam et al. 2015), as in the COCO caption evaluation (pycocoevalcap).

For n = 1..4: each sentence becomes a TF-IDF vector of its n-grams, with document
frequencies counted over the reference sets of the evaluated corpus; the score of a
candidate is the mean over its references of the cosine similarity, with the candidate's
counts clipped by the reference's (the "-D" variant) and a Gaussian penalty on the length
difference (sigma 6); the four n-gram scores are averaged and multiplied by 10.
Sentences are lower-cased and split on whitespace after removing punctuation.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(sentence: str) -> list[str]:
  return _PUNCT.sub(" ", sentence.lower()).split()


def _ngrams(words: list[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _counts(words: list[str], max_n: int) -> list[collections.Counter]:
  return [_ngrams(words, n) for n in range(1, max_n + 1)]


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
  """(corpus CIDEr-D, per-candidate scores); `references[i]` are the captions of item i."""
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets; expected one set each")
  if any(len(r) == 0 for r in references):
    raise ValueError("every candidate needs at least one reference")
  refs_words = [[tokenize(r) for r in refs] for refs in references]
  refs_counts = [[_counts(w, max_n) for w in ws] for ws in refs_words]
  doc_freq = collections.Counter()
  for counts_of_item in refs_counts:
    doc_freq.update(set(g for counts in counts_of_item for c in counts for g in c))
  log_n = math.log(float(len(candidates)))

  def vec(counts):
    out, norms = [], []
    for c in counts:
      v = {g: tf * (log_n - math.log(max(1.0, doc_freq[g]))) for g, tf in c.items()}
      out.append(v)
      norms.append(math.sqrt(sum(x * x for x in v.values())))
    return out, norms

  scores = []
  for cand, r_counts, r_words in zip(candidates, refs_counts, refs_words):
    c_words = tokenize(cand)
    c_vec, c_norm = vec(_counts(c_words, max_n))
    total = [0.0] * max_n
    for rc, rw in zip(r_counts, r_words):
      r_vec, r_norm = vec(rc)
      delta = float(len(c_words) - len(rw))
      for n in range(max_n):
        dot = sum(min(val, r_vec[n][g]) * r_vec[n][g] for g, val in c_vec[n].items() if g in r_vec[n])
        if c_norm[n] != 0 and r_norm[n] != 0:
          dot /= c_norm[n] * r_norm[n]
        total[n] += dot * math.exp(-(delta ** 2) / (2 * sigma ** 2))
    score = sum(t / len(r_counts) for t in total) / max_n * 10.0
    scores.append(score)
  return (sum(scores) / len(scores) if scores else 0.0), scores
