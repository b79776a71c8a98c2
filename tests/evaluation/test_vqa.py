"""VQA accuracy against its references: OpenFlamingo's copy of the official evaluation
(`open_flamingo/eval/vqa_metric.py`, run on files written here), OpenFlamingo's answer
post-processing, and lmms-eval's rule (transcribed below, since lmms-eval is not installed).

The questions are built to hit every normalisation rule: each has a concept with spellings
that normalise alike or not, ten answers drawn from them and from distractors, and a
prediction that is a spelling, sometimes with text a model would generate after it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import statistics

import pytest

from mmjax.evaluation import vqa
from tests.parity.conftest import PARITY_INSTALL

TOL = 1e-9

# (spellings of one answer, answers that are not it). Together they hit every rule: each
# punctuation character touching a space or not, digit-comma-digit, periods (decimal,
# final, more than 32), number words, articles, contractions (one apostrophe, several,
# the reversed "somebody'd", the dead upper-case keys), case, tabs and newlines.
CONCEPTS = [
    (["t-shirt", "t shirt", "T-Shirt", "t_shirt", "t - shirt"], ["shirt", "tshirt"]),
    (["two", "2", "Two", "2.", "two!", " 2 "], ["3", "three", "twenty"]),
    (["none", "0", "zero", "None."], ["nothing", "no"]),
    (["ten", "10", "TEN"], ["1", "100"]),
    (["a dog", "dog", "the dog", "The Dog.", "an dog", "dog?"], ["dogs", "a cat"]),
    (["an apple", "apple", "the apple!", "Apple"], ["apples", "pear"]),
    (["1,000", "1000", "1,000.", "one thousand"], ["100", "1,0"]),
    (["10,000 people", "10000 people", "10,000-people"], ["people", "10 000 people"]),
    (["3.5", "3.5.", "3,5"], ["35", "3 5"]),
    (["dont", "don't", "Dont", "don't."], ["do not", "dont know"]),
    (["couldnt've", "couldn'tve", "couldn't've"], ["could not have", "couldntve"]),
    (["somebody'd", "somebodyd"], ["somebody", "somebody's"]),
    (["Im", "im", "I'm"], ["i am"]),
    (["yall", "y'all", "Yall"], ["you all"]),
    (["yall'd've", "y'all'd've", "y'alld've", "y'all'dve"], ["yalldve"]),
    (["let's", "lets"], ["let us"]),
    (["oclock", "o'clock", "5 oclock"], ["clock"]),
    (["red/blue", "red blue", "red / blue", "red\\blue"], ["red", "blue"]),
    (["(red)", "red", "[red]", "{red}", "<red>", "red;"], ["reddish"]),
    (['"yes"', "yes", "Yes", "yes!", "`yes`", "YES?"], ["no", "yes no"]),
    (["a=b", "a b", "a+b", "a = b"], ["ab"]),
    (["me@home", "me home", "me @ home"], ["mehome"]),
    (["e.g.", "eg", "e.g"], ["e g"]),
    (["u.s.a.", "usa", "U.S.A"], ["us"]),
    (["red,white", "red white", "red, white"], ["red"]),
    (["\tred\n", "red", "red\t", " red  "], ["re d"]),
    (["red\nblue", "red blue", "red\tblue"], ["redblue"]),
    (["hello.world", "helloworld", "hello. world"], ["hello world"]),
    (["." * 40 + "x", "x", "x" + "." * 40], ["xx"]),
    (["1.5 meters", "1.5meters", "1.5 meters."], ["15 meters"]),
    (["its", "it's", "Its"], ["it is"]),
    (["whats", "what's"], ["what is"]),
    (["the cat's toy", "cat's toy", "cats toy"], ["cat toy"]),
    (["skiing", "Skiing", "skiing."], ["ski", "skis"]),
    (["", " ", "."], ["nothing"]),
]

# What a model generates after the answer, and how OpenFlamingo's harness cuts it.
TAILS = ["", " Question: what is this? Answer:", "\nQuestion", ", I think", "Answer: no", " Short answer", ",", ", , ",
         " and more", "Question"]


def _questions(count: int = 240, seed: int = 0) -> list[tuple[int, str, list[str]]]:
  """(question id, generated text, ten answers) for `count` questions."""
  rng = random.Random(seed)
  out = []
  for qid in range(count):
    spellings, others = CONCEPTS[qid % len(CONCEPTS)]
    matching = rng.randint(0, 10)  # how many of the ten annotators gave the concept
    answers = [rng.choice(spellings) for _ in range(matching)] + [rng.choice(others) for _ in range(10 - matching)]
    rng.shuffle(answers)
    if qid % 7 == 0:
      answers = [answers[0]] * 10  # unanimous: lmms-eval then compares without normalising
    prediction = rng.choice(spellings + others[:1])
    tail = TAILS[qid % len(TAILS)] if qid % 3 else ""
    out.append((1000 + qid, prediction + tail, answers))
  return out


QUESTIONS = _questions()


def _open_flamingo_vqa_metric():
  """open_flamingo/eval/vqa_metric.py, loaded by path: the package's __init__ imports open_clip
  and torch, which the metric (plain Python) does not need."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    if os.environ.get("MMJAX_REQUIRE_PARITY") == "1":
      pytest.fail(f"open_flamingo is not installed: {PARITY_INSTALL}")
    pytest.skip(f"open_flamingo is not installed: {PARITY_INSTALL}")
  path = os.path.join(spec.submodule_search_locations[0], "eval", "vqa_metric.py")
  module_spec = importlib.util.spec_from_file_location("open_flamingo_vqa_metric", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _open_flamingo_accuracy(metric, tmp_path, results: dict[int, str]) -> tuple[float, dict[int, float]]:
  """(percent, question id -> [0, 1]) from OpenFlamingo's VQA and VQAEval on files in its format."""
  questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
               "questions": [{"question_id": q, "image_id": q, "question": "?"} for q, _, _ in QUESTIONS]}
  annotations = {"annotations": [
      {"question_id": q, "image_id": q, "question_type": "what", "answer_type": "other",
       "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
      for q, _, answers in QUESTIONS]}
  files = {}
  for name, content in (("questions", questions), ("annotations", annotations),
                        ("results", [{"question_id": q, "answer": a} for q, a in results.items()])):
    files[name] = str(tmp_path / f"{name}.json")
    with open(files[name], "w") as f:
      json.dump(content, f)
  reference = metric.VQA(files["annotations"], files["questions"])
  evaluation = metric.VQAEval(reference, reference.loadRes(files["results"], files["questions"]), n=20)
  evaluation.evaluate()  # n=20 decimals: its rounding of the percentages leaves the float as it is
  return evaluation.accuracy["overall"], {q: acc / 100 for q, acc in evaluation.evalQA.items()}


def _answers():
  return {q: answers for q, _, answers in QUESTIONS}


def test_the_questions_reach_every_accuracy_a_question_can_have():
  # 0, 1, 2, 3 and 4+ matching answers: 0, 0.3, 0.6, 0.9 and 1.
  score = vqa.vqa_accuracy({q: p for q, p, _ in QUESTIONS}, _answers(), postprocess="none")
  assert len(QUESTIONS) >= 200
  assert {round(a * 30) for a in score.per_question.values()} == {0, 9, 18, 27, 30}
  assert 20.0 < score.accuracy < 80.0


@pytest.mark.parity
@pytest.mark.parametrize("postprocess", ["open_flamingo", "none"])
def test_accuracy_equals_open_flamingos_vqa_eval(tmp_path, postprocess):
  metric = _open_flamingo_vqa_metric()
  generated = {q: p for q, p, _ in QUESTIONS}
  # OpenFlamingo writes post-processed generations to its results file, then scores them.
  written = {q: metric.postprocess_vqa_generation(p) if postprocess == "open_flamingo" else p
             for q, p in generated.items()}
  overall, per_question = _open_flamingo_accuracy(metric, tmp_path, written)
  score = vqa.vqa_accuracy(generated, _answers(), postprocess=postprocess)
  assert score.postprocess == postprocess
  assert score.per_question.keys() == per_question.keys()
  assert max(abs(score.per_question[q] - per_question[q]) for q in per_question) <= TOL
  assert abs(score.accuracy - overall) <= TOL


@pytest.mark.parity
def test_open_flamingo_post_processing_equals_its_own_function_on_the_same_strings():
  metric = _open_flamingo_vqa_metric()
  texts = [p for _, p, _ in QUESTIONS] + ["Short", "QuestionAnswer", "a, b, c", "yes,no", "no Answer, yes", "",
                                          "Answers, please", "question: lower case stays"]
  assert [vqa.postprocess_generation(t, "open_flamingo") for t in texts] == \
      [metric.postprocess_vqa_generation(t) for t in texts]


@pytest.mark.parity
def test_the_contraction_table_is_the_official_one():
  # The official table, less the entries that cannot change a lower-cased word: its keys with
  # capitals ("Im") and those mapped to themselves ("let's").
  official = _open_flamingo_vqa_metric().VQAEval(None, None).contractions
  assert vqa._CONTRACTIONS == {k: v for k, v in official.items() if k == k.lower() and k != v}


# lmms-eval's rule, transcribed from lmms_eval/tasks/vqav2/utils.py (`vqav2_process_results`)
# and lmms_eval/tasks/_task_utils/vqa_eval_metric.py (`EvalAIAnswerProcessor`, itself copied
# from facebookresearch/mmf), EvolvingLMMs-Lab/lmms-eval at 7993835952d6: the prediction goes
# through the whole processor (lower-case; "," and "?" deleted; "'s" -> " 's"; newlines and
# tabs to spaces; punctuation, with `(?<=\d)(\,)+(?=\d)` as the digit-comma-digit test; then
# numbers, articles and contractions); the answers are stripped; only when the ten are not all
# the same string are the answers, and the prediction once more, normalised (punctuation and
# words); then the leave-one-out accuracy, averaged with statistics.mean. The contraction
# table is the official one (test_the_contraction_table_is_the_official_one).
_LMMS_PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                      "?", "!"]
_LMMS_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def _lmms_process_punctuation(in_text):
  out_text = in_text
  for p in _LMMS_PUNCTUATIONS:
    if (p + " " in in_text or " " + p in in_text) or re.search(r"(?<=\d)(\,)+(?=\d)", in_text) is not None:
      out_text = out_text.replace(p, "")
    else:
      out_text = out_text.replace(p, " ")
  return re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out_text, re.UNICODE)


def _lmms_process_digit_article(in_text):
  words = [_LMMS_NUMBERS.get(w, w) for w in in_text.lower().split()]
  words = [w for w in words if w not in ("a", "an", "the")]
  return " ".join(vqa._CONTRACTIONS.get(w, w) for w in words)


def _lmms_eval_question_accuracy(generated: str, answers: list[str]) -> float:
  res = generated.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  res = res.replace("\n", " ").replace("\t", " ").strip()
  res = _lmms_process_digit_article(_lmms_process_punctuation(res))
  gts = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i} for i, a in enumerate(answers)]
  if len({g["answer"] for g in gts}) > 1:
    for g in gts:
      g["answer"] = _lmms_process_digit_article(_lmms_process_punctuation(g["answer"]))
    res = _lmms_process_digit_article(_lmms_process_punctuation(res))
  accuracies = []
  for gt in gts:
    others = [g for g in gts if g != gt]
    accuracies.append(min(1, float(len([g for g in others if g["answer"] == res])) / 3))
  return statistics.mean(accuracies)


def test_lmms_eval_option_equals_lmms_evals_rule():
  questions = QUESTIONS + [(1, "1,,2", ["1,,2"] * 5 + ["12"] * 5), (2, "the dog's toy", ["dog's toy"] * 10),
                           (3, "Two", ["Two"] * 10), (4, "two", ["2"] * 9 + ["two"])]
  score = vqa.vqa_accuracy({q: p for q, p, _ in questions}, {q: a for q, _, a in questions}, postprocess="lmms_eval")
  expected = {q: _lmms_eval_question_accuracy(p, a) for q, p, a in questions}
  assert score.postprocess == "lmms_eval"
  assert max(abs(score.per_question[q] - expected[q]) for q in expected) <= TOL
  assert abs(score.accuracy - 100 * statistics.mean(expected.values())) <= TOL
  # Unanimous answers are compared as written: "Two" x10 scores nothing after lower-casing.
  assert score.per_question[3] == 0.0 and score.per_question[2] == 0.0


def test_the_options_disagree_where_the_harnesses_do():
  answers = {1: ["2"] * 10, 2: ["yes"] * 10, 3: ["1000"] * 10}
  generated = {1: "Two, three", 2: "yes Question: is it?", 3: "1,000"}
  none = vqa.vqa_accuracy(generated, answers, postprocess="none")
  flamingo = vqa.vqa_accuracy(generated, answers, postprocess="open_flamingo")
  lmms = vqa.vqa_accuracy(generated, answers, postprocess="lmms_eval")
  assert none.per_question == {1: 0.0, 2: 0.0, 3: 1.0}
  assert flamingo.per_question == {1: 1.0, 2: 1.0, 3: 1.0}
  assert lmms.compared == {1: "2 3", 2: "yes question: is it", 3: "1000"}
  assert str(flamingo) == "VQA accuracy 100.00% over 3 questions (post-processing: open_flamingo)"


def test_three_matching_answers_score_0_9_because_each_left_out_match_leaves_two():
  answers = ["red"] * 3 + ["blue"] * 7
  assert vqa.vqa_accuracy({7: "Red."}, {7: answers}, postprocess="none").per_question[7] == pytest.approx(0.9)
  assert vqa.vqa_accuracy({7: "red"}, {7: ["red"] * 4 + ["blue"] * 6}, postprocess="none").per_question[7] == 1.0


def test_normalisation_rules():
  assert vqa.normalize_answer("The Two dogs.") == "2 dogs"
  assert vqa.normalize_answer("t-shirt") == "t shirt"  # no space beside the hyphen: a space
  assert vqa.normalize_answer("t - shirt") == "t shirt"  # a space beside it: deleted
  assert vqa.normalize_answer("1,000-2,000") == "10002000"  # digit-comma-digit: every mark deleted
  assert vqa.normalize_answer("3.5.") == "3.5"
  assert vqa.normalize_answer("dont") == "don't" and vqa.normalize_answer("somebody'd") == "somebodyd"
  assert vqa.normalize_answer("." * 40 + "x") == "." * 8 + "x"  # at most 32 periods go


def test_answers_are_read_from_a_vqav2_annotations_file():
  annotations = {"annotations": [{"question_id": 5, "answers": [{"answer": str(i), "answer_id": i} for i in range(10)]}]}
  assert vqa.answers_from_annotations(annotations) == {5: [str(i) for i in range(10)]}
  with pytest.raises(ValueError, match="question id 5 is annotated twice"):
    vqa.answers_from_annotations(annotations["annotations"] * 2)


def test_a_prediction_for_an_unannotated_question_is_refused_by_its_id():
  with pytest.raises(ValueError, match="question id 99, which has no annotated answers"):
    vqa.vqa_accuracy({1000: "yes", 99: "no"}, _answers(), postprocess="none")


@pytest.mark.parametrize("count", [9, 11, 0])
def test_a_question_without_ten_answers_is_refused_with_its_count(count):
  with pytest.raises(ValueError, match=f"question id 'q' has {count} answers; the VQA accuracy needs 10"):
    vqa.vqa_accuracy({"q": "yes"}, {"q": ["yes"] * count}, postprocess="none")


def test_an_unknown_post_processing_or_no_prediction_is_refused():
  with pytest.raises(ValueError, match="postprocess='lmms'; expected one of open_flamingo, lmms_eval, none"):
    vqa.vqa_accuracy({1000: "yes"}, _answers(), postprocess="lmms")
  with pytest.raises(ValueError, match="postprocess='lmms'"):
    vqa.postprocess_generation("yes", "lmms")
  with pytest.raises(ValueError, match="no predictions"):
    vqa.vqa_accuracy({}, _answers(), postprocess="none")
