"""Caption metrics against pycocoevalcap, COCO's caption evaluation: its CIDEr-D, BLEU-4 and
ROUGE-L scorers on the same tokens, and its Java PTB tokenizer against mmjax's Python one
(recorded in ptb_tokens.json; re-run where Java is installed)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil

import pytest

from mmjax.evaluation import captions
from mmjax.train import cider as train_cider

TOL = 1e-9

with open(os.path.join(os.path.dirname(__file__), "ptb_tokens.json")) as f:
  RECORDED = json.load(f)


def _items(seed: int = 0, count: int = 40) -> tuple[list[str], list[list[str]]]:
  """(candidates, references): five reference captions per item drawn from the recorded ones,
  the candidate one of them or another caption with a word dropped, and the edge cases of an
  empty candidate, a one-word candidate and repeated words."""
  rng = random.Random(seed)
  pool = [caption for caption, _ in RECORDED["equal"]]
  candidates, references = [], []
  for i in range(count):
    refs = rng.sample(pool, 5)
    words = (rng.choice(refs) if i % 2 else rng.choice(pool)).split()
    if len(words) > 3:
      del words[rng.randrange(len(words))]
    candidates.append(" ".join(words))
    references.append(refs)
  candidates += ["...", "Dog.", "a dog a dog a dog", references[0][0]]
  references += [["A dog."], ["A dog.", "dog"], ["A dog and a dog.", "a cat"], references[0]]
  return candidates, references


def _pycocoevalcap_scores(candidates_tokens, references_tokens):
  """{metric: (corpus, per item)} by pycocoevalcap's scorers, called as its COCOEvalCap does,
  with string image ids in an order of their own."""
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top

  ids = [f"image-{i}" for i in range(len(candidates_tokens))]
  order = sorted(range(len(ids)), key=lambda i: ids[i][::-1])
  res = {ids[i]: [" ".join(candidates_tokens[i])] for i in order}
  gts = {ids[i]: [" ".join(r) for r in references_tokens[i]] for i in order}

  def per_item(values):
    by_id = dict(zip(gts.keys(), values))
    return [float(by_id[i]) for i in ids]

  out = {}
  score, per = Cider().compute_score(gts, res)
  out["CIDEr-D"] = (float(score), per_item(per))
  score, per = Rouge().compute_score(gts, res)
  out["ROUGE-L"] = (float(score), per_item(per))
  with contextlib.redirect_stdout(io.StringIO()):
    score, per = Bleu(4).compute_score(gts, res)
  out["BLEU-4"] = (float(score[3]), per_item(per[3]))
  return out


def _assert_close(got: tuple[float, list[float]], want: tuple[float, list[float]]):
  assert len(got[1]) == len(want[1])
  assert max(abs(a - b) for a, b in zip(got[1], want[1])) <= TOL
  assert abs(got[0] - want[0]) <= TOL


def test_tokens_equal_the_java_ptb_tokenizers_on_typical_captions_and_every_rule():
  mismatches = [(c, java, " ".join(captions.tokenize(c))) for c, java in RECORDED["equal"]
                if " ".join(captions.tokenize(c)) != java]
  assert not mismatches
  assert len(RECORDED["equal"]) >= 150


def test_the_known_differences_from_the_java_tokenizer_are_the_documented_ones():
  for caption, java, ours in RECORDED["differ"]:
    assert " ".join(captions.tokenize(caption)) == ours != java


def test_brackets_stay_as_lower_case_tokens_because_the_punctuation_list_is_upper_case():
  assert captions.tokenize("A dog (brown) [left].") == ["a", "dog", "-lrb-", "brown", "-rrb-", "-lsb-", "left", "-rsb-"]


@pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH to run pycocoevalcap's PTBTokenizer")
def test_the_recorded_tokens_are_what_pycocoevalcaps_java_tokenizer_gives():
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top

  rows = [(c, java) for c, java in RECORDED["equal"]] + [(c, java) for c, java, _ in RECORDED["differ"]]
  tokens = PTBTokenizer().tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(rows)})
  assert [tokens[i][0] for i in range(len(rows))] == [java for _, java in rows]


def test_cider_d_equals_pycocoevalcaps_cider_on_the_same_tokens():
  candidates, references = _items()
  cand_tokens = [captions.tokenize(c) for c in candidates]
  ref_tokens = [[captions.tokenize(r) for r in refs] for refs in references]
  reference = _pycocoevalcap_scores(cand_tokens, ref_tokens)["CIDEr-D"]
  _assert_close(captions.cider_d(cand_tokens, ref_tokens), reference)
  # The trainer's CIDEr-D (the demo's) tokenises raw captions the same way.
  _assert_close(train_cider.cider_d(candidates, references), reference)
  assert 0.1 < reference[0] < 10.0


def test_caption_metrics_equal_pycocoevalcaps_scorers_on_the_same_tokens():
  candidates, references = _items(seed=1)
  reference = _pycocoevalcap_scores([captions.tokenize(c) for c in candidates],
                                    [[captions.tokenize(r) for r in refs] for refs in references])
  result = captions.caption_metrics(candidates, references)
  assert result.scorer == "pycocoevalcap"
  for metric in captions.METRICS:
    _assert_close((result.scores[metric], result.per_caption[metric]), reference[metric])
  assert str(result).startswith(f"CIDEr-D {result.scores['CIDEr-D']:.4f}, BLEU-4")


@pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH to run pycocoevalcap's PTBTokenizer")
def test_caption_metrics_equal_the_coco_evaluation_with_its_java_tokenizer():
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top

  candidates, references = _items(seed=2)
  tokenizer = PTBTokenizer()
  res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
  gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
  reference = _pycocoevalcap_scores([res[i][0].split() for i in range(len(candidates))],
                                    [[r.split() for r in gts[i]] for i in range(len(candidates))])
  result = captions.caption_metrics(candidates, references)
  for metric in captions.METRICS:
    _assert_close((result.scores[metric], result.per_caption[metric]), reference[metric])


def test_without_pycocoevalcap_cider_d_is_mmjaxs_own_and_bleu_asks_for_the_extra(monkeypatch):
  candidates, references = _items(seed=3)
  with_package = captions.caption_metrics(candidates, references, metrics=("CIDEr-D",))
  monkeypatch.setattr(captions, "pycocoevalcap_installed", lambda: False)
  without = captions.caption_metrics(candidates, references, metrics=("CIDEr-D",))
  assert without.scorer == "mmjax"
  _assert_close((without.scores["CIDEr-D"], without.per_caption["CIDEr-D"]),
                (with_package.scores["CIDEr-D"], with_package.per_caption["CIDEr-D"]))
  with pytest.raises(ValueError, match=r"BLEU-4, ROUGE-L need pycocoevalcap: pip install 'mmjax\[eval\]'"):
    captions.caption_metrics(candidates, references)


def test_bad_input_is_refused_naming_the_value():
  with pytest.raises(ValueError, match="2 candidates but 1 reference sets"):
    captions.caption_metrics(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="candidate 1 has no reference captions"):
    captions.caption_metrics(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match=r"metrics=\['CIDEr'\]; expected a non-empty selection of CIDEr-D"):
    captions.caption_metrics(["a"], [["a"]], metrics=("CIDEr",))
