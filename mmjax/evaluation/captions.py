"""Caption metrics as the COCO caption evaluation computes them: CIDEr-D, BLEU-4, ROUGE-L.

The scores come from `pycocoevalcap` (the `eval` extra: `pip install 'mmjax[eval]'`), the
package COCO's evaluation is published as, whose BLEU, ROUGE-L and CIDEr-D scorers are plain
Python. Its tokenizer is not: `PTBTokenizer` runs Stanford CoreNLP 3.4.1's PTB tokenizer in
Java (lower-casing) and then drops the tokens in `PTB_PUNCTUATION`. `tokenize` here is a
Python tokenizer that follows the same rules for what captions hold:

- lower-cased; curly quotes and apostrophes read as straight ones, dashes as "--", an
  ellipsis as "...";
- quotes, brackets, commas, semicolons, colons, "?" and "!" split from words; "$" and "#"
  split from what follows, "%" from what precedes; a "&" splits lower-case words ("b & w")
  and stays inside capitals ("at&t"); "!!" and "?!" stay tokens;
- a final period splits off unless the word is an abbreviation PTB knows (titles, months,
  days, company words, US states, "etc.", "vs.", ...), an initialism ("u.s.", "p.m."), a
  single letter (not a lower-case one before a capitalised word, or at the end of the
  caption) or "no.", "fig.", "ca.", "prop." before a number;
- clitics split off ("does n't", "ca n't", "man 's", "they 'd 've"), as do "can not",
  "gon na", "wan na", "got ta", "lem me", "gim me", "'t is", "'t was";
- a time or decimal number splits from letters that follow ("12:30 pm", "2.5 x");
- brackets become "-lrb-", "-rrb-", "-lsb-", ... and stay: the Java tokenizer writes them
  "-LRB-" and lower-cases them, so `PTB_PUNCTUATION`'s upper-case entries never remove them.

On the captions of tests/evaluation/test_captions.py (typical captions and each rule above)
the tokens equal those of the Java tokenizer. Where they differ is what PTB's lexer does
beyond those rules: emoticons (":)" is one token ":-rrb-" there, "-rrb-" here), a "'s"
between a word and a hyphen ("dog's-eye"), "y'all" ("y' all" there), other abbreviations
of its lists, and URLs and e-mail addresses with punctuation at their end. And the Java
tokenizer reads a caption's end with the next caption of its batch: a caption ending in a
lower-case letter and a period ("... f g.") keeps "g." there when the next caption starts
lower-case; here, as when it starts with a capital, the period goes.
docs/evaluation.md says what a difference in tokens does to the scores.

mmjax's own CIDEr-D (`cider_d`, pure Python) is tested equal to pycocoevalcap's `Cider` on the
same tokens; it scores where pycocoevalcap is not installed (the demo's minimal install).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import io
import math
import re
from collections.abc import Sequence

# pycocoevalcap's list: tokens equal to one of these are removed after tokenisation.
PTB_PUNCTUATION = frozenset(("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"))

# Abbreviations whose period the PTB lexer keeps (measured on stanford-corenlp 3.4.1, lower-case).
_ABBREVIATIONS = frozenset("""
    mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl pvt mt
    capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mme mlle
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    inc co cos corp pty ltd plc bancorp dept bhd assn univ intl sys invt elec natl mfg mtg jr sr bros blvd rd esq
    etc al seq vs cf sq ft ph tel est ext
    ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis
    wisc wyo""".split())
# Abbreviations only before a number: "no. 5", but "say no." ends a sentence.
_ABBREVIATIONS_BEFORE_NUMBER = frozenset(("no", "nos", "prop", "fig", "ca"))
_INITIALISM = re.compile(r"[a-z](?:\.[a-z])+", re.IGNORECASE)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = '"`'
_UNICODE = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " -- ", "\u2013": " -- ",
            "\u2026": " ... "}
# Whole words that PTB splits in two.
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                "lemme": ("lem", "me"), "gimme": ("gim", "me"), "'tis": ("'t", "is"), "'twas": ("'t", "was")}
# Words that begin with an apostrophe which is not an opening quote.
_APOSTROPHE_WORD = re.compile(r"'(?:\d0s|n'|s|m|re|ve|ll|d|tis|twas)$", re.IGNORECASE)
_CLITIC = re.compile(r"(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$", re.IGNORECASE)
_NUMBER_THEN_LETTERS = re.compile(r"(\d+(?:[.:,]\d+)+)([a-z]+)$", re.IGNORECASE)
_INNER_SEPARATOR = re.compile(r"[()\[\]{}]|(?<=\D)[:;,]|[:;,](?=\D)")
_INNER_BRACKET = re.compile(r"[()\[\]{}]")
_AMPERSAND = re.compile(r"(?<![A-Z])&|&(?![A-Z])")


# What follows a caption's last word. pycocoevalcap tokenizes all captions as one text, a line
# each, and PTB's lexer looks across the line end: there the next word is the next caption's
# first, most often capitalised ("A man ...").
_AFTER_LAST_WORD = "A"


def _keeps_period(stem: str, next_word: str) -> bool:
  """Whether PTB keeps `stem`'s final period as part of the word (an abbreviation)."""
  lower = stem.lower()
  if lower in _ABBREVIATIONS or _INITIALISM.fullmatch(stem):
    return True
  if len(stem) == 1 and stem.isalpha():
    return not (stem.islower() and next_word[:1].isupper())
  return lower in _ABBREVIATIONS_BEFORE_NUMBER and next_word[:1].isdigit()


def _peel_front(word: str) -> tuple[list[str], str]:
  """(the tokens split from the front of `word`, what is left of it)."""
  front = []
  while word:
    c = word[0]
    if c in "?!.-":
      if c in ".-" and word[1:2].isdigit():
        break  # .5, -5
      run = len(word) - len(word.lstrip(c))
      front.append(c * run if c in "?!" else c if run == 1 else "..." if c == "." else "--")
      word = word[run:]
      continue
    if c in _QUOTES or (c == "'" and not _APOSTROPHE_WORD.match(word) and word.lower() not in _SPLIT_WORDS):
      front.append("'")
    elif c in _BRACKETS:
      front.append(_BRACKETS[c])
    elif c in ",;:" or (c in "$#" and len(word) > 1):
      front.append(c)
    else:
      break
    word = word[1:]
  return front, word


def _peel_back(word: str, next_word: str) -> tuple[str, list[str]]:
  """(what is left of `word`, the tokens split from its end); `next_word` decides abbreviations."""
  back = []
  while word:
    c = word[-1]
    if c in "?!.":
      run = len(word) - len(word.rstrip("?!" if c in "?!" else "."))
      if c == "." and run == 1 and _keeps_period(word[:-1], next_word):
        break
      back.insert(0, word[-run:] if c in "?!" else "." if run == 1 else "...")
      word = word[:-run]
      continue
    if c in _QUOTES or (c == "'" and not _APOSTROPHE_WORD.match(word)):
      back.insert(0, "'")
    elif c in _BRACKETS:
      back.insert(0, _BRACKETS[c])
    elif c in ",;:-" or (c in "/%" and len(word) > 1):
      back.insert(0, c)
    else:
      break
    word = word[:-1]
  return word, back


def _word_tokens(word: str, next_word: str) -> list[str]:
  """The tokens of one whitespace-separated word (`next_word` follows it)."""
  front, word = _peel_front(word)
  word, back = _peel_back(word, next_word)
  if not word:
    return front + back
  if word.lower() in _SPLIT_WORDS:
    return front + list(_SPLIT_WORDS[word.lower()]) + back
  clitics = []
  while (m := _CLITIC.fullmatch(word)) and any(ch.isalnum() for ch in m.group(1)):
    word, clitics = m.group(1), [m.group(2)] + clitics
  if m := _NUMBER_THEN_LETTERS.fullmatch(word):
    return front + [m.group(1), m.group(2)] + clitics + back
  # "woman(right", "cat,and", 'said:"no': each side is a word of its own (not so "5,000", "10:30").
  inner = _INNER_BRACKET if any(ch.isdigit() for ch in word) else _INNER_SEPARATOR
  if inner.search(word):
    pieces = inner.sub(lambda m: f" {m.group(0)} ", word).split()
    core = [t for i, piece in enumerate(pieces)
            for t in _word_tokens(piece, pieces[i + 1] if i + 1 < len(pieces) else next_word)]
  else:
    core = _AMPERSAND.sub(" & ", word).split()
  return front + core + clitics + back


def tokenize(caption: str) -> list[str]:
  """A caption's tokens as pycocoevalcap's PTB tokenizer leaves them ("A man's hat." -> a man 's hat)."""
  for character, replacement in _UNICODE.items():
    caption = caption.replace(character, replacement)
  words = caption.split()
  following = words[1:] + [_AFTER_LAST_WORD]
  tokens = [t for word, next_word in zip(words, following) for t in _word_tokens(word, next_word)]
  return [t.lower() for t in tokens if t.lower() not in PTB_PUNCTUATION]


def _ngram_counts(tokens: Sequence[str], max_n: int) -> list[collections.Counter]:
  return [collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, max_n + 1)]


def cider_d(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], *, max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
  """(corpus CIDEr-D, per-candidate scores) of tokenised `candidates` against tokenised
  `references` (`references[i]`: the token lists of item i's captions).

  For n = 1..4 each sentence is a TF-IDF vector of its n-grams, the document frequencies
  counted over the reference sets of the evaluated corpus. A candidate's score is the mean
  over its references of the cosine similarity, with the candidate's weights clipped by the
  reference's (the "-D") and a Gaussian penalty (sigma 6) on the difference in length; the
  n-gram scores are averaged and multiplied by 10. Lengths are counted in bigrams, as
  pycocoevalcap counts them (the same as words but for an empty sentence, whose score is 0).
  """
  _check_pairs(candidates, references)
  refs_counts = [[_ngram_counts(r, max_n) for r in refs] for refs in references]
  doc_freq = collections.Counter()
  for counts_of_item in refs_counts:
    doc_freq.update({g for counts in counts_of_item for c in counts for g in c})
  log_items = math.log(float(len(candidates)))

  def tf_idf(counts):
    vectors = [{g: tf * (log_items - math.log(max(1.0, doc_freq[g]))) for g, tf in c.items()} for c in counts]
    norms = [math.sqrt(sum(x * x for x in v.values())) for v in vectors]
    length = sum(counts[1].values()) if max_n > 1 else 0  # pycocoevalcap counts bigrams (its index n == 1)
    return vectors, norms, length

  scores = []
  for cand, r_counts in zip(candidates, refs_counts):
    c_vec, c_norm, c_len = tf_idf(_ngram_counts(cand, max_n))
    total = [0.0] * max_n
    for rc in r_counts:
      r_vec, r_norm, r_len = tf_idf(rc)
      penalty = math.exp(-(float(c_len - r_len) ** 2) / (2 * sigma ** 2))
      for n in range(max_n):
        dot = sum(min(w, r_vec[n][g]) * r_vec[n][g] for g, w in c_vec[n].items() if g in r_vec[n])
        if c_norm[n] != 0 and r_norm[n] != 0:
          dot /= c_norm[n] * r_norm[n]
        total[n] += dot * penalty
    scores.append(sum(total) / max_n / len(r_counts) * 10.0)
  return (sum(scores) / len(scores) if scores else 0.0), scores


def _check_pairs(candidates: Sequence, references: Sequence) -> None:
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets; expected one set each")
  empty = [i for i, refs in enumerate(references) if len(refs) == 0]
  if empty:
    raise ValueError(f"candidate {empty[0]} has no reference captions; every candidate needs at least one")


METRICS = ("CIDEr-D", "BLEU-4", "ROUGE-L")
EVAL_EXTRA = "pip install 'mmjax[eval]' (pycocoevalcap)"


@dataclasses.dataclass(frozen=True)
class CaptionScores:
  """Corpus scores and per-caption scores, by metric name, and who computed them."""

  scores: dict[str, float]
  per_caption: dict[str, list[float]]
  scorer: str  # "pycocoevalcap" or "mmjax" (CIDEr-D only, without pycocoevalcap)
  tokenizer: str = "mmjax PTB rules (Python)"

  def __str__(self) -> str:
    values = ", ".join(f"{name} {value:.4f}" for name, value in self.scores.items())
    return f"{values} over {len(next(iter(self.per_caption.values())))} captions ({self.scorer}, {self.tokenizer})"


def pycocoevalcap_installed() -> bool:
  return importlib.util.find_spec("pycocoevalcap") is not None


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
                    metrics: Sequence[str] = METRICS) -> CaptionScores:
  """`metrics` of the generated `candidates` against `references[i]`, the captions of item i,
  both tokenised by `tokenize`. BLEU-4 and ROUGE-L need pycocoevalcap; CIDEr-D without it is
  mmjax's `cider_d` (equal to it to 1e-9)."""
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise ValueError(f"metrics={list(metrics)!r}; expected a non-empty selection of {', '.join(METRICS)}")
  _check_pairs(candidates, references)
  cand_tokens = [tokenize(c) for c in candidates]
  ref_tokens = [[tokenize(r) for r in refs] for refs in references]
  if not pycocoevalcap_installed():
    if set(metrics) != {"CIDEr-D"}:
      raise ValueError(f"{', '.join(m for m in metrics if m != 'CIDEr-D')} need pycocoevalcap: {EVAL_EXTRA}")
    score, per = cider_d(cand_tokens, ref_tokens)
    return CaptionScores(scores={"CIDEr-D": score}, per_caption={"CIDEr-D": per}, scorer="mmjax")
  scores, per_caption = {}, {}
  for name in metrics:
    scores[name], per_caption[name] = pycocoevalcap_score(name, cand_tokens, ref_tokens)
  return CaptionScores(scores=scores, per_caption=per_caption, scorer="pycocoevalcap")


def pycocoevalcap_score(metric: str, candidates: Sequence[Sequence[str]],
                        references: Sequence[Sequence[Sequence[str]]]) -> tuple[float, list[float]]:
  """(corpus score, per-candidate scores) of one of METRICS by pycocoevalcap's scorer, on tokens."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top

  # pycocoevalcap takes space-joined tokens keyed by image; the keys keep the input's order.
  res = {i: [" ".join(c)] for i, c in enumerate(candidates)}
  gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
  if metric == "CIDEr-D":
    score, per = Cider().compute_score(gts, res)
  elif metric == "ROUGE-L":
    score, per = Rouge().compute_score(gts, res)
  elif metric == "BLEU-4":
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its length ratios
      score, per = Bleu(4).compute_score(gts, res)
    score, per = score[3], per[3]
  else:
    raise ValueError(f"metric={metric!r}; expected one of {', '.join(METRICS)}")
  return float(score), [float(s) for s in per]
